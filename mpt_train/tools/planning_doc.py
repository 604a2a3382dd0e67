"""docs/planning.md, generated: MPT-7B and MPT-30B plans beside llm-foundry's published MFU.

``python scripts/planning_doc.py`` rewrites the page; ``--check`` exits 1 when the page differs
from what the planner and the benchmark records give now (a test runs the same comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpt_train.callbacks.accounting import duration_tokens
from mpt_train.config import load_config
from mpt_train.config.schema import train_seq_len
from mpt_train.tools.comm import CLUSTERS, SingleGPU
from mpt_train.tools.memory import estimate_memory
from mpt_train.tools.plan import Plan, make_plan

__all__ = ["PUBLISHED", "Published", "main", "measured_rows", "render"]

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "planning.md"
RESULTS = ROOT / "benchmarks" / "results"
SPECS = {"MPT-7B": "yamls/mpt-7b.yaml", "MPT-30B": "yamls/mpt-30b.yaml"}
GPUS = (8, 64, 440)
GPU_TYPES = ("a100_40gb", "h100")
#: The measured single-H100 rows the plans start from: the largest model measured, without
#: and with activation checkpointing.
SOURCE_ROWS = {False: "mpt-3b", True: "mpt-3b-ac"}
LLM_FOUNDRY = (
    "https://github.com/mosaicml/llm-foundry/blob/main/scripts/train/benchmarking/README.md"
)


@dataclass(frozen=True)
class Published:
    """One row of llm-foundry's benchmarking tables (seq 2048, FULL_SHARD)."""

    model: str
    gpus: int
    gpu: str
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    mixed_precision: str
    mfu: float


PUBLISHED = (
    Published("MPT-7B", 8, "h100", 6, 1, False, "DEFAULT", 46.44),
    Published("MPT-7B", 128, "h100", 6, 1, False, "DEFAULT", 45.71),
    Published("MPT-7B", 8, "a100_40gb", 12, 4, True, "PURE", 50.92),
    Published("MPT-7B", 64, "a100_40gb", 18, 1, True, "PURE", 50.73),
    Published("MPT-7B", 128, "a100_40gb", 18, 1, True, "PURE", 50.14),
    Published("MPT-30B", 8, "h100", 3, 21, True, "DEFAULT", 38.11),
    Published("MPT-30B", 128, "h100", 8, 1, True, "DEFAULT", 41.85),
    Published("MPT-30B", 32, "a100_40gb", 4, 1, True, "PURE", 51.74),
    Published("MPT-30B", 128, "a100_40gb", 6, 1, True, "PURE", 52.25),
)


def measured_rows(gpu_type: str = "h100") -> dict[str, tuple[dict[str, Any], str]]:
    """Each benchmark row's newest measurement on ``gpu_type``: (its fields, record file)."""
    try:
        from mpt_train.tools.records import latest_rows  # type: ignore[import-not-found]
    except ImportError:  # the record format read directly, newest file last
        out: dict[str, tuple[dict[str, Any], str]] = {}
        for path in sorted(RESULTS.glob(f"*-{gpu_type}.json")) + sorted(
            RESULTS.glob(f"*-{gpu_type}-*.json")
        ):
            for row in json.loads(path.read_text(encoding="utf-8"))["rows"]:
                out[row["name"]] = (row, path.name)
        return out
    return {
        name: (asdict(m.row), m.record.path.name if m.record.path else m.record.date)
        for name, m in latest_rows(gpu_type, RESULTS).items()
    }


def _sources() -> dict[bool, SingleGPU]:
    rows = measured_rows("h100")
    out = {}
    for ac, name in SOURCE_ROWS.items():
        if name not in rows:
            raise SystemExit(f"error: no H100 benchmark record has row {name!r} under {RESULTS}")
        row, record = rows[name]
        out[ac] = SingleGPU(
            float(row["mfu"]), bool(row["activation_checkpointing"]), f"{record}:{name}"
        )
    return out


def _plan(
    spec: str, gpus: int, gpu: str, sources: dict[bool, SingleGPU]
) -> tuple[Plan | None, int]:
    """The faster of: the largest micro batch that fits without activation checkpointing, and
    the largest with it (None when neither fits)."""
    cfg = load_config(ROOT / spec)
    tokens = duration_tokens(cfg.max_duration, cfg.global_train_batch_size, train_seq_len(cfg))
    batch = max(gpus, round(cfg.global_train_batch_size / gpus) * gpus)
    base = [
        f"global_train_batch_size={batch}",
        f"max_duration={tokens}tok",
        "scheduler.t_warmup=0.01dur",
        "device_train_microbatch_size=1",
    ]
    probe = estimate_memory(
        load_config(ROOT / spec, [*base, "fsdp.activation_checkpointing=false"]), gpus=gpus, gpu=gpu
    )
    plans = []
    for mb, ac in ((probe.max_micro_batch, False), (probe.max_micro_batch_ac, True)):
        if mb:
            over = [
                *base,
                f"device_train_microbatch_size={mb}",
                f"fsdp.activation_checkpointing={ac}",
            ]
            cfg = load_config(ROOT / spec, over)
            plans.append(make_plan(cfg, gpus=gpus, gpu=gpu, single_gpu=sources[ac]))
    best = max(plans, key=lambda p: (round(p.mfu, 4), len(plans) - plans.index(p)), default=None)
    return best, batch


def _plans_table(sources: dict[bool, SingleGPU]) -> list[str]:
    lines = [
        "| model | GPUs | global batch | fits | micro batch | activation checkpointing "
        "| peak GB per rank | predicted MFU | days | cost |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for model, spec in SPECS.items():
        for gpu in GPU_TYPES:
            for gpus in GPUS:
                plan, batch = _plan(spec, gpus, gpu, sources)
                where = f"{gpus} x {gpu}"
                if plan is None or plan.memory is None:
                    lines.append(f"| {model} | {where} | {batch} | no | - | - | - | - | - | - |")
                    continue
                m = plan.memory
                lines.append(
                    f"| {model} | {where} | {batch} | yes | {m.micro_batch} "
                    f"| {'yes' if m.activation_checkpointing else 'no'} | {m.total_gb:.1f} "
                    f"| {100 * plan.mfu:.1f}% | {plan.days:.1f} | ${plan.cost_usd:,.0f} |"
                )
    return lines


def _compare_table(sources: dict[bool, SingleGPU]) -> list[str]:
    lines = [
        "| model | GPUs | llm-foundry setting | published MFU | predicted MFU | difference "
        "| fits here |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for p in PUBLISHED:
        batch = p.gpus * p.micro_batch * p.grad_accum
        over = [
            f"global_train_batch_size={batch}",
            f"device_train_microbatch_size={p.micro_batch}",
            f"fsdp.activation_checkpointing={p.activation_checkpointing}",
            f"fsdp.mixed_precision={p.mixed_precision}",
            "max_duration=1000ba",
            "scheduler.t_warmup=10ba",
        ]
        plan = make_plan(
            load_config(ROOT / SPECS[p.model], over),
            gpus=p.gpus,
            gpu=p.gpu,
            single_gpu=sources[p.activation_checkpointing],
        )
        assert plan.memory is not None
        setting = (
            f"{p.micro_batch} x {p.grad_accum}, AC {'on' if p.activation_checkpointing else 'off'}"
            f", {p.mixed_precision}"
        )
        lines.append(
            f"| {p.model} | {p.gpus} x {p.gpu} | {setting} | {p.mfu:.2f}% | {100 * plan.mfu:.2f}%"
            f" | {100 * plan.mfu - p.mfu:+.2f} points | {'yes' if plan.memory.fits else 'no'} |"
        )
    return lines


def render() -> str:
    """The whole page, from the planner and the newest H100 records."""
    sources = _sources()
    a100, h100 = CLUSTERS["a100"], CLUSTERS["h100"]
    src = "; ".join(
        f"{'with' if ac else 'without'} activation checkpointing: {s.source} "
        f"({100 * s.mfu:.2f}% MFU)"
        for ac, s in sources.items()
    )
    parts = [
        "## Memory, communication and MFU at scale",
        "",
        "`scripts/plan.py SPEC --gpus N --gpu TYPE` answers, before any GPU is rented: tokens, "
        "FLOPs, days and dollars; per rank, the weights, gradients, optimizer state, compute "
        "copies, activations per micro batch (with and without activation checkpointing) and "
        "framework overhead, whether that fits the card and the largest micro batch that does; "
        "and FSDP's all-gather and reduce-scatter bytes per step with their time on the "
        "cluster's links and the MFU left after overlapping them with compute. `--json` carries "
        "every field.",
        "",
        "```bash",
        "python scripts/plan.py yamls/mpt-7b.yaml --gpus 64 --gpu h100 \\",
        "    --mfu-from benchmarks/results/2026-11-27-h100.json:mpt-3b",
        "python scripts/sweep.py SWEEP.yaml --plan --gpus 64 --gpu h100   # every point, before launch",
        "```",
        "",
        "### How the figures are made",
        "",
        "- **Memory** (`mpt_train/tools/memory.py`): bytes per parameter (fp32 master weights 4, "
        "gradients 4, AdamW moments 8 or Lion's 4, divided over the ranks sharing them; the bf16 "
        "copy autocast makes on one rank, or FSDP's gathered blocks) and bytes per activation "
        "(what one block saves for backward, 34 bytes per d_model element per token at "
        "expansion ratio 4, the fp32 block input alone under activation checkpointing, and the "
        "loss head: 2 bytes per vocabulary entry per token compiled, 12 eager, per chunk with "
        "`loss.chunk_tokens`). `tests/tools/test_memory.py` holds the prediction within 15% of "
        "every peak measured in `benchmarks/results/`.",
        "- **Communication** (`mpt_train/tools/comm.py`): ring volumes per rank per micro batch; "
        f"A100 nodes at {a100.nvlink_gbps:g} GB/s NVLink and {a100.network_gbps:g} GB/s per GPU "
        f"across nodes, H100 nodes at {h100.nvlink_gbps:g} and {h100.network_gbps:g} "
        "(`--nvlink-gbps`, `--network-gbps`, `--network ethernet` override). Exposed time is "
        "what communication takes beyond compute, plus one block's share.",
        f"- **Single-GPU MFU**: the measured one-H100 rows of the largest model, {src}. A row "
        "measured with or without checkpointing converts through its HFU. No A100 has been "
        "measured here, so the A100 plans assume the H100's efficiency; llm-foundry's A100 "
        "rows are higher than its H100 rows, and the differences below show by how much.",
        "- Global batches are the specs' (1024 and 2048 sequences of 2048 tokens), rounded to "
        "a multiple of the GPU count; tokens stay the specs' (134B and 600B). Micro batch and "
        "checkpointing: the faster of the largest micro batch that fits without activation "
        "checkpointing and the largest that fits with it. Prices: "
        "the default per-GPU-hour rates of `mpt_train/callbacks/accounting.py`.",
        "",
        "### MPT-7B and MPT-30B plans",
        "",
        *_plans_table(sources),
        "",
        "### Against llm-foundry's published multi-GPU MFU",
        "",
        f"The rows of llm-foundry's [benchmarking tables]({LLM_FOUNDRY}) at seq 2048, FULL_SHARD, "
        "planned with the same GPU count, micro batch, accumulation, checkpointing and mixed "
        "precision (`fits here`: whether this stack's memory model fits that setting).",
        "",
        *_compare_table(sources),
    ]
    return "\n".join(parts)


BEGIN = "<!-- generated by python scripts/planning_doc.py: edit the generator, not this part -->"
END = "<!-- end of generated part -->"


def generated_part(page: str) -> str | None:
    """The generated section of ``page`` (None when it has none)."""
    if BEGIN not in page or END not in page:
        return None
    return page.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def with_part(page: str, part: str) -> str:
    """``page`` with its generated section replaced by ``part`` (appended when missing)."""
    block = f"{BEGIN}\n{part}\n{END}"
    if generated_part(page) is None:
        return f"{page.rstrip()}\n\n{block}\n"
    head, rest = page.split(BEGIN, 1)
    return f"{head}{block}{rest.split(END, 1)[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planning_doc.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    text = render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else "# Planning runs\n"
    if args.check:
        if generated_part(current) != text:
            print(f"{PAGE} is stale: run python scripts/planning_doc.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(with_part(current, text), encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0
