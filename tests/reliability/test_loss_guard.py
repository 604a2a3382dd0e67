"""NaN/Inf losses and loss spikes: skipped or stopped, with the step and batch named."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from mpt_train.config import load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.reliability import LossGuard, LossGuardStop
from mpt_train.reliability.config import LossGuardConfig
from mpt_train.reliability.guards import batch_fingerprint
from mpt_train.train.builder import build_trainer, train
from tests.reliability.faults import ScaleOutputs
from tests.train.conftest import tiny_spec


class WatchStep(Callback):
    """Weights before and after step ``step``, and that step's batch fingerprint."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.fingerprint = ""

    def _params(self, state: State) -> dict[str, torch.Tensor]:
        """The weights and the optimizer's moments and step counts."""
        out = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        names = {p: n for n, p in state.model.named_parameters()}
        for p, per_param in state.optimizers[0].state.items():
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    out[f"{names[p]}/{key}"] = value.detach().clone()
        return out

    def batch_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) + 1 == self.step:
            self.before = self._params(state)
            self.fingerprint = batch_fingerprint(state.batch)

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.step:
            self.after = self._params(state)


def fit(spec: dict[str, Any], *callbacks: Callback) -> LossGuard | None:
    """Train; returns the run's loss guard (None when it is off)."""
    trainer = build_trainer(load_config_dict(spec), extra_callbacks=list(callbacks))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return next((c for c in trainer.state.callbacks if isinstance(c, LossGuard)), None)


@pytest.fixture(params=["foreach", "fused"])
def kernel(request: pytest.FixtureRequest) -> str:
    """The AdamW kernel: with ``foreach`` the guard decides on the host before the step; with
    torch's ``fused`` one (the GPU default) on the device, through the kernel's found_inf."""
    return request.param


def guarded(mds_dir: Path, kernel: str, **top: Any) -> dict[str, Any]:
    optimizer = {"name": "decoupled_adamw", "lr": 1e-3, "weight_decay": 1e-5,
                 "implementation": kernel}  # fmt: skip
    return tiny_spec(mds_dir, optimizer=optimizer, **top)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a and b, "the watched step never ran: nothing was compared"
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit_logged(
    caplog: pytest.LogCaptureFixture, spec: dict[str, Any], *callbacks: Callback
) -> tuple[LossGuard | None, list[str]]:
    """Train; returns the loss guard and the lines it logged."""
    with caplog.at_level(logging.WARNING, logger="mpt_train.reliability.guards"):
        guard = fit(spec, *callbacks)
    return guard, [r.getMessage() for r in caplog.records if "loss guard" in r.getMessage()]


def test_nan_loss_is_skipped_and_named(
    mds_dir: Path, in_tmp: Path, caplog: pytest.LogCaptureFixture, kernel: str
) -> None:
    spec = guarded(
        mds_dir, kernel, max_duration="6ba", reliability={"loss_guard": {"on_nonfinite": "skip"}}
    )
    watch = WatchStep(3)
    guard, lines = fit_logged(caplog, spec, ScaleOutputs(3, float("nan")), watch)
    assert guard._on_device == (kernel == "fused")
    assert same(watch.before, watch.after), "a skipped step must leave the weights unchanged"
    assert len(lines) == 1
    assert watch.fingerprint and "step 3: loss is nan" in lines[0]
    assert f"rank0={watch.fingerprint};" in lines[0]
    assert "action: skip" in lines[0]
    rows = {r["step"]: r for r in read_metrics(in_tmp / "runs/tiny/metrics.jsonl")}
    assert max(rows) == 6 and all(
        isinstance(rows[s]["loss/train/total"], float)
        and math.isfinite(rows[s]["loss/train/total"])
        for s in (4, 5, 6)
    ), "training goes on with finite losses after the skipped step"


def test_nan_loss_stops_with_checkpoint_and_diagnostics(
    mds_dir: Path, in_tmp: Path, capsys: pytest.CaptureFixture, kernel: str
) -> None:
    spec = guarded(mds_dir, kernel, max_duration="6ba", save_folder="ckpt", save_interval="10ba")
    watch = WatchStep(3)
    with pytest.raises(LossGuardStop, match="step 3: loss is nan"):
        fit(spec, ScaleOutputs(3, float("inf")), watch)
    # Stopped, not finished: the console counts to the planned 6 batches, and the cost ledger
    # stays open (a finished ledger would make the resumed run a new one, its loss uncharged).
    assert "[batch 3/6]" in capsys.readouterr().out
    assert json.loads((in_tmp / "runs/tiny/cost_ledger.json").read_text())["finished"] is False
    assert (in_tmp / "ckpt/ep0-ba3-rank0.pt").is_file()
    assert (in_tmp / "ckpt/ep0-ba3-rank0.pt.manifest.json").is_file()
    events = json.loads((in_tmp / "runs/tiny/loss_guard.json").read_text())
    assert (
        watch.fingerprint and events[0]["step"] == 3 and events[0]["batch"] == [watch.fingerprint]
    )
    saved = torch.load(in_tmp / "ckpt/ep0-ba3-rank0.pt", weights_only=False)["state"]["model"]
    weights = {k: v for k, v in watch.before.items() if "/" not in k}  # not optimizer state
    before = {f"model.{k}" if not k.startswith("model.") else k: v for k, v in weights.items()}
    assert all(torch.equal(saved[k], before[k]) for k in before), "checkpoint predates the bad step"

    # Resumed, it meets another bad batch: the diagnostics keep the first stop's too.
    with pytest.raises(LossGuardStop, match="step 5: loss is nan"):
        fit(spec, ScaleOutputs(5, float("inf")))
    events = json.loads((in_tmp / "runs/tiny/loss_guard.json").read_text())
    assert [e["step"] for e in events] == [3, 5]

    # The same command, once the cause is fixed, resumes after the bad batch.
    spec["loggers"]["jsonl"] = {"path": "second.jsonl"}
    train(load_config_dict(spec))
    assert sorted(r["step"] for r in read_metrics(in_tmp / "second.jsonl")) == [6]
    assert json.loads((in_tmp / "runs/tiny/cost_ledger.json").read_text())["finished"] is True


def test_loss_spike_is_skipped(
    mds_dir: Path, in_tmp: Path, caplog: pytest.LogCaptureFixture, kernel: str
) -> None:
    guard = {"on_spike": "skip", "min_history": 3, "window": 10, "spike_factor": 2.0}
    spec = guarded(mds_dir, kernel, max_duration="7ba", reliability={"loss_guard": guard})
    watch = WatchStep(6)
    _, lines = fit_logged(caplog, spec, ScaleOutputs(6, 200.0), watch)
    assert same(watch.before, watch.after)
    assert len(lines) == 1 and "step 6: loss" in lines[0] and "spiked" in lines[0], lines


def test_warn_on_nonfinite_logs_and_keeps_the_update(
    mds_dir: Path, in_tmp: Path, caplog: pytest.LogCaptureFixture, kernel: str
) -> None:
    spec = guarded(
        mds_dir, kernel, max_duration="4ba", reliability={"loss_guard": {"on_nonfinite": "warn"}}
    )
    watch = WatchStep(3)
    _, lines = fit_logged(caplog, spec, ScaleOutputs(3, float("nan")), watch)
    assert any(torch.isnan(t).any() for t in watch.after.values()), "warn must not drop it"
    assert "step 3: loss is nan" in lines[0] and all("action: warn" in ln for ln in lines)


def test_guard_off_lets_nan_through(mds_dir: Path, in_tmp: Path) -> None:
    """The control: without the guard the same fault reaches the weights."""
    spec = tiny_spec(mds_dir, max_duration="4ba", reliability={"loss_guard": None})
    watch = WatchStep(3)
    fit(spec, ScaleOutputs(3, float("nan")), watch)
    assert any(torch.isnan(t).any() for t in watch.after.values())


@pytest.mark.parametrize("kind", ["nonfinite", "spike"])
def test_bad_steps_in_a_row_past_the_limit_become_a_stop(
    kind: str, mds_dir: Path, in_tmp: Path, kernel: str
) -> None:
    """``skip`` tolerates ``max_consecutive_skips`` bad steps in a row; the next one stops the
    run (a bad stretch of data or a diverged run is for a human, not for skipping forever)."""
    guard = {"on_nonfinite": "skip", "on_spike": "skip", "max_consecutive_skips": 2,
             "min_history": 2, "window": 10, "spike_factor": 2.0}  # fmt: skip
    spec = guarded(mds_dir, kernel, max_duration="8ba", reliability={"loss_guard": guard})
    factor = float("nan") if kind == "nonfinite" else 200.0
    with pytest.raises(LossGuardStop, match=r"step 5: .*\(3 bad steps in a row\)"):
        fit(spec, *(ScaleOutputs(step, factor) for step in (3, 4, 5)))
    events = json.loads((in_tmp / "runs/tiny/loss_guard.json").read_text())
    assert [(e["step"], e["action"]) for e in events] == [(3, "skip"), (4, "skip"), (5, "stop")]


def test_warn_logs_the_spike_and_keeps_the_update(
    mds_dir: Path, in_tmp: Path, caplog: pytest.LogCaptureFixture, kernel: str
) -> None:
    guard = {"on_spike": "warn", "min_history": 3, "window": 10, "spike_factor": 2.0}
    spec = guarded(mds_dir, kernel, max_duration="7ba", reliability={"loss_guard": guard})
    watch = WatchStep(6)
    _, lines = fit_logged(caplog, spec, ScaleOutputs(6, 200.0), watch)
    assert not same(watch.before, watch.after), "warn must not drop the update"
    assert len(lines) == 1 and "step 6" in lines[0] and "action: warn" in lines[0], lines


def _fake_state(loss: float = 1.0) -> SimpleNamespace:
    """What the guard reads of Composer's State between its events."""
    model = torch.nn.Linear(2, 2)
    return SimpleNamespace(
        loss=torch.tensor(loss), optimizers=[], timestamp=SimpleNamespace(batch=0),
        batch={"input_ids": torch.zeros(1, 4, dtype=torch.long)}, model=model,
    )  # fmt: skip


def _step(guard: LossGuard, *attempts: float) -> None:
    """One batch; each attempt is a try at it (auto microbatching retries after an OOM)."""
    state = _fake_state()
    for loss in attempts:
        guard.before_train_batch(state, None)
        state.loss = torch.tensor(loss)
        guard.after_loss(state, None)
    guard.after_train_batch(state, None)


def test_a_retried_batch_is_judged_on_its_last_attempt_only() -> None:
    guard = LossGuard(LossGuardConfig(on_nonfinite="stop"))
    _step(guard, float("nan"), 2.0)  # the first attempt ran out of memory half way
    assert guard.events == [] and list(guard.history) == [2.0]


def test_a_let_through_nan_does_not_blind_spike_detection() -> None:
    cfg = LossGuardConfig(on_nonfinite="off", on_spike="warn", min_history=3, window=10,
                          spike_factor=2.0)  # fmt: skip
    guard = LossGuard(cfg)
    for loss in (2.0, 2.0, float("nan"), 2.0, 9.0):
        _step(guard, loss)
    assert list(guard.history) == [2.0, 2.0, 2.0]  # the NaN is no reference
    assert [e["verdict"].split(" spiked")[0] for e in guard.events] == ["loss 9.0000"]
