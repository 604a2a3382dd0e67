"""Benchmark a spec: ``python scripts/benchmark.py SPEC [a.b=c ...] [--json]``.

Thin wrapper: the logic lives in :mod:`mpt_train.tools.benchmark`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpt_train.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
