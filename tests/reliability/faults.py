"""Fault injection and bookkeeping callbacks shared by the reliability tests and fault_run.py.

``SampleLedger`` records, per rank and step, a hash of every sample the step trained on, and at
the end of training the full (unsharded) weights: the evidence for "no sample seen twice or
skipped" and "final weights equal an uninterrupted run".
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def sample_hashes(batch: dict[str, torch.Tensor]) -> list[str]:
    ids = batch["input_ids"].detach().cpu().to(torch.int64)
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in ids]


def grad_norm(model: torch.nn.Module) -> float:
    """The global L2 norm of the gradient, whole (sharded gradients are gathered: every rank
    must call this)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            total += g.detach().double().pow(2).sum()
    return float(total.sqrt())


class SampleLedger(Callback):
    """Appends ``{"step", "rank", "samples", "grad_norm"}`` lines to ``<prefix>.rank<r>.jsonl``
    (the norm of the averaged gradient before clipping); saves the full weights to
    ``<prefix>.weights.pt`` (rank 0) at the end of training."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self.norm = float("nan")

    def after_backward(self, state: State, logger: Logger) -> None:
        self.norm = grad_norm(state.model)  # reduced across ranks, not yet clipped

    def batch_end(self, state: State, logger: Logger) -> None:
        rank = dist.get_global_rank()
        row = {
            "step": int(state.timestamp.batch),
            "rank": rank,
            "samples": sample_hashes(state.batch),
            "grad_norm": self.norm,
        }
        with open(f"{self.prefix}.rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def fit_end(self, state: State, logger: Logger) -> None:
        weights = {}
        for name, p in state.model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            weights[name] = full.detach().cpu().clone()
        if dist.get_global_rank() == 0:
            torch.save(weights, f"{self.prefix}.weights.pt")


class KillAtBatch(Callback):
    """SIGKILL ``rank`` at the start of batch ``batch + 1``: mid-run, after batch ``batch``."""

    def __init__(self, batch: int, rank: int) -> None:
        self.batch, self.rank = batch, rank

    def before_forward(self, state: State, logger: Logger) -> None:
        # Mid-step: the batch is loaded and its forward is about to run.
        if int(state.timestamp.batch) == self.batch and dist.get_global_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


class KillNodeAtBatch(Callback):
    """SIGKILL every process of node ``node`` (its launcher, every rank) in the middle of batch
    ``batch + 1``, as when a machine is lost; the wall time of the kill goes to ``stamp``.

    The node's first rank does it with ``killpg``: a node's launcher and ranks share one
    process group (see tests/nodes.py)."""

    def __init__(self, batch: int, node: int, stamp: str | Path) -> None:
        self.batch, self.node, self.stamp = batch, node, Path(stamp)

    def before_forward(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) != self.batch or dist.get_local_rank() != 0:
            return
        if dist.get_node_rank() == self.node:
            self.stamp.write_text(repr(time.time()))
            os.killpg(os.getpgrp(), signal.SIGKILL)


class SleepAtBatch(Callback):
    """Make ``rank`` stop making progress for ``seconds`` in the middle of batch ``batch + 1``
    (a hung data read or kernel); the others wait for it in their next collective."""

    def __init__(self, batch: int, rank: int, seconds: float) -> None:
        self.batch, self.rank, self.seconds = batch, rank, seconds

    def before_forward(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch and dist.get_global_rank() == self.rank:
            time.sleep(self.seconds)


def kill_during_save(batch: int) -> None:
    """Make the monolithic save at ``batch`` die half-way through writing its file."""
    from composer.utils import checkpoint

    original = checkpoint._write_checkpoint_file

    def write(state_dict: dict[str, Any], filename: str) -> None:
        original(state_dict, filename)
        if f"-ba{batch}-" in os.path.basename(filename):
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._write_checkpoint_file = write


def kill_before_manifest(batch: int) -> None:
    """Die after the save at ``batch`` has written its files, before its manifest (while the
    files are being hashed): the window in which old checkpoints must still exist."""
    from mpt_train.reliability import checkpoints

    original = checkpoints.describe_files

    def describe(paths: list[Path], folder: Path) -> dict[str, Any]:
        if any(f"-ba{batch}-" in Path(p).name for p in paths):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(paths, folder)

    checkpoints.describe_files = describe


class ScaleOutputs(Callback):
    """Multiply the logits of step ``step`` by ``factor`` (nan: a NaN loss; large: a spike)."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor

    def after_forward(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) + 1 == self.step:
            state.outputs = state.outputs * self.factor


class ReplaceFolderWithFile(Callback):
    """At the end of batch ``batch`` replace ``folder`` by a file (moving it aside), as when a
    mount disappears: the next save must fail naming the path."""

    def __init__(self, batch: int, folder: Path) -> None:
        self.batch, self.folder = batch, folder

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            os.replace(self.folder, self.folder.with_name(self.folder.name + ".moved"))
            self.folder.write_text("not a folder")


class StopAfter(Callback):
    """End training cleanly after batch ``batch`` (max_duration, and so the lr schedule, stay
    those of the full run until then)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            state.stop_training()
