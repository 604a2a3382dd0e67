"""Tokenize a corpus into MDS shards: a thin wrapper over :func:`mpt_train.data.convert_cli.main`.

Usage: ``python scripts/data_prep/convert.py INPUT... --out DIR_OR_URL --concat-tokens N``
(``--help`` for every option). Installed, the same command is ``mpt-convert``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from mpt_train.data.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
