"""Plan a run before renting GPUs: tokens, FLOPs, wall time, GPU-hours, dollars, deadline.

``scripts/plan.py SPEC --gpus 440 --gpu a100_40gb`` reads the spec's model and ``max_duration``,
counts the FLOPs with the model's own formula (the one Composer's MFU uses) and divides by what
the cluster delivers at a given MFU.

The default MFU is the one MosaicML's published MPT-7B run implies, so a plan for a new run is
calibrated on a real one: MPT-7B, 1T tokens, 440 A100-40GB, ~9.5 days, ~$200k at $2/GPU-hour.
With this model's formula, 6 * 6.649e9 * 1e12 + 12 * 32 * 4096 * 2048 * 1e12 = 4.31e22 FLOPs,
and 440 * 312e12 FLOP/s * 9.5 days = 1.127e23 peak FLOPs, so the run implied an MFU of 0.383
(llm-foundry's convention: 3x forward FLOPs, attention included, no activation recompute).
That is in line with llm-foundry's own benchmark tables for a 7B at 2048 tokens (40-46%).

Every plan also carries the per-rank memory (:mod:`mpt_train.tools.memory`: does it fit, the
largest micro batch that does) and FSDP's communication (:mod:`mpt_train.tools.comm`). Given a
single-GPU MFU (``--mfu``, or ``--mfu-from RECORD:ROW`` from a benchmark record), the plan runs
at what that MFU leaves after communication at the requested GPU count; without one it runs at
the published run's cluster MFU above.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mpt_train.callbacks.accounting import (
    GPU_TYPES,
    duration_tokens,
    get_gpu,
    price_per_gpu_hour,
)
from mpt_train.config import RunConfig, load_config
from mpt_train.config.checks import check_spec
from mpt_train.config.schema import train_seq_len
from mpt_train.config.validate import check_batch_split, valid_world_sizes
from mpt_train.errors import ConfigError, run_cli
from mpt_train.tools.comm import (
    CommPlan,
    Interconnect,
    SingleGPU,
    cluster_for,
    format_comm,
    interconnect,
    plan_comm,
    single_gpu_from_record,
)
from mpt_train.tools.memory import MemoryPlan, estimate_memory, format_memory, meta_model

__all__ = [
    "MPT_7B_PUBLISHED",
    "PUBLISHED_MFU",
    "Plan",
    "PublishedRun",
    "format_markdown",
    "format_text",
    "implied_mfu",
    "main",
    "make_plan",
]

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class PublishedRun:
    """A run whose size, hardware and duration were published: the planner's calibration."""

    name: str
    tokens: float
    gpus: int
    gpu_type: str
    days: float
    cost_usd: float


MPT_7B_PUBLISHED = PublishedRun("mpt-7b", 1e12, 440, "a100_40gb", 9.5, 200_000.0)


def implied_mfu(flops: float, run: PublishedRun) -> float:
    """The MFU at which ``flops`` take ``run.days`` on ``run``'s cluster."""
    peak = run.gpus * get_gpu(run.gpu_type).peak_flops * run.days * SECONDS_PER_DAY
    return flops / peak


# MPT-7B's 4.31e22 FLOPs (see the module docstring) over its cluster's 1.127e23 peak FLOPs.
# tests/tools/test_plan.py recomputes it from the model so it cannot drift.
PUBLISHED_MFU = 0.383


@dataclass
class Plan:
    """Everything the planner prints; ``--json`` emits exactly these fields."""

    spec: str
    params: int
    seq_len: int
    global_batch_tokens: int
    tokens: int
    flops_per_token: float
    flops: float
    gpus: int
    gpu: str
    peak_flops_per_gpu: float
    mfu: float
    tokens_per_sec: float
    tokens_per_sec_per_gpu: float
    seconds: float
    days: float
    gpu_hours: float
    price_per_gpu_hour: float
    cost_usd: float
    deadline_days: float | None = None
    gpus_for_deadline: int | None = None
    nodes_for_deadline: int | None = None
    #: device_train_microbatch_size to use at gpus_for_deadline, when the spec's does not fit.
    microbatch_for_deadline: int | None = None
    #: GPUs the deadline needs by compute alone (gpus_for_deadline rounds up to a batch split).
    min_gpus_for_deadline: int | None = None
    gpus_per_node: int = 8
    #: Per-rank peak memory and whether it fits (``mpt_train.tools.memory``).
    memory: MemoryPlan | None = None
    #: Per-step communication and the MFU left after it (``mpt_train.tools.comm``).
    communication: CommPlan | None = None
    #: Where ``mfu`` came from: the published run, a single-GPU figure, or a record row.
    mfu_source: str = "published MPT-7B run (440 A100-40GB)"


def make_plan(
    cfg: RunConfig,
    *,
    gpus: int,
    gpu: str,
    mfu: float = PUBLISHED_MFU,
    price: float | None = None,
    deadline_days: float | None = None,
    gpus_per_node: int = 8,
    spec_name: str = "",
    single_gpu: SingleGPU | None = None,
    link: Interconnect | None = None,
) -> Plan:
    """Plan ``cfg`` on ``gpus`` GPUs of type ``gpu`` running at ``mfu``.

    With ``single_gpu`` the plan runs at the MFU its figure leaves after FSDP's communication
    at ``gpus`` GPUs over ``link`` (default: the usual node for ``gpu``) instead of ``mfu``.
    """
    if gpus < 1:
        raise ConfigError("gpus", f"got {gpus}, expected >= 1")
    if not 0.0 < mfu <= 1.0:
        raise ConfigError("mfu", f"got {mfu}, expected a fraction in (0, 1]")
    if deadline_days is not None and deadline_days <= 0:
        raise ConfigError("deadline_days", f"got {deadline_days}, expected > 0")
    spec = get_gpu(gpu, "gpu")
    _check_gpus(cfg, gpus)
    # What training would refuse; not the LR schedule, which a plan at another length
    # (max_duration=1e9tok) need not match.
    check_spec(cfg, gpus, schedule=False)
    seq_len = train_seq_len(cfg)
    tokens = duration_tokens(cfg.max_duration, cfg.global_train_batch_size, seq_len)
    model = meta_model(cfg.model)  # the model's own FLOPs formula, as Composer's MFU uses
    fpt = float(model.flops_per_batch(1, seq_len)) / seq_len
    params = model.num_params()
    flops = fpt * tokens
    memory = estimate_memory(cfg, gpus=gpus, gpu=gpu, gpus_per_node=gpus_per_node)
    start = single_gpu or SingleGPU(mfu, memory.activation_checkpointing, "")
    comm = plan_comm(
        params=params,
        n_layers=cfg.model.n_layers,
        sharding=memory.sharding,
        mixed_precision=cfg.fsdp.mixed_precision if cfg.fsdp else "DEFAULT",
        gpus=gpus,
        gpus_per_node=gpus_per_node,
        micro_batches=memory.grad_accum,
        flops_per_micro_batch=fpt * memory.micro_batch * seq_len,
        peak_flops=spec.peak_flops,
        single_gpu_mfu=start.mfu,
        measured_with_ac=memory.activation_checkpointing
        if start.activation_checkpointing is None
        else start.activation_checkpointing,
        activation_checkpointing=memory.activation_checkpointing,
        link=link or cluster_for(spec.name),
    )
    if single_gpu is not None:
        mfu = comm.mfu
    cluster_flops = gpus * spec.peak_flops * mfu
    seconds = flops / cluster_flops
    gpu_hours = gpus * seconds / 3600.0
    usd_per_hour = price_per_gpu_hour(gpu, price)
    assert usd_per_hour is not None  # gpu is always given here
    plan = Plan(
        spec=spec_name,
        params=params,
        seq_len=seq_len,
        global_batch_tokens=cfg.global_train_batch_size * seq_len,
        tokens=tokens,
        flops_per_token=fpt,
        flops=flops,
        gpus=gpus,
        gpu=spec.name,
        peak_flops_per_gpu=spec.peak_flops,
        mfu=mfu,
        tokens_per_sec=cluster_flops / fpt,
        tokens_per_sec_per_gpu=cluster_flops / fpt / gpus,
        seconds=seconds,
        days=seconds / SECONDS_PER_DAY,
        gpu_hours=gpu_hours,
        price_per_gpu_hour=usd_per_hour,
        cost_usd=gpu_hours * usd_per_hour,
        memory=memory,
        communication=comm,
    )
    if single_gpu is not None:
        plan.mfu_source = f"{single_gpu.source}, after communication at {gpus} GPUs"
    elif mfu != PUBLISHED_MFU:
        plan.mfu_source = "given"
    if deadline_days is not None:
        # GPU-hours (and so dollars) do not depend on the GPU count at a fixed MFU; only time does.
        need = math.ceil(flops / (spec.peak_flops * mfu * deadline_days * SECONDS_PER_DAY))
        batch = cfg.global_train_batch_size
        fits = [n for n in range(need, batch + 1) if batch % n == 0]
        if not fits:
            raise ConfigError(
                "deadline_days",
                f"{deadline_days:g} days needs {need} GPUs, more than global_train_batch_size "
                f"{batch} can be split across; raise the batch or the deadline",
            )
        plan.min_gpus_for_deadline = need
        # The smallest count the spec runs on as written, else the smallest the batch splits
        # across (with a smaller microbatch).
        as_written = [n for n in valid_world_sizes(cfg, batch) if n >= need]
        need = as_written[0] if as_written else fits[0]
        per_rank, mb = batch // need, cfg.device_train_microbatch_size
        if isinstance(mb, int) and per_rank % mb:
            # Splitting wider leaves fewer samples per rank: the microbatch has to follow.
            plan.microbatch_for_deadline = max(d for d in range(1, mb + 1) if per_rank % d == 0)
        plan.deadline_days = deadline_days
        plan.gpus_for_deadline = need
        plan.nodes_for_deadline = math.ceil(need / gpus_per_node)
        plan.gpus_per_node = gpus_per_node
    return plan


def _check_gpus(cfg: RunConfig, gpus: int) -> None:
    """A plan the trainer would refuse to run is no plan: the batch must split across ``gpus``."""
    try:
        check_batch_split(cfg, gpus)
    except ConfigError as e:
        near = valid_world_sizes(cfg, 2 * gpus)
        lower = [n for n in near if n < gpus][-1:]
        higher = [n for n in near if n > gpus][:1]
        options = " or ".join(str(n) for n in lower + higher) or "fewer"
        batch, mb = cfg.global_train_batch_size, cfg.device_train_microbatch_size
        if batch % gpus == 0 and isinstance(mb, int):
            # The batch splits; only the microbatch is too large for what each rank gets.
            fit = max(d for d in range(1, mb + 1) if (batch // gpus) % d == 0)
            options += f", or keep {gpus} with device_train_microbatch_size={fit}"
        raise ConfigError(
            "gpus", f"{gpus} GPUs: {e}; the nearest GPU counts that fit: {options}"
        ) from None


def _si(v: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}"
    return f"{v:.0f}"


def format_text(p: Plan) -> str:
    """The human-readable plan."""
    lines = [
        f"plan for {p.spec or 'spec'}",
        f"  model       {_si(p.params)} params, seq {p.seq_len}, "
        f"global batch {_si(p.global_batch_tokens)} tokens",
        f"  tokens      {p.tokens:.4g} ({_si(p.tokens)})",
        f"  FLOPs       {p.flops:.4g} ({p.flops_per_token:.4g} per token, llm-foundry convention)",
        f"  cluster     {p.gpus} x {p.gpu} at {p.peak_flops_per_gpu / 1e12:.0f} TFLOP/s peak, "
        f"MFU {100 * p.mfu:.1f}%",
        f"  throughput  {_si(p.tokens_per_sec)} tokens/s ({p.tokens_per_sec_per_gpu:,.0f} per GPU)",
        f"  wall time   {p.days:.2f} days ({p.seconds / 3600:,.1f} h)",
        f"  GPU-hours   {p.gpu_hours:,.0f}",
        f"  cost        ${p.cost_usd:,.0f} at ${p.price_per_gpu_hour:.2f}/GPU-hour",
        f"  MFU from    {p.mfu_source}",
    ]
    if p.memory is not None:
        lines += format_memory(p.memory)
    if p.communication is not None:
        lines += format_comm(p.communication)
    if p.deadline_days is not None:
        assert p.gpus_for_deadline is not None and p.min_gpus_for_deadline is not None
        done = p.days * p.gpus / p.gpus_for_deadline
        split = ""
        if p.gpus_for_deadline != p.min_gpus_for_deadline:
            split = f" (compute alone needs {p.min_gpus_for_deadline}; the batch splits across this many)"
        lines.append(
            f"  deadline    {p.deadline_days:g} days: {p.gpus_for_deadline} GPUs "
            f"({p.nodes_for_deadline} nodes of {p.gpus_per_node}){split}, done in {done:.2f} "
            "days; same GPU-hours and cost"
        )
        if p.microbatch_for_deadline is not None:
            lines.append(
                f"              there, set device_train_microbatch_size={p.microbatch_for_deadline}"
                f" (the per-rank batch is {p.global_batch_tokens // p.seq_len // p.gpus_for_deadline})"
            )
    return "\n".join(lines)


MARKDOWN_HEADER = (
    "| spec | params | tokens | FLOPs | GPUs | MFU | days | GPU-hours | $/GPU-h | cost |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def format_markdown(p: Plan, header: bool = True) -> str:
    """One README table row (with the header unless ``header`` is False)."""
    row = (
        f"| {p.spec} | {_si(p.params)} | {_si(p.tokens)} | {p.flops:.3g} | {p.gpus} x {p.gpu} "
        f"| {100 * p.mfu:.1f}% | {p.days:.2f} | {p.gpu_hours:,.0f} | {p.price_per_gpu_hour:.2f} "
        f"| ${p.cost_usd:,.0f} |"
    )
    return f"{MARKDOWN_HEADER}\n{row}" if header else row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plan.py", description="Tokens, FLOPs, time, GPU-hours and cost of a run spec."
    )
    parser.add_argument("spec", help="run spec YAML, e.g. yamls/mpt-7b-1t.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as max_duration=1e9tok")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpu", required=True, choices=sorted(GPU_TYPES), help="GPU type")
    mfu = parser.add_mutually_exclusive_group()
    mfu.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="single-GPU MFU (at the spec's activation checkpointing); the plan runs at what "
        f"it leaves after communication. Default: {PUBLISHED_MFU}, what MPT-7B's 440-GPU "
        "run implies, taken as the cluster's MFU",
    )
    mfu.add_argument(
        "--mfu-from",
        metavar="RECORD:ROW",
        help="single-GPU MFU measured in a benchmark record, e.g. "
        "benchmarks/results/2026-12-07-h100.json:mpt-3b",
    )
    parser.add_argument(
        "--network", default="infiniband", choices=("infiniband", "ethernet"), help="across nodes"
    )
    parser.add_argument("--nvlink-gbps", type=float, help="NVLink bus bandwidth, GB/s per GPU")
    parser.add_argument("--network-gbps", type=float, help="network bandwidth, GB/s per GPU")
    parser.add_argument("--price", type=float, default=None, help="USD per GPU-hour")
    parser.add_argument("--deadline-days", type=float, default=None, help="GPUs to finish by this")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object")
    out.add_argument("--markdown", action="store_true", help="a README table row")
    args = parser.parse_intermixed_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    single = None
    if args.mfu_from:
        single = single_gpu_from_record(args.mfu_from)
    elif args.mfu is not None:
        single = SingleGPU(args.mfu, None, f"--mfu {args.mfu:g}")
    plan = make_plan(
        load_config(args.spec, args.overrides),
        gpus=args.gpus,
        gpu=args.gpu,
        single_gpu=single,
        link=interconnect(args.gpu, args.network, args.nvlink_gbps, args.network_gbps),
        price=args.price,
        deadline_days=args.deadline_days,
        gpus_per_node=args.gpus_per_node,
        spec_name=args.spec,
    )
    if args.json:
        print(json.dumps({**asdict(plan), "cost_usd": round(plan.cost_usd, 2)}))
    elif args.markdown:
        print(format_markdown(plan))
    else:
        print(format_text(plan))
    return 0
