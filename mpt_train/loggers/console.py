"""Compact, rank-0 console lines: step, loss, tokens/s, MFU, ETA.

Composer's ConsoleLogger prints every metric on its own line; on a cluster that buries the
few numbers an operator watches. This prints one line per interval instead, and eval results
when they arrive.
"""

from __future__ import annotations

import datetime
import math
import sys
from typing import Any, TextIO

import torch
from composer.core import State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

__all__ = ["ConsoleLine", "format_line"]


def _num(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.1f}"


def format_line(step: int, total: int | None, m: dict[str, float]) -> str:
    """``[batch 120/1000] loss 3.4121 lr 5.9e-04 tok/s 12.3k mfu 41.2% eta 0:12:31``."""
    parts = [f"[batch {step}/{total}]" if total else f"[batch {step}]"]
    if "loss/train/total" in m:
        parts.append(f"loss {m['loss/train/total']:.4f}")
    lr = next((v for k, v in m.items() if k.startswith("lr-")), None)
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if "throughput/tokens_per_sec" in m:
        parts.append(f"tok/s {_num(m['throughput/tokens_per_sec'])}")
    if "throughput/device/mfu" in m:
        parts.append(f"mfu {100 * m['throughput/device/mfu']:.1f}%")
    if "throughput/device/fp8_peak_share" in m:
        parts.append(f"(fp8 peak {100 * m['throughput/device/fp8_peak_share']:.1f}%)")
    if "cost/usd" in m:
        parts.append(f"${m['cost/usd']:.2f}")
    eta = m.get("time/remaining_estimate")
    if eta is not None and math.isfinite(eta):
        parts.append(f"eta {datetime.timedelta(seconds=int(eta))}")
    return " ".join(parts)


class ConsoleLine(LoggerDestination):
    def __init__(self, log_interval: str = "10ba", stream: TextIO | None = None) -> None:
        super().__init__()
        self.interval = Time.from_timestring(log_interval)
        self.stream = stream or sys.stdout
        self._latest: dict[str, float] = {}
        self._eval: dict[str, float] = {}
        self._planned: Time | None = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, int | float):
                (self._eval if k.startswith("metrics/eval") else self._latest)[k] = float(v)

    def _print(self, line: str) -> None:
        if dist.get_global_rank() == 0:
            print(line, file=self.stream, flush=True)

    def fit_start(self, state: State, logger: Logger) -> None:
        # As planned: a run stopped early (the loss guard) has max_duration cut to its stop.
        self._planned = state.max_duration

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        every = self.interval.value
        due = self.interval.unit == TimeUnit.BATCH and step % every == 0
        max_dur = self._planned or state.max_duration
        total = (
            int(max_dur.value) if max_dur is not None and max_dur.unit == TimeUnit.BATCH else None
        )
        # The last line is printed at the end however training ends (in any time unit).
        last = state.max_duration is not None and state.timestamp >= state.max_duration
        if due or last:
            self._print(format_line(step, total, self._latest))

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._eval:
            vals = " ".join(
                f"{k.removeprefix('metrics/')} {v:.4f}" for k, v in sorted(self._eval.items())
            )
            self._print(f"[eval @ batch {int(state.timestamp.batch)}] {vals}")
            self._eval = {}
