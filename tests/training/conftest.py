"""Fixtures for training tests: a small MDS dataset from the shipped corpus and tiny specs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO, make_mds

SEQ = 32


@pytest.fixture(scope="session")
def mds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenized MDS dataset (train/ and val/) of a slice of the shipped corpus."""
    return make_mds(tmp_path_factory.mktemp("mds"), seq_len=SEQ, max_docs=400)


def tiny_spec(data: str | Path, **top: Any) -> dict[str, Any]:
    """A complete run spec for a ~0.1M-parameter MPT that trains in seconds on CPU."""
    spec: dict[str, Any] = {
        "run_name": "tiny",
        "seed": 7,
        "model": {
            "d_model": 32,
            "n_heads": 2,
            "n_layers": 2,
            "max_seq_len": SEQ,
            "vocab_size": 8192,
            "attn_config": {"impl": "torch"},
        },
        "tokenizer": {"name": "mpt-train/tiny-bpe"},
        "train_loader": {
            "dataset": {"local": str(data), "split": "train", "max_seq_len": SEQ, "shuffle": True},
            "num_workers": 0,
        },
        "max_duration": "8ba",
        "global_train_batch_size": 4,
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-3, "weight_decay": 1e-5},
        "scheduler": {"t_warmup": "2ba"},
        "loggers": {"console_log_interval": "1ba"},
        "callbacks": {"speed_monitor": {"window_size": 2, "gpu_flops_available": 1.0e12}},
    }
    spec.update(top)
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a training command as a user would, from ``cwd``, with the repo importable."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def composer_cmd(nproc: int) -> list[str]:
    return [sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc)]
