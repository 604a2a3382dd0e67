"""Fixtures for training tests: a small MDS dataset from the shipped corpus and tiny specs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
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
    """Run a training command as a user would, from ``cwd``, with the repo importable.

    Output goes to files, not pipes, and the command gets its own process group that is killed
    afterwards: a SIGKILLed rank leaves orphans (checkpoint upload workers) that would otherwise
    hold a pipe open, or outlive the test.
    """
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=full_env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(
            cmd,
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )
    if returncode is None or (check and returncode != 0):
        why = f"timed out after {timeout} s" if returncode is None else f"exited {returncode}"
        raise AssertionError(f"{cmd} {why}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def composer_cmd(nproc: int) -> list[str]:
    return [sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc)]
