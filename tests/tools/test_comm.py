"""FSDP communication per step, its time on the cluster's links, and the MFU it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpt_train.config import ConfigError, load_config_dict
from mpt_train.tools.comm import CLUSTERS, SingleGPU, interconnect, single_gpu_from_record
from mpt_train.tools.plan import main, make_plan

P_7B = 6_649_286_656
MPT_7B = {
    "max_duration": "1000000000ba",
    "global_train_batch_size": 1024,
    "device_train_microbatch_size": 2,
    "model": {"d_model": 4096, "n_heads": 32, "n_layers": 32, "max_seq_len": 2048},
    "train_loader": {"dataset": {"local": "/unused", "max_seq_len": 2048}},
    "fsdp": {"mixed_precision": "PURE"},
}


def _comm(strategy: str, gpus: int, micro_batch: int = 2, **kw: object):
    fsdp = {**MPT_7B["fsdp"], "sharding_strategy": strategy}
    cfg = load_config_dict({**MPT_7B, "fsdp": fsdp, "device_train_microbatch_size": micro_batch})
    plan = make_plan(cfg, gpus=gpus, gpu="h100", single_gpu=SingleGPU(0.45, False, "t"), **kw)
    assert plan.communication is not None
    return plan


def test_ring_volumes_per_rank_by_strategy() -> None:
    full = _comm("FULL_SHARD", 64).communication
    steps = 1024 // 64 // 2  # micro batches per optimizer step
    ring = 63 / 64
    # bf16 parameters gathered for forward and for backward; bf16 gradients reduce-scattered.
    assert full.all_gather_gb == pytest.approx(steps * 2 * ring * P_7B * 2 / 1e9)
    assert full.reduce_scatter_gb == pytest.approx(steps * ring * P_7B * 2 / 1e9)
    sgo = _comm("SHARD_GRAD_OP", 64).communication
    assert sgo.all_gather_gb == pytest.approx(full.all_gather_gb / 2)
    hsdp = _comm("HYBRID_SHARD", 64).communication
    # Shards inside a node of 8, then the shards' gradients all-reduced across the 8 nodes.
    assert hsdp.all_gather_gb == pytest.approx(steps * 2 * 7 / 8 * P_7B * 2 / 1e9)
    assert hsdp.all_reduce_gb == pytest.approx(steps * 2 * 7 / 8 * P_7B / 8 * 2 / 1e9)
    # Inside one node the collective runs on NVLink; across nodes on the network share.
    h100 = CLUSTERS["h100"]
    assert full.comm_seconds == pytest.approx(
        (full.all_gather_gb + full.reduce_scatter_gb) / h100.network_gbps
    )
    node = _comm("FULL_SHARD", 8).communication
    per_step = (node.all_gather_gb + node.reduce_scatter_gb) / h100.nvlink_gbps
    assert node.comm_seconds == pytest.approx(per_step)


def test_mfu_after_overlap_falls_when_the_network_is_slow() -> None:
    # Micro batches of 8 x 2048 tokens compute longer than the network moves 7B's parameters
    # three times: communication hides behind compute but for one block's share.
    fast = _comm("FULL_SHARD", 64, micro_batch=8)
    assert fast.mfu < 0.45 and fast.mfu == pytest.approx(0.45, abs=0.01)
    # Micro batches of 2 do not: the step waits for the network.
    small = _comm("FULL_SHARD", 64, micro_batch=2)
    assert small.mfu < 0.6 * fast.mfu
    slow = _comm("FULL_SHARD", 64, micro_batch=8, link=interconnect("h100", network_gbps=1.0))
    assert slow.mfu < 0.5 * fast.mfu
    assert slow.days > fast.days and slow.communication.exposed_seconds > 1.0
    eth = interconnect("h100", "ethernet")
    assert eth.network_gbps < CLUSTERS["h100"].network_gbps
    with pytest.raises(ConfigError, match="network_gbps"):
        interconnect("h100", network_gbps=0)


def _record(tmp_path: Path) -> Path:
    path = tmp_path / "2026-12-01-h100.json"
    rows = [
        {"name": "bf16-ac", "mfu": 0.41, "activation_checkpointing": True, "precision": "amp_bf16"},
        {"name": "fp8", "mfu": 0.62, "activation_checkpointing": False, "precision": "amp_fp8"},
        {"name": "cpu", "mfu": None, "activation_checkpointing": False},
    ]
    path.write_text(json.dumps({"date": "2026-12-01", "gpu_type": "h100", "rows": rows}))
    return path


def test_single_gpu_mfu_from_a_record_row_fp8_included(tmp_path: Path) -> None:
    path = _record(tmp_path)
    fp8 = single_gpu_from_record(f"{path}:fp8")
    assert (fp8.mfu, fp8.activation_checkpointing) == (0.62, False)
    ac = single_gpu_from_record(f"{path}:bf16-ac")
    cfg = load_config_dict(MPT_7B)
    # Measured with checkpointing, planned without: the recomputed forward is work done.
    plan = make_plan(cfg, gpus=8, gpu="h100", single_gpu=ac)
    assert plan.communication.single_gpu_mfu == pytest.approx(0.41 * 4 / 3)
    with pytest.raises(ConfigError, match="no row 'nope'"):
        single_gpu_from_record(f"{path}:nope")
    with pytest.raises(ConfigError, match="no measured MFU"):
        single_gpu_from_record(f"{path}:cpu")


def test_cli_prints_memory_and_communication_and_json_carries_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import yaml

    spec = tmp_path / "mpt7b.yaml"
    spec.write_text(yaml.safe_dump(MPT_7B))
    record = _record(tmp_path)
    args = [str(spec), "--gpus", "64", "--gpu", "h100", "--mfu-from", f"{record}:fp8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "largest micro batch that fits" in text and "reduce-scatter" in text
    assert "fp8 (62.00%)" in text
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mem, comm = out["memory"], out["communication"]
    assert {"weights_gb", "gradients_gb", "optimizer_gb", "activations_gb", "fits"} <= set(mem)
    assert {"activations_no_ac_gb", "activations_ac_gb", "framework_overhead_gb"} <= set(mem)
    assert {"all_gather_gb", "reduce_scatter_gb", "comm_seconds", "mfu"} <= set(comm)
    assert out["mfu"] == pytest.approx(comm["mfu"]) and out["mfu"] < 0.62
    assert main([*args[:-2], "--mfu-from", f"{record}:missing"]) == 2
    assert "mfu_from" in capsys.readouterr().err
