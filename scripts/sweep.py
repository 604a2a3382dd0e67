"""Run a sweep: ``python scripts/sweep.py SWEEP.yaml [--launcher local|slurm] [--dry-run]``.

``--collect`` gathers the results. Thin wrapper over :mod:`mpt_train.tools.sweep_cli`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpt_train.tools.sweep_cli import main

if __name__ == "__main__":
    sys.exit(main())
