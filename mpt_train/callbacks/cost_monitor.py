"""What a run has cost so far, what it will cost, and what restarts wasted.

Every ``log_interval`` batches the :class:`CostMonitor` logs (rank 0's loggers):

    cost/tokens                   tokens trained on (Composer's timestamp, all ranks)
    cost/tokens_per_sec           over the interval, eval time excluded
    cost/tokens_per_sec_per_gpu
    cost/mfu, cost/hfu            when the GPU's peak is known (never guessed on CPU)
    cost/wall_hours               wall time of the work that counts (the checkpoint lineage)
    cost/gpu_hours                GPU-hours paid for, lost work included
    cost/usd                      dollars paid for, lost work included (when a price is known)
    cost/lost_gpu_hours           work redone after restarts, and idle init of failed attempts
    cost/lost_usd
    cost/restarts
    cost/remaining_hours          to max_duration, at this session's pace (evals, saves included)
    cost/projected_hours          wall_hours + remaining_hours
    cost/projected_usd            dollars at the end, lost work so far included
    cost/eta_unix                 when it ends (seconds since the epoch)

Restarts. The totals go into every checkpoint (Composer calls :meth:`state_dict`), so a resumed
run starts from what had been spent *up to that checkpoint*. What was spent after it, before the
crash, is work that will be redone: it is neither dropped nor counted twice as progress. To
know it, rank 0 keeps a small ledger file (``runs/{run_name}/cost_ledger.json``) with the running
totals, rewritten every batch. On resume, ``ledger - checkpoint`` is the lost work; it is added
to ``cost/lost_*`` and to the money spent, and the run keeps counting from the checkpoint.
A restart with no checkpoint at all (a crash before the first save) counts the whole earlier
attempt as lost. The ledger's granularity is one batch: the batch in flight at a crash is not
counted. Time between attempts (scheduler queue, node replacement) is not counted either: no
GPUs are held then. Without a ledger (another machine, ledger disabled) the loss is unknown and
a warning says so.

The clock is injectable (``clock=``) so tests drive time; it must return seconds since the
epoch (it also dates the ETA).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from composer.core import Callback, State, Time
from composer.loggers import Logger
from composer.utils import dist

from mpt_train.callbacks.accounting import (
    detect_gpu_type,
    get_gpu,
    hfu_from_mfu,
    price_per_gpu_hour,
)
from mpt_train.callbacks.speed_monitor import in_batch_eval_seconds

__all__ = ["CostMonitor", "CostTotals"]

log = logging.getLogger(__name__)

DEFAULT_LEDGER = "runs/{run_name}/cost_ledger.json"


@dataclass
class CostTotals:
    """Running totals; what a checkpoint and the ledger carry.

    ``wall_s``/``gpu_s``/``usd`` are the work on the checkpoint lineage (what progress cost);
    ``lost_*`` are work thrown away by restarts. Money paid is ``usd + lost_usd``.
    """

    batch: int = 0
    wall_s: float = 0.0
    gpu_s: float = 0.0
    usd: float = 0.0
    lost_wall_s: float = 0.0
    lost_gpu_s: float = 0.0
    lost_usd: float = 0.0
    restarts: int = 0
    #: The attempt reached max_duration (ledger only): a later start under the same run name
    #: is a new run, not a restart.
    finished: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostTotals:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CostMonitor(Callback):
    """Tokens, throughput, MFU/HFU, GPU-hours, dollars and ETA; restart-safe totals.

    Args:
        gpu_type: A key of :data:`mpt_train.callbacks.accounting.GPU_TYPES`; None detects it from CUDA.
        price_per_gpu_hour: USD per GPU-hour; None uses the table's default for the GPU type.
        peak_flops: Peak FLOP/s of one device, overriding the table (e.g. a nominal CPU peak).
        activation_checkpointing: Whether the forward pass is recomputed (HFU = 4/3 MFU).
        log_interval: Log every this many batches (and at the last batch).
        ledger_path: Running-totals file; ``{run_name}`` is filled in; None disables it.
        clock: Seconds since the epoch; injectable for tests.
    """

    def __init__(
        self,
        gpu_type: str | None = None,
        price_per_gpu_hour: float | None = None,
        peak_flops: float | None = None,
        activation_checkpointing: bool = False,
        log_interval: int = 10,
        ledger_path: str | None = DEFAULT_LEDGER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        self.gpu_type = gpu_type
        self.price = price_per_gpu_hour
        self.peak_flops = peak_flops
        self.activation_checkpointing = activation_checkpointing
        self.log_interval = log_interval
        self.ledger_template = ledger_path
        self.clock = clock
        self.ledger: Path | None = None
        self.world = 1
        self._base = CostTotals()  # totals restored from a checkpoint (zero when fresh)
        self._loaded = False
        self._planned: Time | None = None  # max_duration as the run began (see _elapsed_fraction)
        self._session_start = 0.0
        self._eval_s = 0.0  # eval time this session, excluded from throughput
        self._eval_started: float | None = None
        self._pace_start: tuple[float, float] | None = None  # (clock, elapsed fraction)
        self._window: tuple[float, int] | None = None  # (train clock, tokens) at interval start
        self._flops = 0.0  # model FLOPs of all ranks since the interval start
        self._last_batch = 0
        self.last_metrics: dict[str, float] = {}

    # ---- totals ---------------------------------------------------------------------------
    def _session_s(self) -> float:
        return max(0.0, self.clock() - self._session_start)

    def totals(self, batch: int | None = None) -> CostTotals:
        """Totals now: the restored base plus this session's time on ``world`` devices."""
        t = self._session_s()
        gpu_s = t * self.world
        rate = (self.price or 0.0) / 3600.0
        b = self._base
        return CostTotals(
            batch=b.batch if batch is None else batch,
            wall_s=b.wall_s + t,
            gpu_s=b.gpu_s + gpu_s,
            usd=b.usd + gpu_s * rate,
            lost_wall_s=b.lost_wall_s,
            lost_gpu_s=b.lost_gpu_s,
            lost_usd=b.lost_usd,
            restarts=b.restarts,
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved in each checkpoint: the totals at the moment of the save."""
        return {"totals": asdict(self.totals(self._last_batch)), "saved_at": self.clock()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume counting from the checkpoint; charge work done after it as lost."""
        ckpt = CostTotals.from_dict(state["totals"])
        # Time this session has spent so far (init, checkpoint load) is re-based on the
        # checkpoint's totals: it is still counted, once, as this session's time.
        self._base = ckpt
        self._base.restarts += 1
        self._loaded = True
        self._charge_lost_from_ledger(ckpt)

    def _charge_lost_from_ledger(self, ckpt: CostTotals | None) -> None:
        """Add what the previous attempt spent past ``ckpt`` (or in full, if None) as lost."""
        prev = self._read_ledger()
        if prev is None:
            if ckpt is not None and dist.get_global_rank() == 0:
                log.warning(
                    "cost monitor: no ledger from the previous attempt; time lost since the "
                    "checkpoint at batch %d is not counted",
                    ckpt.batch,
                )
            return
        base = ckpt or CostTotals()
        lost_wall = max(0.0, prev.wall_s - base.wall_s)
        lost_gpu = max(0.0, prev.gpu_s - base.gpu_s)
        lost_usd = max(0.0, prev.usd - base.usd)
        # The ledger's lost totals are the newest knowledge (they include restarts that
        # happened after this checkpoint was written).
        self._base.lost_wall_s = max(prev.lost_wall_s, base.lost_wall_s) + lost_wall
        self._base.lost_gpu_s = max(prev.lost_gpu_s, base.lost_gpu_s) + lost_gpu
        self._base.lost_usd = max(prev.lost_usd, base.lost_usd) + lost_usd
        self._base.restarts = max(prev.restarts + 1, self._base.restarts)
        log.info(
            "cost monitor: resumed at batch %d; the previous attempt reached batch %d, "
            "%.3f GPU-hours ($%.2f) of work lost",
            base.batch,
            prev.batch,
            lost_gpu / 3600.0,
            lost_usd,
        )

    # ---- ledger ---------------------------------------------------------------------------
    def _read_ledger(self) -> CostTotals | None:
        if self.ledger is None or not self.ledger.is_file():
            return None
        try:
            return CostTotals.from_dict(json.loads(self.ledger.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            log.warning("cost monitor: unreadable ledger %s (%s); ignoring it", self.ledger, e)
            return None

    def _write_ledger(self, totals: CostTotals) -> None:
        if self.ledger is None or dist.get_global_rank() != 0:
            return
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ledger.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(totals)), encoding="utf-8")
        os.replace(tmp, self.ledger)

    # ---- events ---------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        self._session_start = self.clock()
        self._last_batch = 0
        self.world = dist.get_world_size()
        if self.gpu_type is None:
            self.gpu_type = detect_gpu_type()
        if self.peak_flops is None and self.gpu_type is not None:
            self.peak_flops = get_gpu(self.gpu_type).peak_flops
        self.price = price_per_gpu_hour(self.gpu_type, self.price)
        if self.ledger_template and dist.get_global_rank() == 0:
            self.ledger = Path(self.ledger_template.format(run_name=state.run_name))

    def fit_start(self, state: State, logger: Logger) -> None:
        self._planned = state.max_duration
        self._last_batch = int(state.timestamp.batch)
        prev = self._read_ledger()
        if prev is not None and prev.finished and not self._loaded:
            # The name's earlier run completed: this is a new run, its ledger starts afresh.
            log.info("cost monitor: %s finished before; starting a new ledger", self.ledger)
        elif not self._loaded and self._last_batch > 0:
            # Resumed from a checkpoint without cost totals: what it cost is unknown.
            log.warning(
                "cost monitor: the checkpoint at batch %d carries no cost totals; counting "
                "from this session",
                self._last_batch,
            )
        elif not self._loaded:
            # No checkpoint: a ledger here is an earlier attempt that never saved one.
            self._charge_lost_from_ledger(None)
        self._write_ledger(self.totals(self._last_batch))

    def fit_end(self, state: State, logger: Logger) -> None:
        if _elapsed_fraction(state, self._planned) >= 1.0:
            done = self.totals(self._last_batch)
            done.finished = True
            self._write_ledger(done)

    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_started = self.clock()

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._eval_started is not None:
            self._eval_s += self.clock() - self._eval_started
            self._eval_started = None

    def _eval_total(self, state: State) -> float:
        """Seconds of evaluation this session: Composer's evaluators, plus callbacks that
        evaluate from inside a batch (ICL tasks) and report it as ``eval_seconds``."""
        return self._eval_s + in_batch_eval_seconds(state)

    def batch_start(self, state: State, logger: Logger) -> None:
        now = self.clock()
        if self._window is None:
            self._window = (now - self._eval_total(state), int(state.timestamp.token))
        if self._pace_start is None:
            self._pace_start = (now, _elapsed_fraction(state, self._planned))

    def batch_end(self, state: State, logger: Logger) -> None:
        self._last_batch = int(state.timestamp.batch)
        flops_fn = getattr(state.model, "flops_per_batch", None)
        if callable(flops_fn) and state.batch is not None:
            self._flops += float(flops_fn(state.batch)) * self.world
        self._write_ledger(self.totals(self._last_batch))
        frac = _elapsed_fraction(state, self._planned)
        if self._last_batch % self.log_interval == 0 or frac >= 1.0:
            metrics = self._metrics(state, frac)
            self.last_metrics = metrics
            logger.log_metrics(metrics)

    def _metrics(self, state: State, frac: float) -> dict[str, float]:
        now = self.clock()
        tokens = int(state.timestamp.token)
        totals = self.totals(self._last_batch)
        m: dict[str, float] = {
            "cost/tokens": float(tokens),
            "cost/wall_hours": totals.wall_s / 3600.0,
            "cost/gpu_hours": (totals.gpu_s + totals.lost_gpu_s) / 3600.0,
            "cost/lost_gpu_hours": totals.lost_gpu_s / 3600.0,
            "cost/restarts": float(totals.restarts),
        }
        if self.price is not None:
            m["cost/usd"] = totals.usd + totals.lost_usd
            m["cost/lost_usd"] = totals.lost_usd
        if self._window is not None:
            t0, tok0 = self._window
            dt = (now - self._eval_total(state)) - t0
            if dt > 0:
                tps = (tokens - tok0) / dt
                m["cost/tokens_per_sec"] = tps
                m["cost/tokens_per_sec_per_gpu"] = tps / self.world
                if self.peak_flops and self._flops > 0:
                    mfu = self._flops / dt / self.world / self.peak_flops
                    m["cost/mfu"] = mfu
                    m["cost/hfu"] = hfu_from_mfu(mfu, self.activation_checkpointing)
        self._window = (now - self._eval_total(state), tokens)
        self._flops = 0.0
        if self._pace_start is not None:
            c0, f0 = self._pace_start
            if frac > f0 and now > c0:
                remaining = (1.0 - frac) * (now - c0) / (frac - f0)
                hours = remaining / 3600.0
                m["cost/remaining_hours"] = hours
                m["cost/projected_hours"] = totals.wall_s / 3600.0 + hours
                m["cost/eta_unix"] = now + remaining
                if self.price is not None:
                    m["cost/projected_usd"] = m["cost/usd"] + hours * self.world * self.price
        return m


def _elapsed_fraction(state: State, planned: Time | None) -> float:
    """Fraction of the planned ``max_duration`` done, in its unit.

    Not Composer's ``get_elapsed_duration``: a run stopped early (``state.stop_training()``,
    as the loss guard does) has its ``max_duration`` cut to where it stopped, and would read
    as finished.
    """
    planned = planned or state.max_duration
    if planned is None or planned.value <= 0:
        return 0.0
    return float(state.timestamp.get(planned.unit).value) / float(planned.value)
