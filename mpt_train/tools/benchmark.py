"""Benchmark a spec through the real trainer: one row of llm-foundry's benchmark table.

``scripts/benchmark.py SPEC [a.b=c ...] [--steps 10 --warmup 3] [--json]`` builds the trainer
exactly as ``train.py`` does (:func:`mpt_train.train.builder.build_trainer`), runs a fixed number of
steps with no eval, checkpoint or metrics file, and times the steps after the warm-up ones
(the first steps pay for compilation, allocator growth and data start-up).

MFU/HFU follow :mod:`mpt_train.callbacks.accounting` (llm-foundry's convention). On CPU there is no
meaningful peak: MFU is ``n/a`` unless ``--peak-flops`` gives a nominal one. Peak memory is
CUDA's max allocated on GPU, the process's max resident set on CPU (labelled so).
Multi-GPU: ``composer -n 8 scripts/benchmark.py SPEC``; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.autograd import DeviceType

from mpt_train.callbacks.accounting import detect_gpu_type, get_gpu, hfu_from_mfu, shape_model
from mpt_train.config import ConfigError, RunConfig, load_config
from mpt_train.config.schema import train_seq_len
from mpt_train.data.config import TextLoaderConfig
from mpt_train.errors import run_cli
from mpt_train.tools.idle_gaps import format_gaps, gaps_from_profile, is_annotation

__all__ = ["BenchmarkRow", "StepProfiler", "StepTimer", "format_row", "main", "run_benchmark"]

log = logging.getLogger(__name__)


class StepTimer(Callback):
    """Records (time, tokens, model FLOPs of all ranks) and the loss at the end of every batch.

    On CUDA each batch end records an event and the time between two of them is read after
    the run (:meth:`elapsed`): the timer itself adds no synchronisation to the step. The loss
    is the step's (Composer's average over micro batches and ranks), so two rows of the same
    spec with different throughput options can be compared step by step (same seed, same
    synthetic batches): an option that is faster but changes the numbers shows up there.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[float, int, float]] = []
        self.events: list[torch.cuda.Event] = []
        self.losses: list[float] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        flops_fn = getattr(state.model, "flops_per_batch", None)
        flops = float(flops_fn(state.batch)) * dist.get_world_size() if flops_fn else 0.0
        self.marks.append((time.perf_counter(), int(state.timestamp.token), flops))
        # A float already: Composer reads it back after every optimizer step.
        self.losses.append(float(state.total_loss_dict.get("loss/train/total", math.nan)))

    def elapsed(self, first: int, last: int) -> float:
        """Seconds from the end of batch ``first`` to the end of batch ``last`` (0-based)."""
        if self.events:
            self.events[last].synchronize()
            return self.events[first].elapsed_time(self.events[last]) / 1e3
        return self.marks[last][0] - self.marks[first][0]


class StepProfiler(Callback):
    """``torch.profiler`` over the steps from ``start_batch`` to the end of the run: a Chrome
    trace per rank (open in Perfetto) and a table of the ops that took the time.

    It runs after the timed steps, so the row's figures are not slowed by the profiler.
    """

    def __init__(self, start_batch: int, out_dir: str | Path) -> None:
        self.start_batch = start_batch
        self.out_dir = Path(out_dir)
        self.prof: torch.profiler.profile | None = None
        self.steps = 0
        self.wall = 0.0
        self._t0 = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.prof is None and int(state.timestamp.batch) == self.start_batch:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if not torch.cuda.is_available():  # else Kineto logs a failed GPU probe as an error
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            else:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self._t0 = time.perf_counter()
        if self.prof is not None:
            self.steps += 1

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._t0
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.trace_path()))

    def trace_path(self) -> Path:
        return self.out_dir / f"trace-rank{dist.get_global_rank()}.json"

    def summary(self, top: int = 20) -> str:
        """Per-step wall and device time, and the ``top`` ops by self time (device first)."""
        if self.prof is None or not self.steps:
            return "profile: no step was profiled"
        events = self.prof.events()
        on_gpu = torch.cuda.is_available()
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        busy_ms = _busy_us(events, key) / 1e3 / self.steps
        wall_ms = 1e3 * self.wall / self.steps
        head = f"profile of the last {self.steps} step(s): {wall_ms:.1f} ms/step wall"
        if on_gpu:
            head += f", {busy_ms:.1f} ms/step in GPU kernels ({100 * busy_ms / wall_ms:.0f}% busy)"
        table = self.prof.key_averages().table(sort_by=key, row_limit=top)
        out = f"{head}\ntrace: {self.trace_path()}\n{table}"
        if on_gpu:
            out += "\n" + format_gaps(gaps_from_profile(events), self.steps, wall_ms)
        return out


def _busy_us(events: Sequence[Any], key: str) -> float:
    """Time in kernels (or ops on CPU), each counted once, without ranges that annotate others:
    ``Optimizer.step#AdamW.step`` spans the optimizer's kernels and would count them twice."""

    def on_device(e: Any) -> bool:
        # A kernel is listed twice: as a device event and under the op that launched it.
        return key != "self_device_time_total" or e.device_type == DeviceType.CUDA

    return sum(getattr(e, key) for e in events if not is_annotation(e) and on_device(e))


@dataclass
class BenchmarkRow:
    """The columns of llm-foundry's benchmark tables (plus where peak memory came from)."""

    model: str
    params: int
    seq_len: int
    gpus: int
    gpu: str
    micro_batch: int
    grad_accum: int
    global_batch: int
    mfu: float | None
    hfu: float | None
    tokens_per_sec: float
    tokens_per_sec_per_gpu: float
    peak_memory_gb: float
    memory_kind: str
    precision: str
    sharding: str
    activation_checkpointing: bool
    steps_timed: int
    data: str = "synthetic"
    losses: list[float] = field(default_factory=list)  # every step's, warm-up included


COLUMNS = (
    ("Model", "model"), ("SeqLen (T)", "seq_len"), ("# GPUs", "gpus"), ("GPU", "gpu"),
    ("MFU", "mfu"), ("HFU", "hfu"), ("MicroBatchSize", "micro_batch"),
    ("GradAccum", "grad_accum"), ("GlobalBatchSize", "global_batch"),
    ("Throughput (T/s)", "tokens_per_sec"), ("Throughput (T/s/GPU)", "tokens_per_sec_per_gpu"),
    ("Peak Mem (GB)", "peak_memory_gb"), ("Precision", "precision"),
    ("Sharding Strategy", "sharding"), ("Activation Checkpointing", "activation_checkpointing"),
    ("NumParams", "params"),
)  # fmt: skip


def format_row(row: BenchmarkRow, header: bool = True) -> str:
    """A markdown row in llm-foundry's benchmark-table layout (MFU/HFU in percent)."""

    def cell(key: str) -> str:
        v = getattr(row, key)
        if key in ("mfu", "hfu"):
            return "n/a" if v is None else f"{100 * v:.2f}"
        if key == "peak_memory_gb":
            return f"{v:.2f} ({row.memory_kind})"
        if isinstance(v, float):
            return f"{v:.0f}"
        return str(v)

    line = "| " + " | ".join(cell(k) for _, k in COLUMNS) + " |"
    if not header:
        return line
    names = "| " + " | ".join(n for n, _ in COLUMNS) + " |"
    return "\n".join([names, "|" + " --- |" * len(COLUMNS), line])


def _peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "cpu rss"  # KiB on Linux


def run_benchmark(
    cfg: RunConfig,
    *,
    steps: int = 10,
    warmup: int = 3,
    peak_flops: float | None = None,
    gpu_type: str | None = None,
    name: str = "",
    synthetic: bool = True,
    profiler: StepProfiler | None = None,
) -> BenchmarkRow:
    """Run ``steps`` steps of ``cfg`` through the real trainer and measure the last ones.

    ``synthetic`` (default) swaps the spec's data for random ids of the same shape (see
    :mod:`mpt_train.data.synthetic`): the figures are the model's and the trainer's, with no
    bucket, cache or tokenizer needed. ``synthetic=False`` reads the spec's own data, to see
    whether the loader keeps up. A ``profiler`` runs over the steps after ``steps`` (see
    :class:`StepProfiler`), outside the timed window.
    """
    from dataclasses import replace

    from mpt_train.train.builder import build_trainer

    label = name or cfg.run_name or "mpt"
    if warmup < 1:
        raise ConfigError(
            "warmup", f"got {warmup}, need >= 1 (the first step compiles and warms up)"
        )
    if steps <= warmup:
        raise ConfigError("steps", f"got {steps}, must exceed warmup ({warmup})")
    if synthetic:
        loader = cfg.train_loader or TextLoaderConfig()
        cfg = replace(
            cfg,
            train_loader=replace(
                loader,
                name="synthetic",
                num_workers=0,
                dataset=replace(
                    loader.dataset,
                    remote=None,
                    local=None,
                    streams=None,
                    max_seq_len=train_seq_len(cfg),
                ),
            ),
            finetune_loader=None,
            icl_tasks=[],
        )
    extra_steps = 0
    if profiler is not None:
        profiler.start_batch = steps
        extra_steps = 2
    cfg = replace(
        cfg,
        # Its own name: the spec's run (runs/<run_name>/config.yaml, checkpoints) is left alone.
        run_name=f"benchmark-{label}",
        max_duration=f"{steps + extra_steps}ba",
        # The spec's schedule is for its own max_duration (perhaps in tokens); the steps timed
        # here only need one that is valid in batches. The learning rate does not set speed.
        scheduler=replace(cfg.scheduler, t_warmup="1ba", t_max="1dur"),
        eval_loader=None,
        eval_loaders={},
        eval_subset_num_batches=-1,
        save_folder=None,
        autoresume=False,
        load_path=None,
        loggers=replace(cfg.loggers, jsonl=None, wandb=None, console=False),
    )
    if cfg.callbacks.cost_monitor is not None:
        # A benchmark is not an attempt of the run it borrows the spec from:
        # its steps must not be charged as work lost against that run's ledger, nor vice versa.
        cost = replace(cfg.callbacks.cost_monitor, ledger=False)
        cfg = replace(cfg, callbacks=replace(cfg.callbacks, cost_monitor=cost))
    timer = StepTimer()
    trainer = build_trainer(cfg, extra_callbacks=[timer, *([profiler] if profiler else [])])
    try:
        trainer.fit()
        state = trainer.state
        world = dist.get_world_size()
        precision = str(state.precision.value)
        if cfg.fp8.enabled:  # the matmuls of the blocks' linears run in FP8 under that
            precision += f"+fp8-{cfg.fp8.recipe}"
    finally:
        trainer.close()
    marks = timer.marks[:steps]  # the profiled steps after them are not timed
    (_, tok0, _), (_, tok1, _) = marks[warmup - 1], marks[-1]
    dt = timer.elapsed(warmup - 1, len(marks) - 1)
    flops = sum(f for _, _, f in marks[warmup:])
    gpu_type = gpu_type or detect_gpu_type()
    if peak_flops is None and gpu_type is not None:
        peak_flops = get_gpu(gpu_type).peak_flops
    ac = bool(cfg.fsdp and cfg.fsdp.activation_checkpointing)  # applied with or without FSDP
    mfu = flops / dt / world / peak_flops if peak_flops and flops else None
    per_rank = cfg.global_train_batch_size // world
    micro = cfg.device_train_microbatch_size
    micro = per_rank if not isinstance(micro, int) else micro
    mem, kind = _peak_memory()
    sharding = cfg.fsdp.sharding_strategy if cfg.fsdp is not None and world > 1 else "none"
    return BenchmarkRow(
        model=label,
        params=shape_model(cfg.model).num_params(),  # unsharded count
        seq_len=train_seq_len(cfg),
        gpus=world,
        gpu=gpu_type or ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()),
        micro_batch=micro,
        grad_accum=-(-per_rank // micro),
        global_batch=cfg.global_train_batch_size,
        mfu=mfu,
        hfu=hfu_from_mfu(mfu, ac) if mfu is not None else None,
        tokens_per_sec=(tok1 - tok0) / dt,
        tokens_per_sec_per_gpu=(tok1 - tok0) / dt / world,
        peak_memory_gb=mem,
        memory_kind=kind,
        precision=precision,
        sharding=sharding,
        activation_checkpointing=ac,
        steps_timed=len(marks) - warmup,
        data="synthetic" if synthetic else "spec",
        losses=timer.losses[:steps],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="run spec YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as model.n_layers=4")
    parser.add_argument("--steps", type=int, default=10, help="steps to run in all")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of timing")
    parser.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s")
    parser.add_argument("--gpu", default=None, help="GPU type for the peak (default: detected)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--name", default=None, help="the row's Model column (default: spec name)")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="after the timed steps, profile 2 more: Chrome trace per rank in DIR and a table "
        "of the ops that took the time",
    )
    parser.add_argument(
        "--real-data",
        action="store_true",
        help="read the spec's train_loader instead of synthetic batches of the same shape",
    )
    args = parser.parse_intermixed_args(argv)
    return run_cli(lambda: _run(args), prefix=f"error in run spec {args.spec}")


def _run(args: argparse.Namespace) -> int:
    profiler = StepProfiler(0, args.profile) if args.profile else None
    cfg = load_config(args.spec, args.overrides)
    row = run_benchmark(
        cfg, steps=args.steps, warmup=args.warmup, peak_flops=args.peak_flops,
        gpu_type=args.gpu, name=args.name or Path(args.spec).stem, synthetic=not args.real_data,
        profiler=profiler,
    )  # fmt: skip
    if dist.get_global_rank() == 0:
        if profiler is not None:
            print(profiler.summary(), flush=True)
        out: Any = json.dumps(asdict(row)) if args.json else format_row(row)
        print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
