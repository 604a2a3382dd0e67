"""Run a sweep: ``python scripts/sweep.py SWEEP.yaml [--launcher local|slurm] [--dry-run]``.

``--collect`` gathers the results. Thin wrapper: the logic lives in :mod:`mpt_train.tools.sweep`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpt_train.tools.sweep import main

if __name__ == "__main__":
    sys.exit(main())
