"""FSDP's communication per step at N GPUs, its time on a cluster's links, and the MFU left.

Bytes per rank are the ring-collective volumes NCCL moves: an all-gather or reduce-scatter of
a tensor of S bytes over n ranks sends and receives ``(n - 1) / n * S`` per rank, an
all-reduce twice that. Per micro batch (FSDP2 under Composer gathers and reduces every micro
batch):

* FULL_SHARD: parameters gathered for forward and again for backward, gradients
  reduce-scattered, all over all N ranks.
* SHARD_GRAD_OP: parameters gathered once (kept through backward), gradients reduce-scattered.
* HYBRID_SHARD: FULL_SHARD inside a node, then the shards' gradients all-reduced across nodes.
* NO_SHARD (DDP): fp32 gradients all-reduced over all ranks.

Time is bytes over the achieved bus bandwidth of the slowest link the collective crosses:
NVLink inside a node, the per-GPU network share across nodes. FSDP prefetches the next block's
gather during this block's compute and reduces during backward, so only the excess of
communication over compute is exposed, plus one block's share that nothing can hide (the first
gather, the last reduce-scatter).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mpt_train.errors import ConfigError
from mpt_train.tools.memory import FSDP_DTYPE_BYTES

__all__ = [
    "CLUSTERS",
    "NETWORKS",
    "CommPlan",
    "Interconnect",
    "SingleGPU",
    "format_comm",
    "interconnect",
    "plan_comm",
    "single_gpu_from_record",
    "single_gpu_hfu",
]


@dataclass(frozen=True)
class Interconnect:
    """Achieved NCCL bus bandwidth (GB/s per GPU) inside a node and across nodes."""

    name: str
    nvlink_gbps: float
    network_gbps: float


#: NVLink figures are typical nccl-tests all-gather/reduce-scatter bus bandwidths of a DGX
#: node (A100: NVLink 3, 600 GB/s bidirectional per GPU; H100: NVLink 4, 900 GB/s), about 80%
#: of one direction's link rate. Network figures are 90% of one NIC per GPU: HDR InfiniBand
#: 200 Gb/s on A100 nodes (llm-foundry's A100 tables: 1600 Gb/s per node), NDR 400 Gb/s on
#: H100 nodes.
CLUSTERS: dict[str, Interconnect] = {
    "a100": Interconnect("NVLink 3 + 8x200 Gb/s InfiniBand per node", 240.0, 22.5),
    "h100": Interconnect("NVLink 4 + 8x400 Gb/s InfiniBand per node", 360.0, 45.0),
}
#: Across nodes on Ethernet instead (``--network ethernet``): 400 Gb/s per node (4x100 GbE or
#: one 400 GbE NIC, RoCE), 90% of it shared by 8 GPUs.
NETWORKS: dict[str, float | None] = {"infiniband": None, "ethernet": 400 / 8 / 8 * 0.9}


def cluster_for(gpu: str) -> Interconnect:
    """The interconnect of the usual node for ``gpu`` (A100 or Hopper class)."""
    return CLUSTERS["a100" if gpu.startswith("a100") else "h100"]


def interconnect(
    gpu: str,
    network: str = "infiniband",
    nvlink_gbps: float | None = None,
    network_gbps: float | None = None,
) -> Interconnect:
    """The usual node for ``gpu`` on ``network``, with the user's bandwidths where given."""
    if network not in NETWORKS:
        raise ConfigError("network", f"got {network!r}, expected one of {sorted(NETWORKS)}")
    for key, value in (("nvlink_gbps", nvlink_gbps), ("network_gbps", network_gbps)):
        if value is not None and value <= 0:
            raise ConfigError(key, f"got {value}, expected GB/s > 0")
    base = cluster_for(gpu)
    name, net = base.name, base.network_gbps
    if NETWORKS[network] is not None:
        name, net = f"{name.split(' + ')[0]} + 400 Gb/s Ethernet per node", NETWORKS[network]
    if nvlink_gbps is not None or network_gbps is not None:
        name += " (bandwidths as given)"
    return Interconnect(name, nvlink_gbps or base.nvlink_gbps, network_gbps or net)


@dataclass(frozen=True)
class SingleGPU:
    """A single-GPU MFU to start the communication model from, and how it was measured."""

    mfu: float
    #: None: measured at the plan's own activation checkpointing setting.
    activation_checkpointing: bool | None = None
    source: str = "--mfu"


def single_gpu_from_record(arg: str) -> SingleGPU:
    """``RECORD:ROW``: the measured MFU of row ``ROW`` of benchmark record ``RECORD`` (a
    ``benchmarks/results/*.json`` file). Any precision's row is taken as measured, FP8's too:
    MFU is counted against the bf16 peak in every record."""
    path, sep, row = arg.rpartition(":")
    if not sep or not path or not row:
        raise ConfigError("mfu_from", f"got {arg!r}, expected RECORD.json:ROW")
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("mfu_from", f"{path}: cannot read a benchmark record ({e})") from None
    rows = {r.get("name"): r for r in record.get("rows", []) if isinstance(r, dict)}
    found = rows.get(row)
    if found is None:
        raise ConfigError("mfu_from", f"{path} has no row {row!r}; rows: {sorted(rows)}")
    mfu = found.get("mfu")
    if not isinstance(mfu, (int, float)) or not 0 < mfu <= 100:
        raise ConfigError("mfu_from", f"{path}:{row} has no measured MFU (got {mfu!r})")
    # Records write MFU in percent (benchmark rows print 53.69); accept a fraction too.
    value = mfu / 100 if mfu > 1 else float(mfu)
    ac = bool(found.get("activation_checkpointing", False))
    return SingleGPU(value, ac, f"{Path(path).name}:{row} ({100 * value:.2f}%)")


@dataclass
class CommPlan:
    """Per-rank communication of one optimizer step; ``--json`` carries these fields."""

    sharding: str
    gpus: int
    gpus_per_node: int
    interconnect: str
    nvlink_gbps: float
    network_gbps: float
    all_gather_gb: float
    reduce_scatter_gb: float
    all_reduce_gb: float
    comm_seconds: float
    compute_seconds: float
    exposed_seconds: float
    single_gpu_mfu: float
    mfu: float


def single_gpu_hfu(mfu: float, activation_checkpointing: bool) -> float:
    """The hardware efficiency behind an MFU: recomputed forwards count as work done."""
    return mfu * 4.0 / 3.0 if activation_checkpointing else mfu


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def plan_comm(
    *,
    params: int,
    n_layers: int,
    sharding: str,
    mixed_precision: str,
    gpus: int,
    gpus_per_node: int,
    micro_batches: int,
    flops_per_micro_batch: float,
    peak_flops: float,
    single_gpu_mfu: float,
    measured_with_ac: bool,
    activation_checkpointing: bool,
    link: Interconnect,
) -> CommPlan:
    """Bytes, seconds and the MFU left at ``gpus`` GPUs for one optimizer step."""
    if not 0.0 < single_gpu_mfu <= 1.0:
        raise ConfigError("mfu", f"got {single_gpu_mfu}, expected a fraction in (0, 1]")
    gather, reduce = FSDP_DTYPE_BYTES.get(mixed_precision, (2, 4))
    across = gpus > gpus_per_node
    ag = rs = ar = 0.0
    t = 0.0
    if gpus > 1 and sharding in ("FULL_SHARD", "SHARD_GRAD_OP"):
        bw = link.network_gbps if across else link.nvlink_gbps
        ag = (2 if sharding == "FULL_SHARD" else 1) * _ring(gpus) * params * gather
        rs = _ring(gpus) * params * reduce
        t = (ag + rs) / (bw * 1e9)
    elif gpus > 1 and sharding == "HYBRID_SHARD":
        local = min(gpus, gpus_per_node)
        ag = 2 * _ring(local) * params * gather
        rs = _ring(local) * params * reduce
        ar = 2 * _ring(math.ceil(gpus / local)) * params / local * reduce
        t = (ag + rs) / (link.nvlink_gbps * 1e9) + ar / (link.network_gbps * 1e9)
    elif gpus > 1:  # NO_SHARD: DDP all-reduces fp32 gradients
        ar = 2 * _ring(gpus) * params * 4
        t = ar / ((link.network_gbps if across else link.nvlink_gbps) * 1e9)
    hfu = single_gpu_hfu(single_gpu_mfu, measured_with_ac)
    work = flops_per_micro_batch * (4.0 / 3.0 if activation_checkpointing else 1.0)
    compute = work / (peak_flops * hfu)
    exposed = max(0.0, t - compute) + t / max(n_layers, 1)
    mfu_1 = hfu * (3.0 / 4.0 if activation_checkpointing else 1.0)
    k = micro_batches
    return CommPlan(
        sharding=sharding if gpus > 1 else "NONE",
        gpus=gpus,
        gpus_per_node=gpus_per_node,
        interconnect=link.name,
        nvlink_gbps=link.nvlink_gbps,
        network_gbps=link.network_gbps,
        all_gather_gb=k * ag / 1e9,
        reduce_scatter_gb=k * rs / 1e9,
        all_reduce_gb=k * ar / 1e9,
        comm_seconds=k * t,
        compute_seconds=k * compute,
        exposed_seconds=k * exposed,
        single_gpu_mfu=mfu_1,
        mfu=mfu_1 * compute / (compute + exposed),
    )


def format_comm(c: CommPlan) -> list[str]:
    """The plan's communication lines."""
    if c.gpus == 1:
        return [f"  comm        none on one GPU; MFU {100 * c.mfu:.1f}%"]
    return [
        f"  comm        {c.sharding} on {c.gpus} GPUs ({c.interconnect}: NVLink "
        f"{c.nvlink_gbps:g} GB/s, network {c.network_gbps:g} GB/s per GPU)",
        f"              per rank per step: all-gather {c.all_gather_gb:,.1f} GB, reduce-scatter "
        f"{c.reduce_scatter_gb:,.1f} GB, all-reduce {c.all_reduce_gb:,.1f} GB",
        f"              {c.comm_seconds:.2f} s of communication against {c.compute_seconds:.2f} s"
        f" of compute; {c.exposed_seconds:.2f} s exposed",
        f"              MFU {100 * c.single_gpu_mfu:.1f}% on one GPU -> {100 * c.mfu:.1f}% "
        f"at {c.gpus} GPUs",
    ]
