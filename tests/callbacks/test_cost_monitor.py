"""CostMonitor: totals, MFU, projections, and restarts that neither drop nor double-count work.

The unit tests drive the callback's events with a fake clock and a duck-typed state (the few
State attributes it reads); the last test runs Composer's real Trainer, checkpoints, crashes
and autoresumes, so the state_dict/load_state_dict wiring is Composer's own.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from composer import Trainer
from composer.core import Callback, Time, Timestamp
from torch.utils.data import DataLoader, TensorDataset

from mpt_train.callbacks import CostMonitor

HOUR = 3600.0
PEAK = 312e12


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeLogger:
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.rows.append(dict(metrics))


class FakeModel:
    """Reports a fixed FLOPs per (per-rank) batch, like ComposerMPT.flops_per_batch."""

    def __init__(self, flops: float) -> None:
        self.flops = flops

    def flops_per_batch(self, batch: object) -> float:
        return self.flops


class FakeState:
    """The State attributes the monitor reads: timestamp, model, batch, run_name, duration."""

    def __init__(self, max_batches: int, tokens_per_batch: int, flops: float = 0.0) -> None:
        self.max_batches = max_batches
        self.tokens_per_batch = tokens_per_batch
        self.timestamp = Timestamp()
        self.model = FakeModel(flops)
        self.batch = {"input_ids": torch.zeros(1, 1)}
        self.run_name = "run"
        self.callbacks: list[object] = []

    def at(self, batch: int) -> FakeState:
        self.timestamp = Timestamp(batch=batch, token=batch * self.tokens_per_batch)
        return self

    @property
    def max_duration(self) -> Time[int]:
        return Time(self.max_batches, "ba")


def start(mon: CostMonitor, state: FakeState, logger: FakeLogger, ckpt: dict | None = None) -> None:
    """Trainer.__init__ (INIT, then checkpoint load) and fit start."""
    mon.init(state, logger)  # type: ignore[arg-type]
    if ckpt is not None:
        mon.load_state_dict(pickle.loads(pickle.dumps(ckpt)))  # as stored in a checkpoint
    mon.fit_start(state, logger)  # type: ignore[arg-type]


def run_batches(
    mon: CostMonitor,
    state: FakeState,
    logger: FakeLogger,
    clock: FakeClock,
    batches: range,
    step_s: float = HOUR,
) -> None:
    for b in batches:
        state.at(b - 1)
        mon.batch_start(state, logger)  # type: ignore[arg-type]
        clock.t += step_s
        state.at(b)
        mon.batch_end(state, logger)  # type: ignore[arg-type]


def monitor(tmp_path: Path, clock: FakeClock, **kw: object) -> CostMonitor:
    kw.setdefault("gpu_type", "a100_40gb")
    kw.setdefault("price_per_gpu_hour", 2.0)
    return CostMonitor(
        log_interval=1,
        ledger_path=str(tmp_path / "{run_name}" / "ledger.json"),
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def eight_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight ranks, whether or not an earlier test has a (one-rank) process group up."""
    monkeypatch.setattr("composer.utils.dist.get_world_size", lambda: 8)


def test_fresh_run_counts_gpu_hours_dollars_and_projects_the_end(
    tmp_path: Path, eight_gpus: None
) -> None:
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=10, tokens_per_batch=1000)
    mon = monitor(tmp_path, clock)
    start(mon, state, log)
    run_batches(mon, state, log, clock, range(1, 6))
    m = log.rows[-1]
    assert m["cost/tokens"] == 5000
    assert m["cost/wall_hours"] == pytest.approx(5.0)
    assert m["cost/gpu_hours"] == pytest.approx(40.0)  # 5 h x 8 GPUs
    assert m["cost/usd"] == pytest.approx(80.0)  # x $2
    assert m["cost/tokens_per_sec"] == pytest.approx(1000 / HOUR)
    assert m["cost/tokens_per_sec_per_gpu"] == pytest.approx(1000 / HOUR / 8)
    assert m["cost/remaining_hours"] == pytest.approx(5.0)
    assert m["cost/projected_hours"] == pytest.approx(10.0)
    assert m["cost/projected_usd"] == pytest.approx(160.0)
    assert m["cost/eta_unix"] == pytest.approx(clock.t + 5 * HOUR)
    assert m["cost/lost_gpu_hours"] == 0.0 and m["cost/restarts"] == 0
    # No FLOPs reported by the model: no MFU rather than a made-up one.
    assert "cost/mfu" not in m


def test_mfu_hfu_and_eval_time_excluded_from_throughput(tmp_path: Path, eight_gpus: None) -> None:
    clock, log = FakeClock(), FakeLogger()
    # Per-rank FLOPs per batch that keep each GPU at half its peak for one hour.
    state = FakeState(max_batches=10, tokens_per_batch=1000, flops=0.5 * PEAK * HOUR)
    mon = monitor(tmp_path, clock, activation_checkpointing=True)
    start(mon, state, log)
    run_batches(mon, state, log, clock, range(1, 2))
    assert log.rows[-1]["cost/mfu"] == pytest.approx(0.5)
    assert log.rows[-1]["cost/hfu"] == pytest.approx(0.5 * 4 / 3)
    mon.eval_start(state, log)  # type: ignore[arg-type]
    clock.t += HOUR
    mon.eval_end(state, log)  # type: ignore[arg-type]
    run_batches(mon, state, log, clock, range(2, 3))
    m = log.rows[-1]
    assert m["cost/mfu"] == pytest.approx(0.5)
    assert m["cost/tokens_per_sec"] == pytest.approx(1000 / HOUR)
    assert m["cost/wall_hours"] == pytest.approx(3.0)  # eval time is still paid for


def test_icl_time_inside_a_batch_is_excluded_from_throughput(
    tmp_path: Path, eight_gpus: None
) -> None:
    """ICL tasks evaluate from inside BATCH_END, outside Composer's eval events; the time
    they report (``eval_seconds``) is paid for but is not training time."""
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=10, tokens_per_batch=1000, flops=0.5 * PEAK * HOUR)
    icl = type("ICL", (), {"eval_seconds": 0.0})()
    state.callbacks.append(icl)
    mon = monitor(tmp_path, clock)
    start(mon, state, log)
    run_batches(mon, state, log, clock, range(1, 2))
    clock.t += 2 * HOUR  # an ICL evaluation at the end of batch 1
    icl.eval_seconds += 2 * HOUR
    run_batches(mon, state, log, clock, range(2, 3))
    m = log.rows[-1]
    assert m["cost/tokens_per_sec"] == pytest.approx(1000 / HOUR)
    assert m["cost/mfu"] == pytest.approx(0.5)
    assert m["cost/wall_hours"] == pytest.approx(4.0)


def test_a_new_run_under_a_finished_runs_name_is_not_a_restart(
    tmp_path: Path, eight_gpus: None
) -> None:
    """Re-running a finished spec (a sweep re-run, a smoke test twice) starts a new ledger:
    the earlier run's hours are not charged as work lost."""
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=3, tokens_per_batch=1000)
    a = monitor(tmp_path, clock)
    start(a, state, log)
    run_batches(a, state, log, clock, range(1, 4))
    a.fit_end(state, log)  # type: ignore[arg-type]
    assert json.loads((tmp_path / "run" / "ledger.json").read_text())["finished"] is True

    b = monitor(tmp_path, clock)
    start(b, state.at(0), log)
    run_batches(b, state, log, clock, range(1, 4))
    m = log.rows[-1]
    assert m["cost/restarts"] == 0 and m["cost/lost_gpu_hours"] == 0.0
    assert m["cost/gpu_hours"] == pytest.approx(3 * 8)


def test_no_price_and_no_gpu_on_cpu_logs_hours_but_no_dollars_or_mfu(tmp_path: Path) -> None:
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=4, tokens_per_batch=10, flops=1e9)
    mon = CostMonitor(gpu_type=None, log_interval=1, ledger_path=None, clock=clock)
    start(mon, state, log)
    run_batches(mon, state, log, clock, range(1, 3), step_s=2.0)
    m = log.rows[-1]
    assert m["cost/gpu_hours"] == pytest.approx(4.0 / HOUR)
    assert "cost/usd" not in m and "cost/mfu" not in m
    # A nominal peak given by the user makes MFU reportable on CPU.
    mon2 = CostMonitor(peak_flops=1e9, log_interval=1, ledger_path=None, clock=clock)
    start(mon2, state.at(0), log)
    run_batches(mon2, state, log, clock, range(1, 2), step_s=2.0)
    assert log.rows[-1]["cost/mfu"] == pytest.approx(0.5)


def test_kill_and_resume_keeps_counting_and_reports_lost_work_once(
    tmp_path: Path, eight_gpus: None
) -> None:
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=10, tokens_per_batch=1000)

    # Attempt 1: checkpoint after batch 4, killed after batch 6 (2 hours of work lost).
    a = monitor(tmp_path, clock)
    start(a, state, log)
    run_batches(a, state, log, clock, range(1, 5))
    ckpt4 = a.state_dict()
    run_batches(a, state, log, clock, range(5, 7))
    assert json.loads((tmp_path / "run" / "ledger.json").read_text())["batch"] == 6

    # Attempt 2 starts after a 30-minute outage (no GPUs held) and resumes from batch 4.
    clock.t += 0.5 * HOUR
    b = monitor(tmp_path, clock)
    start(b, state.at(4), log, ckpt4)
    run_batches(b, state, log, clock, range(5, 11))
    m = log.rows[-1]
    assert m["cost/tokens"] == 10_000
    assert m["cost/wall_hours"] == pytest.approx(10.0)  # 4 h before the save + 6 h after
    assert m["cost/lost_gpu_hours"] == pytest.approx(16.0)  # batches 5-6 of attempt 1, x 8
    assert m["cost/gpu_hours"] == pytest.approx(96.0)  # (10 + 2) h x 8: paid, nothing hidden
    assert m["cost/usd"] == pytest.approx(192.0)
    assert m["cost/lost_usd"] == pytest.approx(32.0)
    assert m["cost/restarts"] == 1
    assert m["cost/remaining_hours"] == pytest.approx(0.0)


def test_second_crash_before_the_next_checkpoint_does_not_double_count(
    tmp_path: Path, eight_gpus: None
) -> None:
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=10, tokens_per_batch=1000)
    a = monitor(tmp_path, clock)
    start(a, state, log)
    run_batches(a, state, log, clock, range(1, 5))
    ckpt4 = a.state_dict()
    run_batches(a, state, log, clock, range(5, 7))  # 2 h lost

    b = monitor(tmp_path, clock)
    start(b, state.at(4), log, ckpt4)
    run_batches(b, state, log, clock, range(5, 6))  # attempt 2 dies after 1 more hour

    c = monitor(tmp_path, clock)
    start(c, state.at(4), log, ckpt4)  # the same checkpoint again
    # The ledger is rewritten at once: a third crash right now adds nothing twice.
    d = monitor(tmp_path, clock)
    start(d, state.at(4), log, ckpt4)
    run_batches(d, state, log, clock, range(5, 11))
    m = log.rows[-1]
    assert m["cost/restarts"] == 3
    # Lost: 2 h of attempt 1 and 1 h of attempt 2, each counted once (ledger granularity is
    # one batch: a batch in flight at the crash is not counted).
    assert m["cost/lost_gpu_hours"] == pytest.approx((2.0 + 1.0) * 8)
    assert m["cost/wall_hours"] == pytest.approx(10.0)


def test_crash_before_first_checkpoint_counts_the_attempt_as_lost(
    tmp_path: Path, eight_gpus: None
) -> None:
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=4, tokens_per_batch=1000)
    a = monitor(tmp_path, clock)
    start(a, state, log)
    run_batches(a, state, log, clock, range(1, 3))  # no checkpoint yet, then killed

    b = monitor(tmp_path, clock)
    start(b, state.at(0), log)  # restarts from scratch: nothing to load
    run_batches(b, state, log, clock, range(1, 5))
    m = log.rows[-1]
    assert m["cost/lost_gpu_hours"] == pytest.approx(16.0)
    assert m["cost/wall_hours"] == pytest.approx(4.0)
    assert m["cost/restarts"] == 1


def test_state_dict_is_plain_data_and_round_trips(tmp_path: Path) -> None:
    clock, log = FakeClock(), FakeLogger()
    state = FakeState(max_batches=10, tokens_per_batch=1)
    a = monitor(tmp_path, clock)
    start(a, state, log)
    run_batches(a, state, log, clock, range(1, 4))
    sd = a.state_dict()
    assert json.loads(json.dumps(sd)) == sd
    b = CostMonitor(ledger_path=None, clock=clock, price_per_gpu_hour=2.0)
    b.init(state, log)  # type: ignore[arg-type]
    b.load_state_dict(sd)
    assert b.totals().wall_s == pytest.approx(3 * HOUR)
    assert b.totals().usd == pytest.approx(6.0)


class _Tick(Callback):
    """Advances the fake clock by one 'second' per batch; optionally crashes at a batch."""

    def __init__(self, clock: FakeClock, crash_at: int | None = None) -> None:
        self.clock = clock
        self.crash_at = crash_at

    def batch_start(self, state: Any, logger: Any) -> None:
        self.clock.t += 1.0

    def batch_end(self, state: Any, logger: Any) -> None:
        if self.crash_at is not None and int(state.timestamp.batch) == self.crash_at:
            raise RuntimeError("simulated node failure")


def _trainer(tmp_path: Path, callbacks: list[Callback]) -> Trainer:
    from composer.models import ComposerClassifier

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    return Trainer(
        model=model,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        train_dataloader=DataLoader(data, batch_size=4),
        max_duration="6ba",
        run_name="resume-test",
        save_folder=str(tmp_path / "ckpt"),
        save_interval="2ba",
        autoresume=True,
        callbacks=callbacks,
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )


def test_composer_checkpoint_kill_and_autoresume(tmp_path: Path) -> None:
    """Composer saves and restores the totals; the redone batch is lost work, counted once."""
    clock = FakeClock()
    ledger = str(tmp_path / "{run_name}.json")
    first = CostMonitor(gpu_type="h100", log_interval=1, ledger_path=ledger, clock=clock)
    t1 = _trainer(tmp_path, [first, _Tick(clock, crash_at=5)])
    with pytest.raises(RuntimeError, match="simulated"):
        t1.fit()
    t1.close()
    assert first.totals().wall_s == pytest.approx(5.0)  # batch 5 ran; the last save was at 4

    second = CostMonitor(gpu_type="h100", log_interval=1, ledger_path=ledger, clock=clock)
    t2 = _trainer(tmp_path, [second, _Tick(clock)])
    assert int(t2.state.timestamp.batch) == 4  # resumed from the checkpoint
    t2.fit()
    t2.close()
    m = second.last_metrics
    assert m["cost/wall_hours"] * HOUR == pytest.approx(6.0)  # 4 s to the save + 2 s after
    assert m["cost/lost_gpu_hours"] * HOUR == pytest.approx(1.0)  # batch 5 of attempt 1
    assert m["cost/gpu_hours"] * HOUR == pytest.approx(7.0)
    assert m["cost/usd"] == pytest.approx(7.0 / HOUR * 3.0)  # h100 default price
    assert m["cost/restarts"] == 1
