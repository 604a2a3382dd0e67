"""Loss guard: catch NaN/Inf losses and loss spikes before they reach the weights.

A single non-finite loss poisons every weight through the optimizer's moments, and a spike
(a bad batch, an lr too high for a moment) can undo days of training; both are cheap to
notice and expensive to notice late. The guard looks at the step's loss after backward and
*before* the optimizer step (Composer's ``AFTER_TRAIN_BATCH``), all-reduced so every rank takes
the same decision, and then:

* ``skip``: drops the update (the fused kernel is told to skip it, or, on the host path, the
  gradients are set to None, which every optimizer here skips), so the weights and optimizer
  moments and step count are as before the batch; the trainer's step counter, data position
  and lr schedule move on.
* ``stop``: also drops the update, then ends training after this batch so Composer saves a
  checkpoint (weights from before the bad batch, data position after it), writes
  ``loss_guard.json`` with the diagnostics, and fails with :class:`LossGuardStop`.
* ``warn``: logs only. Every verdict logs one line naming the step and the batch (a hash of
  each rank's ``input_ids``, to find it again in the data).

Reading the loss before the step would make the host wait for the whole backward before it can
queue the optimizer. With torch's fused Adam/AdamW (the GPU default) it does not have to: the
decision to drop the update is computed on the device and handed to the kernel as its
``found_inf`` flag (the hook GradScaler uses to skip fp16 steps with inf gradients; the kernel
then leaves weights, moments and step count as they were). The statistics are copied to the
host before the update is queued and read at ``BATCH_END`` (:mod:`mpt_train.train.host_reads`), and
judged there for the log line, the history and a stop. Other optimizers (foreach or Composer's
AdamW, Lion) and amp_fp16 (whose loss scaler owns ``found_inf``) take the decision on the host
before the step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from composer.utils import dist, ensure_tuple

from mpt_train.errors import RunFailure
from mpt_train.reliability.config import LossGuardConfig
from mpt_train.train.host_reads import read_later

__all__ = ["LossGuard", "LossGuardStop", "batch_fingerprint"]

log = logging.getLogger(__name__)


class LossGuardStop(RunFailure):
    """Training was stopped by the loss guard; the message names the step and the batch."""


def batch_fingerprint(batch: Any) -> str:
    """Short hash of a batch's ``input_ids``: the same data gives the same fingerprint."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
    data = ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:12]


class LossGuard(Callback):
    """See the module docstring. ``out_dir`` receives ``loss_guard.json`` on a stop."""

    def __init__(self, cfg: LossGuardConfig, out_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive_skips = 0
        self.events: list[dict[str, Any]] = []
        self._micro: list[torch.Tensor] = []
        self._pending: Callable[[], torch.Tensor] | None = None  # statistics for BATCH_END
        self._on_device = False
        self._stop_message: str | None = None
        self._stop_now = False
        self._resumed = False

    def fit_start(self, state: State, logger: Logger) -> None:
        from mpt_train.train.optim import (
            takes_found_inf,  # optim -> config -> reliability: not at top
        )

        self._resumed = int(state.timestamp.batch) > 0
        self._on_device = state.precision != Precision.AMP_FP16 and all(
            takes_found_inf(opt) for opt in ensure_tuple(state.optimizers)
        )

    def before_train_batch(self, state: State, logger: Logger) -> None:
        # Each attempt at the batch: after an OOM, auto microbatching retries it in smaller
        # micro batches, and the failed attempt's losses must not count.
        self._micro = []

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss
        if isinstance(loss, dict):
            loss = loss.get("total", next(iter(loss.values())))
        if isinstance(loss, tuple | list):
            loss = sum(loss)
        self._micro.append(loss.detach().float().reshape(()))

    def after_train_batch(self, state: State, logger: Logger) -> None:
        optimizers = ensure_tuple(state.optimizers)
        if not self._micro:
            for opt in optimizers if self._on_device else ():
                opt.found_inf = None  # never a stale flag from an earlier step
            return
        local = torch.stack(self._micro).double()
        finite = torch.isfinite(local)
        # Built on the device: one device-to-host copy per step, not three.
        stats = torch.stack(
            [
                (~finite).sum().double(),
                torch.where(finite, local, 0.0).sum(),
                # A fill, not new_tensor: copying a host number up would wait for the backward.
                torch.full((), len(local), dtype=local.dtype, device=local.device),
            ]
        )
        dist.all_reduce(stats, reduce_operation="SUM")
        if not self._on_device:
            self._judge_step(stats, state, int(state.timestamp.batch) + 1)
            return
        self._pending = read_later(stats)  # copied now, read at BATCH_END: no wait for the update
        drop = torch.zeros((), dtype=torch.bool, device=stats.device)
        if self.cfg.on_nonfinite in ("skip", "stop"):
            drop = drop | (stats[0] > 0)
        threshold = self._spike_threshold()
        if threshold is not None:
            drop = drop | ((stats[0] == 0) & (stats[1] / stats[2] > threshold))
        for opt in optimizers:
            opt.found_inf = drop.float()  # the fused kernel skips the update when it is 1

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._pending is not None:
            read, self._pending = self._pending, None
            self._judge_step(read(), state, int(state.timestamp.batch))
        if self._stop_now:
            self._stop_now = False
            # Ends the run after this batch; Composer's saver checkpoints at the end of training.
            state.stop_training()

    def _spike_threshold(self) -> float | None:
        """The loss above which this step is a spike to drop, or None when spikes pass."""
        if self.cfg.on_spike not in ("skip", "stop") or len(self.history) < self.cfg.min_history:
            return None
        return self.cfg.spike_factor * statistics.median(self.history)

    def _judge_step(self, stats: torch.Tensor, state: State, step: int) -> None:
        """Log, record and act on one step's all-reduced (non-finite, sum, count) losses. On the
        device path the update was already dropped, by the same rule, inside the optimizer."""
        nonfinite, total, count = (float(x) for x in stats.tolist())
        loss = math.nan if nonfinite else total / count
        verdict, action = self._judge(loss)
        if verdict is None:
            if math.isfinite(loss):  # with on_nonfinite off a NaN passes, but is no reference
                self.history.append(loss)
            self.consecutive_skips = 0
            return
        if action in ("skip", "stop"):
            self.consecutive_skips += 1
            if action == "skip" and self.consecutive_skips > self.cfg.max_consecutive_skips:
                action = "stop"
                verdict += f" ({self.consecutive_skips} bad steps in a row)"
        fingerprints = dist.all_gather_object(batch_fingerprint(state.batch))
        event = {
            "step": step,
            "loss": loss if math.isfinite(loss) else str(loss),
            "verdict": verdict,
            "action": action,
            "batch": fingerprints,
            "recent_median": statistics.median(self.history) if self.history else None,
        }
        self.events.append(event)
        line = (
            f"loss guard: step {step}: {verdict}; batch input_ids sha1 "
            f"{', '.join(f'rank{r}={h}' for r, h in enumerate(fingerprints))}; action: {action}"
        )
        if dist.get_global_rank() == 0:  # every rank holds the same verdict and fingerprints
            (log.error if action == "stop" else log.warning)(line)
        if action in ("skip", "stop") and not self._on_device:
            for p in state.model.parameters():
                p.grad = None
        if action == "stop":
            self._stop_message = line
            self._stop_now = True

    def _judge(self, loss: float) -> tuple[str | None, str]:
        if not math.isfinite(loss):
            if self.cfg.on_nonfinite == "off":
                return None, "off"
            return f"loss is {loss}", self.cfg.on_nonfinite
        if self.cfg.on_spike == "off" or len(self.history) < self.cfg.min_history:
            return None, "off"
        median = statistics.median(self.history)
        if loss > self.cfg.spike_factor * median:
            return (
                f"loss {loss:.4f} spiked above {self.cfg.spike_factor} x the recent median "
                f"{median:.4f}",
                self.cfg.on_spike,
            )
        return None, "off"

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._stop_message is None:
            return
        if self.out_dir is not None and dist.get_global_rank() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "loss_guard.json"
            # A resumed run adds to what earlier attempts found (the stop that made it resume).
            earlier = _read_events(path) if self._resumed else []
            path.write_text(json.dumps(earlier + self.events, indent=1))
        raise LossGuardStop(self._stop_message)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.extend(state.get("history", []))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


def _read_events(path: Path) -> list[dict[str, Any]]:
    try:
        events = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return events if isinstance(events, list) else []
