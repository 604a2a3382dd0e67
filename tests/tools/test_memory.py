"""The memory model against every measured peak in the benchmark records, and its fit answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mpt_train.config import load_config, load_config_dict
from mpt_train.tools.memory import estimate_memory
from mpt_train.tools.planning_doc import RESULTS, measured_rows

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"h100": ROOT / "yamls" / "benchmarks" / "h100.yaml"}


def _measured_peaks(gpu_type: str) -> dict[str, tuple[float, str]]:
    """Each row's newest measured peak (GB, record file) on ``gpu_type``."""
    return {
        name: (float(row["peak_memory_gb"]), record)
        for name, (row, record) in measured_rows(gpu_type).items()
        if row.get("memory_kind") == "cuda" and row.get("peak_memory_gb")
    }


def _benchmark_rows(gpu_type: str) -> dict[str, dict]:
    table = yaml.safe_load(TABLES[gpu_type].read_text(encoding="utf-8"))
    return {row["name"]: row for row in table["rows"]}


def test_prediction_within_15_percent_of_every_measured_peak() -> None:
    """A new record re-checks the model: every row with a measured peak is held to 15%."""
    peaks = _measured_peaks("h100")
    assert peaks, f"no H100 benchmark record with a measured peak under {RESULTS}"
    rows = _benchmark_rows("h100")
    report = []
    for name, (measured, record) in sorted(peaks.items()):
        row = rows[name]  # a record row names its row in yamls/benchmarks/h100.yaml
        cfg = load_config(ROOT / row["spec"], row.get("overrides", []))
        predicted = estimate_memory(cfg, gpus=1, gpu="h100").peak_allocated_gb
        report.append((name, record, predicted, measured, predicted / measured - 1))
    worst = max(report, key=lambda r: abs(r[-1]))
    lines = "\n".join(
        f"{n} ({rec}): {p:.1f} vs {m:.1f} GB ({100 * e:+.1f}%)" for n, rec, p, m, e in report
    )
    assert abs(worst[-1]) <= 0.15, lines


def test_fit_and_largest_micro_batch_follow_the_card_and_sharding() -> None:
    """MPT-7B: a whole replica does not fit one 80 GB card; sharded over 8 it does, and a 40 GB
    card takes a smaller micro batch than an 80 GB one, and more with checkpointing."""
    spec = ROOT / "yamls" / "mpt-7b.yaml"
    one = estimate_memory(load_config(spec, ["global_train_batch_size=8"]), gpus=1, gpu="h100")
    assert not one.fits and one.max_micro_batch == 0
    assert one.weights_gb == pytest.approx(6.649 * 4, rel=1e-3)  # fp32 master weights
    assert one.optimizer_gb == pytest.approx(6.649 * 8, rel=1e-3)  # two AdamW moments
    cfg = load_config(spec, ["global_train_batch_size=256"])
    h100 = estimate_memory(cfg, gpus=8, gpu="h100")
    a100 = estimate_memory(cfg, gpus=8, gpu="a100_40gb")
    assert h100.fits and h100.optimizer_gb == pytest.approx(one.optimizer_gb / 8)
    assert h100.max_micro_batch > a100.max_micro_batch >= 1
    assert a100.max_micro_batch_ac > a100.max_micro_batch
    lion = estimate_memory(
        load_config(spec, ["global_train_batch_size=256", "optimizer.name=decoupled_lionw"]),
        gpus=8,
        gpu="h100",
    )
    assert lion.optimizer_gb == pytest.approx(h100.optimizer_gb / 2)
    # SHARD_GRAD_OP keeps the whole bf16 model gathered through backward: more per rank.
    sgo = load_config(spec, ["global_train_batch_size=256", "fsdp.sharding_strategy=SHARD_GRAD_OP"])
    assert estimate_memory(sgo, gpus=8, gpu="h100").compute_copies_gb > 6.6 * 2
    # HYBRID_SHARD shards inside a node only: at 64 GPUs it holds 8x the state FULL_SHARD does.
    hsdp = load_config(spec, ["global_train_batch_size=256", "fsdp.sharding_strategy=HYBRID_SHARD"])
    full64 = estimate_memory(cfg, gpus=64, gpu="h100")
    assert estimate_memory(hsdp, gpus=64, gpu="h100").optimizer_gb == pytest.approx(
        8 * full64.optimizer_gb
    )


def test_activations_shrink_with_checkpointing_chunking_and_a_compiled_loss() -> None:
    base = {
        "max_duration": "10ba",
        "global_train_batch_size": 4,
        "device_train_microbatch_size": 4,
        "model": {"d_model": 2048, "n_heads": 16, "n_layers": 24, "max_seq_len": 2048},
        "train_loader": {"dataset": {"local": "/unused", "max_seq_len": 2048}},
    }

    def act(**over: object) -> float:
        return estimate_memory(
            load_config_dict({**base, **over}), gpus=1, gpu="h100"
        ).activations_gb

    eager = act(compile={"enabled": False})
    compiled = act(compile={"enabled": True, "loss": True})
    chunked = act(compile={"enabled": True, "loss": True}, loss={"chunk_tokens": 1024})
    ac = act(compile={"enabled": True, "loss": True}, fsdp={"activation_checkpointing": True})
    assert eager > compiled > chunked > ac
