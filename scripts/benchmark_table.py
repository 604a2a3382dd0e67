"""Run a benchmark table: ``python scripts/benchmark_table.py yamls/benchmarks/h100.yaml``.

Thin wrapper: the logic lives in :mod:`mpt_train.tools.benchmark_table`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpt_train.tools.benchmark_table import main

if __name__ == "__main__":
    sys.exit(main())
