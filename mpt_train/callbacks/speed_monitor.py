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

With FP8 linears MFU stays against the dense bf16 peak (one convention for every run, so MFU
and tokens/s compare directly); ``throughput/device/fp8_peak_share`` adds the same FLOP/s as a
share of the GPU's dense FP8 peak, the ceiling the FP8 matmuls run against.
"""

from __future__ import annotations

import datetime
from typing import Any

from composer.callbacks import SpeedMonitor
from composer.core import State
from composer.loggers import Logger

from mpt_train.train.host_reads import beside_the_update

__all__ = ["FP8_SHARE_KEY", "TrainSpeedMonitor", "in_batch_eval_seconds"]

FP8_SHARE_KEY = "throughput/device/fp8_peak_share"


def in_batch_eval_seconds(state: State) -> float:
    """Seconds this session's callbacks report having spent evaluating inside batches."""
    return sum(float(getattr(cb, "eval_seconds", 0.0)) for cb in state.callbacks)


class _WithFp8Share:
    """A logger that adds the FP8-peak share next to each MFU it passes on."""

    def __init__(self, logger: Logger, ratio: float) -> None:
        self._logger = logger
        self._ratio = ratio  # bf16 peak / FP8 peak

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if "throughput/device/mfu" in metrics:
            metrics = {**metrics, FP8_SHARE_KEY: metrics["throughput/device/mfu"] * self._ratio}
        self._logger.log_metrics(metrics, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class TrainSpeedMonitor(SpeedMonitor):
    """:class:`composer.callbacks.SpeedMonitor` whose training clock leaves out in-batch
    evaluation. Same arguments and metrics, plus ``fp8_peak_flops`` (the GPU's dense FP8
    peak, for runs with FP8 linears): also log the FP8-peak share."""

    def __init__(self, *args: Any, fp8_peak_flops: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fp8_peak_flops = fp8_peak_flops
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
        if self.fp8_peak_flops and self.gpu_flops_available:
            logger = _WithFp8Share(logger, self.gpu_flops_available / self.fp8_peak_flops)
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
