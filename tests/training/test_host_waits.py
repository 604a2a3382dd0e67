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
from mpt_train.trainer import build_trainer
from tests.training.conftest import tiny_spec

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
