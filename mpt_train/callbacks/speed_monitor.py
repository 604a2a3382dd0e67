"""Composer's SpeedMonitor, with evaluation run from inside a batch counted as evaluation.

Composer pauses its training clock around its own evaluators, but a callback that evaluates
from inside ``BATCH_END`` (the ICL tasks) runs on the training clock: the trainer adds those
seconds to the next batch's duration. Composer's SpeedMonitor then reports every throughput
window that holds that batch (``throughput/*``, MFU, the console's ``tok/s``) as slow: at
MPT-7B with ICL every 1000 batches, a dip on the dashboards for ``window_size`` batches after
each pass, and ``time/train`` that grows with eval time.

Such callbacks report what they spent as a float attribute ``eval_seconds`` (cumulative this
session). :class:`TrainSpeedMonitor` takes those seconds off the training clock before
Composer's arithmetic and adds them to ``time/val``; the total is kept in checkpoints, so a
resumed run goes on subtracting what earlier sessions spent.
"""

from __future__ import annotations

import datetime
from typing import Any

from composer.callbacks import SpeedMonitor
from composer.core import State
from composer.loggers import Logger

from mpt_train.train.host_reads import beside_the_update

__all__ = ["TrainSpeedMonitor", "in_batch_eval_seconds"]


def in_batch_eval_seconds(state: State) -> float:
    """Seconds this session's callbacks report having spent evaluating inside batches."""
    return sum(float(getattr(cb, "eval_seconds", 0.0)) for cb in state.callbacks)


class TrainSpeedMonitor(SpeedMonitor):
    """:class:`composer.callbacks.SpeedMonitor` whose training clock leaves out in-batch
    evaluation. Same arguments, same metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: In-batch eval seconds on the trainer's clock so far (all sessions of the run).
        self.in_batch_eval_wct = 0.0
        self._reported = 0.0  # this session's callbacks' total at the last batch start

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "in_batch_eval_wct": self.in_batch_eval_wct}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.in_batch_eval_wct = float(state.get("in_batch_eval_wct", 0.0))

    def batch_start(self, state: State, logger: Logger) -> None:
        # The trainer's clock for this batch started before the previous BATCH_END's
        # evaluations: what they reported by now is in the duration this batch will get.
        reported = in_batch_eval_seconds(state)
        new = reported - self._reported
        self._reported = reported
        if new > 0:
            self.in_batch_eval_wct += new
            self.total_eval_wct += new

    def batch_end(self, state: State, logger: Logger) -> None:
        # Composer's batch_end copies this rank's FLOPs up, all-reduces and reads them back:
        # beside the update, that read does not wait for the optimizer step.
        if self.in_batch_eval_wct <= 0:
            with beside_the_update():
                super().batch_end(state, logger)
            return
        # SpeedMonitor reads the clock from the state; give it the training clock for the
        # length of this call only.
        clock = state.timestamp
        state.timestamp = clock.copy(
            total_wct=clock.total_wct - datetime.timedelta(seconds=self.in_batch_eval_wct)
        )
        try:
            with beside_the_update():
                super().batch_end(state, logger)
        finally:
            state.timestamp = clock
