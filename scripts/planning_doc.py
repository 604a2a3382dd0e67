"""Write docs/planning.md: ``python scripts/planning_doc.py [--check]``.

Thin wrapper: the logic lives in :mod:`mpt_train.tools.planning_doc`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpt_train.tools.planning_doc import main

if __name__ == "__main__":
    sys.exit(main())
