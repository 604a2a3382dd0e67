"""Nothing reads a device value back between a step's first forward and its optimizer update.

On a GPU every such read (``.item()``, ``.tolist()``, ``float(t)``, ``.cpu()``, ``torch.equal``,
``nonzero``, a tensor made from host numbers) makes the host wait for all the work queued so
far, so the optimizer's kernels are queued only after the whole backward has run and the GPU
idles for the hand-over. On CPU nothing is asynchronous, so the CPU test records the reads
themselves (Python-level calls and the aten ops that read a value); the GPU test lets CUDA's
sync debug mode refuse any synchronisation. With torch's fused AdamW, the clip folded into it
and the loss guard on (the GPU defaults), none may happen inside that window.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch.utils._python_dispatch import TorchDispatchMode

from mpt_train.config import load_config_dict
from mpt_train.train.builder import build_trainer
from tests.train.conftest import tiny_spec

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__",
         "new_tensor")  # fmt: skip
HOST_DATA = ("tensor", "as_tensor")  # host numbers copied to the device: a blocking copy
# aten ops whose result is read on the host (what .item(), torch.equal, if t: ... dispatch to)
READ_OPS = ("_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select")


class ReadOps(TorchDispatchMode):
    def __init__(self, window: HostReads) -> None:
        super().__init__()
        self.window = window

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.window.open and func.overloadpacket.__name__ in READ_OPS:
            self.window.reads.append(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


class HostReads(Callback):
    """Records host reads of tensors from each step's first forward to its AdamW kernel."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = False
        self.steps = 0
        self.reads: list[str] = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._spy(getattr(torch.Tensor, name), name))
        for name in HOST_DATA:
            monkeypatch.setattr(torch, name, self._spy(getattr(torch, name), name))
        kernel = torch._fused_adamw_

        def fused_adamw(*args: Any, **kwargs: Any) -> Any:
            if self.open:
                self.open, self.steps = False, self.steps + 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(torch, "_fused_adamw_", fused_adamw)

    def _spy(self, real: Any, name: str) -> Any:
        def read(*args: Any, **kwargs: Any) -> Any:
            if self.open:
                where = traceback.extract_stack(limit=3)[0]
                self.reads.append(f"{name} at {where.filename}:{where.lineno}")
            return real(*args, **kwargs)

        return read

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self.first_forward = True

    def before_forward(self, state: State, logger: Logger) -> None:
        if self.first_forward:
            self.first_forward, self.open = False, True


def test_no_host_read_between_forward_and_update(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    optimizer = {"name": "decoupled_adamw", "lr": 1e-3, "implementation": "fused"}
    spec = tiny_spec(mds_dir, max_duration="3ba", optimizer=optimizer,
                     device_train_microbatch_size=2,  # two micro batches per step
                     gradient_clipping={"clipping_threshold": 1.0})  # fmt: skip
    trainer = build_trainer(load_config_dict(spec))
    reads = HostReads(monkeypatch)
    trainer.state.callbacks.insert(0, reads)
    try:
        with ReadOps(reads):
            trainer.fit()
    finally:
        trainer.close()
    assert reads.steps == 3, "the window never closed: the fused AdamW kernel did not run"
    assert reads.reads == []


class NoSyncWindow(Callback):
    """Turns CUDA's sync debug mode to ``error`` from each step's first forward until its AdamW
    kernel: any synchronisation in between raises where it happens."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = 0
        kernel = torch._fused_adamw_

        def fused_adamw(*args: Any, **kwargs: Any) -> Any:
            if torch.cuda.get_sync_debug_mode() != 0:
                torch.cuda.set_sync_debug_mode("default")
                self.steps += 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(torch, "_fused_adamw_", fused_adamw)

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self.first_forward = True

    def before_forward(self, state: State, logger: Logger) -> None:
        if self.first_forward:
            self.first_forward = False
            torch.cuda.set_sync_debug_mode("error")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_no_gpu_sync_between_forward_and_update(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, max_duration="3ba", device_train_microbatch_size=2,
                     gradient_clipping={"clipping_threshold": 1.0})  # fmt: skip
    trainer = build_trainer(load_config_dict(spec))  # on a GPU: fused AdamW, bf16
    window = NoSyncWindow(monkeypatch)
    trainer.state.callbacks.insert(0, window)
    try:
        trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    assert window.steps == 3, "the window never closed: the fused AdamW kernel did not run"


class SlowBackward(Callback):
    """Keeps the GPU busy after each backward, before the micro batch's loss is added up:
    a step-end read of the loss that did not wait for it would see a partial sum."""

    def after_backward(self, state: State, logger: Logger) -> None:
        torch.cuda._sleep(50_000_000)


class UpdateStillRunning(Callback):
    """At each next batch's fetch (after every step-end callback, logger and the scheduler):
    whether the update queued on the main stream was still running, and whether the main
    stream is current again."""

    def __init__(self) -> None:
        self.running: list[bool] = []
        self.on_main: list[bool] = []

    def before_dataloader(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) > 0:
            stream = torch.cuda.current_stream()
            self.on_main.append(stream == torch.cuda.default_stream())
            self.running.append(not stream.query())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams need a GPU")
def test_overlap_step_end_runs_the_step_end_beside_the_update(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``overlap_step_end`` the host gets through the step end to the next batch while a
    (deliberately slow) update still runs; without it Composer's loss read waits for the
    update. Both train to the same losses and bitwise the same weights."""
    from mpt_train.loggers.jsonl import read_metrics

    monkeypatch.chdir(tmp_path)
    kernel = torch._fused_adamw_

    def slow_adamw(*args: Any, **kwargs: Any) -> Any:
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the update
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", slow_adamw)
    runs = {}
    for overlap in (False, True):
        spec = tiny_spec(mds_dir, run_name=f"overlap-{overlap}", max_duration="4ba",
                         overlap_step_end=overlap)  # fmt: skip
        watch = UpdateStillRunning()
        trainer = build_trainer(load_config_dict(spec), extra_callbacks=[SlowBackward(), watch])
        try:
            trainer.fit()
        finally:
            trainer.close()
        weights = [p.detach().cpu().clone() for p in trainer.state.model.parameters()]
        losses = [
            r["loss/train/total"]
            for r in read_metrics(tmp_path / f"runs/overlap-{overlap}/metrics.jsonl")
        ]
        runs[overlap] = (watch, weights, losses)
    (off, w_off, l_off), (on, w_on, l_on) = runs[False], runs[True]
    assert off.running == [False] * 3 and on.running == [True] * 3
    assert on.on_main == [True] * 3
    assert l_on == l_off and len(l_on) == 4
    assert all(torch.equal(a, b) for a, b in zip(w_on, w_off, strict=True))


def test_one_rank_counts_samples_and_tokens_on_the_host_as_composer_does(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime

    from composer import Trainer

    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_config_dict(tiny_spec(mds_dir, max_duration="1ba")))
    try:
        waited = datetime.timedelta(seconds=0.25)
        for samples, tokens in ((4, 512), (3, 17)):
            ours = trainer._accumulate_time_across_ranks(samples, tokens, waited)
            composer = Trainer._accumulate_time_across_ranks(trainer, samples, tokens, waited)
            assert ours == composer == (samples, tokens, waited)
    finally:
        trainer.close()
