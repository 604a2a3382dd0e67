"""Shared by tests/export, tests/eval, tests/finetune: train a tiny MPT and keep its checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mpt_train.config import load_config_dict
from mpt_train.train.builder import train
from tests.helpers import make_mds
from tests.train.conftest import tiny_spec


def tiny_mds(factory: pytest.TempPathFactory, seq_len: int = 32) -> Path:
    return make_mds(factory.mktemp(f"mds{seq_len}"), seq_len=seq_len, max_docs=200)


def train_tiny(workdir: Path, data: Path, run_name: str = "tiny", **top: Any) -> Path:
    """Train ``tiny_spec`` for a few batches in ``workdir``; return its monolithic checkpoint."""
    spec = tiny_spec(
        data,
        run_name=run_name,
        max_duration="3ba",
        save_folder=str(workdir / run_name / "ckpt"),
        save_interval="3ba",
        loggers={"console": False},
        **top,
    )
    old = Path.cwd()
    os.chdir(workdir)
    try:
        train(load_config_dict(spec))
    finally:
        os.chdir(old)
    return workdir / run_name / "ckpt" / "ep0-ba3-rank0.pt"
