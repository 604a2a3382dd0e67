"""Plan a run: ``python scripts/plan.py yamls/mpt-7b-1t.yaml --gpus 440 --gpu a100_40gb``.

Thin wrapper: the logic lives in :mod:`mpt_train.tools.plan`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpt_train.tools.plan import main

if __name__ == "__main__":
    sys.exit(main())
