"""TrainSpeedMonitor: evaluation run from inside a batch (ICL tasks) is not training time.

Composer's real Trainer runs the batches and keeps the clock; a callback stands in for the ICL
tasks by sleeping at one BATCH_END and reporting the seconds as ``eval_seconds``, as
:class:`mpt_train.eval.callback.ICLEvalCallback` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from composer import Trainer
from composer.callbacks import SpeedMonitor
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from mpt_train.callbacks import CostMonitor, TrainSpeedMonitor
from mpt_train.callbacks.accounting import get_gpu
from mpt_train.callbacks.speed_monitor import FP8_SHARE_KEY
from mpt_train.config import load_config_dict
from mpt_train.train.builder import build_trainer
from tests.train.conftest import tiny_spec

PAUSE = 1.0


class _SlowEval(Callback):
    """Evaluates (sleeps) for PAUSE seconds at the end of batch ``at``, reporting the time."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.eval_seconds = 0.0

    def batch_end(self, state: Any, logger: Any) -> None:
        if int(state.timestamp.batch) == self.at:
            t0 = time.monotonic()
            time.sleep(PAUSE)
            self.eval_seconds += time.monotonic() - t0


def _fit(monitor: SpeedMonitor, batches: int = 6) -> dict[str, list[float]]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4 * batches, 4), torch.randint(0, 2, (4 * batches,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    mem = InMemoryLogger()
    Trainer(
        model=model,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        train_dataloader=DataLoader(data, batch_size=4),
        max_duration=f"{batches}ba",
        callbacks=[monitor, _SlowEval(at=2)],
        loggers=[mem],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    ).fit()
    return {k: [float(v) for _, v in rows] for k, rows in mem.data.items()}


def test_in_batch_eval_is_left_out_of_throughput_and_counted_as_eval() -> None:
    """With one-batch windows every window is a few milliseconds of training; the second of
    evaluation after batch 2 shows up in ``time/val``, not in batch 3's throughput."""
    m = _fit(TrainSpeedMonitor(window_size=1))
    rates = m["throughput/batches_per_sec"]
    assert len(rates) == 5 and min(rates) > 3 / PAUSE, rates
    assert m["time/val"][-1] * 3600 >= PAUSE
    assert m["time/train"][-1] * 3600 < PAUSE


def test_composers_monitor_counts_it_as_training() -> None:
    """What the subclass corrects: Composer's own monitor reports batch 3 as a slow batch."""
    m = _fit(SpeedMonitor(window_size=1))
    rates = m["throughput/batches_per_sec"]
    assert min(rates) < 1 / PAUSE, rates
    assert m["time/val"][-1] == 0.0


def test_the_total_is_kept_in_checkpoints() -> None:
    """A resumed run goes on subtracting what earlier sessions spent; checkpoints written by
    Composer's own monitor (no such key) load as zero."""
    a = TrainSpeedMonitor()
    a.in_batch_eval_wct, a.total_eval_wct = 12.5, 20.0
    b = TrainSpeedMonitor()
    b.load_state_dict(a.state_dict())
    assert (b.in_batch_eval_wct, b.total_eval_wct) == (12.5, 20.0)
    c = TrainSpeedMonitor()
    c.load_state_dict({"total_eval_wct": 3.0})
    assert (c.in_batch_eval_wct, c.total_eval_wct) == (0.0, 3.0)


@pytest.mark.parametrize("gpu_type", ["h100_nvl", "h200_nvl"])
def test_both_monitors_take_the_peak_of_the_named_gpu(
    gpu_type: str, sweep_mds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MFU in ``throughput/`` (the console line) and ``cost/`` uses one peak, from mpt-train's
    table: Composer's lookup has no H100 NVL and would read an H200 NVL as an H200 SXM."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(sweep_mds, cost={"gpu_type": gpu_type})
    spec["callbacks"]["speed_monitor"].pop("gpu_flops_available")
    trainer = build_trainer(load_config_dict(spec))
    [speed] = [c for c in trainer.state.callbacks if isinstance(c, TrainSpeedMonitor)]
    [cost] = [c for c in trainer.state.callbacks if isinstance(c, CostMonitor)]
    assert speed.gpu_flops_available == cost.peak_flops == get_gpu(gpu_type).peak_flops
    trainer.close()


def test_fp8_runs_log_mfu_against_bf16_and_the_fp8_peak_share_beside_it() -> None:
    """One MFU convention for every run; the FP8 share is the same FLOP/s over the FP8 peak."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    model.flops_per_batch = lambda batch: 1.0e6
    mem = InMemoryLogger()
    monitor = TrainSpeedMonitor(window_size=1, gpu_flops_available=1.0e9, fp8_peak_flops=2.0e9)
    Trainer(
        model=model,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        train_dataloader=DataLoader(data, batch_size=4),
        max_duration="4ba",
        callbacks=[monitor],
        loggers=[mem],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    ).fit()
    mfu = [v for _, v in mem.data["throughput/device/mfu"]]
    share = [v for _, v in mem.data[FP8_SHARE_KEY]]
    assert len(mfu) == len(share) == 3 and all(m > 0 for m in mfu)
    assert share == pytest.approx([m / 2 for m in mfu])


def test_an_fp8_spec_takes_both_peaks_of_the_named_gpu(
    sweep_mds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(sweep_mds, cost={"gpu_type": "h100"}, fp8={"enabled": True})
    spec["callbacks"]["speed_monitor"].pop("gpu_flops_available")
    trainer = build_trainer(load_config_dict(spec))
    [speed] = [c for c in trainer.state.callbacks if isinstance(c, TrainSpeedMonitor)]
    assert (speed.gpu_flops_available, speed.fp8_peak_flops) == (989e12, 1979e12)
    trainer.close()
