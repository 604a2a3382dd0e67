"""Dated benchmark records: the measurements every figure in the docs comes from.

A record is ``benchmarks/results/<YYYY-MM-DD>-<gpu_type>[-N].json``: the date, the GPU, the
software stack it ran on, the command, and the rows (every field of
:class:`~mpt_train.tools.benchmark.BenchmarkRow`, named as in ``yamls/benchmarks/``), with an
optional ``attention`` section (``scripts/bench_attention.py``'s kernels alone). Records are
never edited after the fact: a new measurement is a new record, and the docs show, per row,
the newest one (:func:`latest_rows`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mpt_train.errors import ConfigError
from mpt_train.tools.benchmark import BenchmarkRow

__all__ = [
    "RESULTS",
    "AttentionRow",
    "Measured",
    "Record",
    "latest_attention",
    "latest_rows",
    "load_records",
    "record_path",
    "stack_line",
]

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})-([a-z0-9_]+?)(?:-(\d+))?\.json$")
STACK_KEYS = ("torch", "composer", "streaming", "cuda", "cudnn", "python", "name")
REQUIRED_STACK = ("torch", "composer", "cuda")
ROW_FIELDS = tuple(f.name for f in fields(BenchmarkRow))
NULLABLE = ("mfu", "hfu", "losses")  # no GPU peak known; per-step losses not kept


@dataclass(frozen=True)
class AttentionRow:
    """One kernel of ``bench_attention.py``: forward + backward time and its ratio to the floor
    (SDPA's causal kernel without ALiBi, timed in the same run)."""

    name: str
    fwd_bwd_ms: float
    x_floor: float
    fwd_ms: float
    bwd_ms: float


@dataclass(frozen=True)
class Record:
    date: str
    gpu: str
    gpu_type: str
    stack: dict[str, str | None]
    command: str
    rows: dict[str, BenchmarkRow]
    attention_command: str | None = None
    attention_shape: dict[str, Any] = field(default_factory=dict)
    attention: list[AttentionRow] = field(default_factory=list)
    path: Path | None = None
    order: int = 0  # the -N suffix: several records of one day and GPU


@dataclass(frozen=True)
class Measured:
    """A row and the record it was measured in."""

    name: str
    row: BenchmarkRow
    record: Record


def _need(data: dict, key: str, where: str) -> Any:
    if data.get(key) is None:
        raise ConfigError(f"{where}.{key}", "missing (every record names it)")
    return data[key]


def _row(data: dict, where: str) -> tuple[str, BenchmarkRow]:
    name = _need(data, "name", where)
    missing = [k for k in ROW_FIELDS if k not in data]
    missing += [k for k in ROW_FIELDS if data.get(k) is None and k not in NULLABLE]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}", f"missing in row {name!r}")
    unknown = sorted(set(data) - set(ROW_FIELDS) - {"name"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown field in row {name!r}")
    values = {k: data[k] for k in ROW_FIELDS}
    values["losses"] = values["losses"] or []
    return name, BenchmarkRow(**values)


def parse_record(data: dict, where: str = "record") -> Record:
    """A record from its JSON, checked: every row has every BenchmarkRow field, the stack
    names torch, Composer and CUDA, and the record names its GPU."""
    stack = _need(data, "stack", where)
    for key in REQUIRED_STACK:
        _need(stack, key, f"{where}.stack")
    rows = dict(_row(r, f"{where}.rows.{i}") for i, r in enumerate(data.get("rows") or []))
    att = data.get("attention") or {}
    return Record(
        date=_need(data, "date", where),
        gpu=_need(data, "gpu", where),
        gpu_type=_need(data, "gpu_type", where),
        stack={k: stack.get(k) for k in STACK_KEYS},
        command=_need(data, "command", where),
        rows=rows,
        attention_command=att.get("command"),
        attention_shape=att.get("shape") or {},
        attention=[AttentionRow(**r) for r in att.get("rows") or []],
    )


def load_records(results: str | Path = RESULTS) -> list[Record]:
    """Every record in ``results``, oldest first (date, then the file's -N suffix)."""
    records = []
    for path in sorted(Path(results).glob("*.json")):
        m = _NAME.match(path.name)
        if not m:
            raise ConfigError(str(path), "not named <YYYY-MM-DD>-<gpu_type>[-N].json")
        rec = parse_record(json.loads(path.read_text()), where=path.name)
        if (rec.date, rec.gpu_type) != (m.group(1), m.group(2)):
            raise ConfigError(f"{path.name}.date", "date and gpu_type differ from the file name")
        order = int(m.group(3) or 0)
        records.append(Record(**{**rec.__dict__, "path": path, "order": order}))
    return sorted(records, key=lambda r: (r.date, r.order))


def latest_rows(gpu_type: str, results: str | Path = RESULTS) -> dict[str, Measured]:
    """Each row name's newest measurement on ``gpu_type``: a newer record wins per row."""
    out: dict[str, Measured] = {}
    for rec in load_records(results):
        if rec.gpu_type == gpu_type:
            out.update({n: Measured(n, row, rec) for n, row in rec.rows.items()})
    return out


def latest_attention(gpu_type: str, results: str | Path = RESULTS) -> Record | None:
    """The newest record on ``gpu_type`` that timed the attention kernels alone."""
    found = [r for r in load_records(results) if r.gpu_type == gpu_type and r.attention]
    return found[-1] if found else None


def stack_line(rec: Record) -> str:
    """``NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, Composer 0.32.1, ...`` for a docs table."""
    labels = {"torch": "torch", "composer": "Composer", "streaming": "streaming",
              "cuda": "CUDA", "cudnn": "cuDNN", "python": "Python"}  # fmt: skip
    parts = [f"{label} {rec.stack[k]}" for k, label in labels.items() if rec.stack.get(k)]
    return ", ".join([rec.gpu, *parts])


def record_path(results: str | Path, date: str, gpu_type: str) -> Path:
    """A free file name for a new record of ``date`` on ``gpu_type`` (``-2``, ``-3``, ...
    after the first of a day)."""
    base = Path(results) / f"{date}-{gpu_type}.json"
    n = 2
    path = base
    while path.exists():
        path = base.with_name(f"{date}-{gpu_type}-{n}.json")
        n += 1
    return path


def _params(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def render_rows(measured: list[Measured]) -> str:
    """The docs' throughput table: one line per row, with the date of the record it is from."""
    lines = [
        "| row | params | micro batch x accumulation | MFU | HFU | tokens/s | peak GB | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in measured:
        r = m.row
        lines.append(
            f"| {m.name} | {_params(r.params)} | {r.micro_batch} x {r.grad_accum} | "
            f"{_pct(r.mfu)} | {_pct(r.hfu)} | {r.tokens_per_sec:,.0f} | "
            f"{r.peak_memory_gb:.1f} | {m.record.date} |"
        )
    return "\n".join(lines)


def render_stacks(measured: list[Measured]) -> str:
    """One line per record the rows come from: its date, GPU and stack."""
    recs = {(m.record.date, m.record.order): m.record for m in measured}
    return "\n".join(f"- {r.date}: {stack_line(r)}" for _, r in sorted(recs.items()))


def render_table(gpu_type: str, results: str | Path = RESULTS) -> str:
    """Every row measured on ``gpu_type``, newest measurement each, with the stacks."""
    rows = list(latest_rows(gpu_type, results).values())
    recs = [r for r in load_records(results) if r.gpu_type == gpu_type]
    newest = {n: i for i, n in enumerate(recs[-1].rows)} if recs else {}
    rows.sort(key=lambda m: (newest.get(m.name, len(newest)), m.name))
    return f"{render_rows(rows)}\n\nMeasured on:\n{render_stacks(rows)}"


def render_headline(gpu_type: str, names: dict[str, str], results: str | Path = RESULTS) -> str:
    """A few rows, each with a one-line description: ``names`` maps row name to it."""
    latest = latest_rows(gpu_type, results)
    missing = [n for n in names if n not in latest]
    if missing:
        raise ConfigError(missing[0], f"no {gpu_type} record has this row")
    lines = ["| run | MFU | tokens/s | row |", "|---|---:|---:|---|"]
    for name, what in names.items():
        r = latest[name].row
        lines.append(f"| {what} | {_pct(r.mfu)}% | {r.tokens_per_sec:,.0f} | `{name}` |")
    chosen = [latest[n] for n in names]
    return "\n".join(lines) + "\n\nMeasured on:\n" + render_stacks(chosen)


ATTENTION_LABELS = {
    "sdpa causal (no alibi)": "SDPA causal, no ALiBi (the floor)",
    "cudnn+alibi": "cuDNN + ALiBi inside the kernel (`impl: cudnn`)",
    "cudnn causal (no alibi)": "the same cuDNN op without ALiBi",
    "flex+alibi compiled": "FlexAttention + ALiBi, compiled (`impl: flex`)",
    "flex causal (no alibi) compiled": "FlexAttention causal, no ALiBi",
    "sdpa+alibi folded": "SDPA + ALiBi folded into the heads (`impl: sdpa`)",
    "sdpa+alibi dense bias": "SDPA + dense ALiBi bias",
    "torch+alibi": "reference (`impl: torch`)",
}


def render_attention(gpu_type: str, results: str | Path = RESULTS) -> str:
    """The newest attention-kernel timings on ``gpu_type``, with their shape and command."""
    rec = latest_attention(gpu_type, results)
    if rec is None:
        raise ConfigError(gpu_type, "no record times the attention kernels on this GPU")
    lines = ["| kernel | fwd + bwd ms | x floor | fwd ms | bwd ms |", "|---|---:|---:|---:|---:|"]
    for a in rec.attention:
        label = ATTENTION_LABELS.get(a.name, a.name)
        lines.append(
            f"| {label} | {a.fwd_bwd_ms:.2f} | {a.x_floor:.2f} | {a.fwd_ms:.2f} | {a.bwd_ms:.2f} |"
        )
    shape = ", ".join(f"{k} {v}" for k, v in rec.attention_shape.items())
    return (
        "\n".join(lines)
        + f"\n\nMeasured on {rec.date}: {stack_line(rec)}; {shape}; "
        + f"`{rec.attention_command}`."
    )


def detect_stack() -> tuple[str, dict[str, str | None]]:
    """This machine's GPU name (``cpu`` without one) and software stack, as a record names them.
    ``MPT_TRAIN_STACK`` names the stack (``pinned``, ``current``, ...) when set."""
    import os
    import platform

    import composer
    import streaming
    import torch

    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cudnn = None  # cuDNN 9 numbers its versions 91900, cuDNN 8 8902
    if v:
        cudnn = (
            f"{v // 10000}.{v // 100 % 100}.{v % 100}"
            if v >= 90000
            else f"{v // 1000}.{v // 100 % 10}.{v % 100}"
        )
    stack: dict[str, str | None] = {
        "torch": torch.__version__,
        "composer": composer.__version__,
        "streaming": streaming.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "python": platform.python_version(),
        "name": os.environ.get("MPT_TRAIN_STACK"),
    }
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return gpu, stack


def write_record(
    results: str | Path, date: str, command: str, rows: dict[str, BenchmarkRow]
) -> Path:
    """A new record of ``rows`` measured on this machine today, in a file of its own.

    The GPU type is the rows' (``h100``, ``a100_80gb``, ``cpu``); the stack is read here, in
    the process that launched the rows, which run on the same installation.
    """
    if not rows:
        raise ConfigError("rows", "no row has a result to record")
    gpu, stack = detect_stack()
    gpu_type = re.sub(r"[^a-z0-9_]+", "_", next(iter(rows.values())).gpu.lower())
    body = {
        "date": date, "gpu": gpu, "gpu_type": gpu_type, "stack": stack, "command": command,
        "rows": [{"name": name, **row.__dict__} for name, row in rows.items()],
    }  # fmt: skip
    parse_record(body)  # what is written loads
    Path(results).mkdir(parents=True, exist_ok=True)
    path = record_path(results, date, gpu_type)
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path
