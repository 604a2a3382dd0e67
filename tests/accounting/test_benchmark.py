"""scripts/benchmark.py runs the real trainer on CPU and prints one benchmark-table row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpt_train.benchmark import BenchmarkRow, format_row
from tests.accounting.conftest import SEQ
from tests.helpers import REPO


def test_row_follows_the_llm_foundry_table_and_says_na_without_a_peak() -> None:
    row = BenchmarkRow(
        model="7b",
        params=6_658_859_008,
        seq_len=2048,
        gpus=8,
        gpu="h100",
        micro_batch=6,
        grad_accum=1,
        global_batch=48,
        mfu=None,
        hfu=None,
        tokens_per_sec=85144.0,
        tokens_per_sec_per_gpu=10643.0,
        peak_memory_gb=61.2,
        memory_kind="cuda",
        precision="amp_bf16",
        sharding="FULL_SHARD",
        activation_checkpointing=False,
        steps_timed=7,
    )
    header, _, line = format_row(row).splitlines()
    assert header.startswith("| Model | SeqLen (T) | # GPUs | GPU | MFU | HFU |")
    assert line.startswith("| 7b | 2048 | 8 | h100 | n/a | n/a | 6 | 1 | 48 | 85144 | 10643 |")


@pytest.mark.slow
def test_cpu_benchmark_through_the_trainer_with_a_nominal_peak(
    tmp_path: Path, sweep_mds: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable, str(REPO / "scripts" / "benchmark.py"), str(REPO / "yamls/quickstart.yaml"),
        f"variables.data={sweep_mds}", f"variables.max_seq_len={SEQ}", "model.n_layers=2",
        "global_train_batch_size=4", "--steps", "5", "--warmup", "2", "--peak-flops", "1e11",
        "--json",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["model"] == "quickstart" and row["seq_len"] == SEQ and row["gpus"] == 1
    assert row["global_batch"] == 4 and row["micro_batch"] == 4 and row["steps_timed"] == 3
    assert row["tokens_per_sec"] > 0 and row["tokens_per_sec"] == row["tokens_per_sec_per_gpu"]
    assert 0 < row["mfu"] < 1 and row["hfu"] == row["mfu"]  # no activation checkpointing
    assert row["precision"] == "fp32" and row["sharding"] == "none"
    assert not (tmp_path / "runs").exists() or not list(tmp_path.glob("runs/*/metrics.jsonl"))
