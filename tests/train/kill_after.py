"""Train like ``train.py`` but SIGKILL one rank at the end of a given batch.

Fault injection for resumption tests: ``composer -n 2 tests/train/kill_after.py 5 1 SPEC
[overrides]`` kills rank 1 once batch 5 is done (after any checkpoint due then), as a hardware failure would.
"""

from __future__ import annotations

import os
import signal
import sys

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from mpt_train.cli import setup_logging
from mpt_train.config import load_config
from mpt_train.train.builder import build_trainer


class KillAt(Callback):
    def __init__(self, batch: int, rank: int) -> None:
        self.batch = batch
        self.rank = rank

    def batch_start(self, state: State, logger: Logger) -> None:
        # At the start of the next batch: batch N, its checkpoint and its metrics are all done.
        if int(state.timestamp.batch) == self.batch and dist.get_global_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    batch, rank, spec, *overrides = sys.argv[1:]
    setup_logging()
    trainer = build_trainer(
        load_config(spec, overrides), extra_callbacks=[KillAt(int(batch), int(rank))]
    )
    trainer.fit()


if __name__ == "__main__":
    main()
