"""Train an MPT from a run spec: ``composer train.py yamls/mpt-7b.yaml [a.b=c ...]``."""

import sys

from mpt_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
