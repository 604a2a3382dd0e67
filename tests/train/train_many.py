"""Train several specs one after another in the same ranks:
``composer -n 2 tests/train/train_many.py A.yaml B.yaml ...``.

Each run is built from its spec exactly as ``train.py`` builds it; only the ranks' start-up
(imports, process group) is paid once, which is most of a tiny multi-rank run's time.
"""

from __future__ import annotations

import sys

from mpt_train.cli import setup_logging
from mpt_train.config import load_config
from mpt_train.train.builder import train


def main() -> None:
    setup_logging()
    for spec in sys.argv[1:]:
        train(load_config(spec))


if __name__ == "__main__":
    main()
