"""A whole benchmark table from one file: every row through the real trainer, one process each.

``scripts/benchmark_table.py yamls/benchmarks/h100.yaml`` runs each row as
``python -m mpt_train.tools.benchmark SPEC OVERRIDES --json`` in its own process, so a row that runs
out of GPU memory (a 3B micro batch one size too big) or fails to compile is reported in its
line of the table instead of ending the table, and every row starts with an empty allocator.

Table file::

    steps: 12            # per row, as benchmark.py --steps / --warmup
    warmup: 4
    timeout_s: 600       # per row
    rows:
      - name: mpt-1b
        spec: yamls/mpt-1b.yaml          # relative to the working directory, else to the
                                         # repository that holds the table file
        overrides: [device_train_microbatch_size=6, global_train_batch_size=6]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from mpt_train.errors import ConfigError, run_cli
from mpt_train.tools.benchmark import COLUMNS, BenchmarkRow, format_row

__all__ = ["TableRow", "TableSpec", "load_table", "main", "run_table"]

log = logging.getLogger(__name__)


@dataclass
class TableRow:
    """One line of the table: a run spec, its overrides and the name the line shows.
    ``steps``/``warmup`` replace the table's for a row whose steps are long (a spec's whole
    global batch through gradient accumulation)."""

    spec: str
    name: str | None = None
    overrides: list[str] = field(default_factory=list)
    steps: int | None = None
    warmup: int | None = None


@dataclass
class TableSpec:
    rows: list[TableRow]
    steps: int = 12
    warmup: int = 4
    timeout_s: float = 600.0
    gpu: str | None = None


def load_table(path: str | Path) -> TableSpec:
    """The table file, typed (unknown keys name their dotted path like any run spec)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(TableSpec), raw)
        table: TableSpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except FileNotFoundError:
        raise ConfigError("table", f"{path} not found") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "table"
        raise ConfigError(str(key), f"{err.msg if hasattr(err, 'msg') else err}") from None
    if not table.rows:
        raise ConfigError("rows", f"{path} lists no rows")
    if table.warmup < 1 or table.steps <= table.warmup:
        raise ConfigError("steps", f"need steps > warmup >= 1, got {table.steps}/{table.warmup}")
    for i, row in enumerate(table.rows):
        steps, warmup = _steps(row, table)
        if warmup < 1 or steps <= warmup:
            raise ConfigError(
                f"rows.{i}.steps", f"need steps > warmup >= 1, got {steps}/{warmup} ({row.name})"
            )
    return table


def _steps(row: TableRow, table: TableSpec) -> tuple[int, int]:
    steps = table.steps if row.steps is None else row.steps
    return steps, table.warmup if row.warmup is None else row.warmup


def _row_cmd(row: TableRow, table: TableSpec, root: Path) -> list[str]:
    spec = Path(row.spec)
    if not spec.is_absolute() and not spec.exists():
        spec = root / row.spec  # relative to the repository that holds the table
    cmd = [sys.executable, "-m", "mpt_train.tools.benchmark", str(spec), *row.overrides, "--json"]
    steps, warmup = _steps(row, table)
    cmd += ["--steps", str(steps), "--warmup", str(warmup)]
    if row.name:
        cmd += ["--name", row.name]
    if table.gpu:
        cmd += ["--gpu", table.gpu]
    return cmd


_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")


def _failure(stderr: str) -> str:
    """The line of a failed row's output that says why (an OOM, a ConfigError, ...).

    Torch prefixes each line of a traceback with ``[rank0]:`` and may log a shutdown warning
    after it; neither is the reason.
    """
    lines = [_RANK_PREFIX.sub("", ln).strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("[W")]  # c10 warnings: [W1126 ...]
    for ln in reversed(lines):
        if "OutOfMemoryError" in ln or "out of memory" in ln:
            return "out of memory"
    for ln in reversed(lines):
        if ln.startswith("error") or "Error" in ln.split(":")[0]:
            return ln[:200]
    return lines[-1][:200] if lines else "failed with no output"


def _result(proc: subprocess.CompletedProcess) -> BenchmarkRow | str:
    if proc.returncode != 0:
        return _failure(proc.stderr)
    lines = proc.stdout.strip().splitlines()
    try:
        return BenchmarkRow(**json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        return f"no result row in the output ({(lines or ['nothing'])[-1][:120]!r})"


def run_table(
    table: TableSpec,
    root: Path,
    echo: bool = True,
    logs: Path | None = None,
    budget_s: float | None = None,
) -> list[tuple[TableRow, BenchmarkRow | str]]:
    """Run every row; each result is the row's measurements or why it has none.

    ``logs``: a folder that gets each row's whole output (``<name>.log``), for the rows whose
    line says only "out of memory" or the last error line. ``budget_s``: the whole table's
    time (a GPU reservation's end): a row gets at most what is left, and rows that would start
    after it are listed as not run, so the table still prints before the reservation ends.
    """
    deadline = None if budget_s is None else time.monotonic() + budget_s
    package_root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }
    results: list[tuple[TableRow, BenchmarkRow | str]] = []
    for i, row in enumerate(table.rows):
        label = row.name or Path(row.spec).stem
        limit = table.timeout_s
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
        if deadline is not None and limit < 10:
            result: BenchmarkRow | str = "not run: the table's time budget was spent"
        else:
            log.info("row %d/%d: %s %s", i + 1, len(table.rows), label, " ".join(row.overrides))
            log_file = logs / f"{label}.log" if logs is not None else None
            result = _run_row(_row_cmd(row, table, root), env, limit, log_file)
        results.append((row, result))
        if echo:
            print(_line(row, result), flush=True)
    return results


def _run_row(
    cmd: list[str], env: dict[str, str], limit: float, log_file: Path | None
) -> BenchmarkRow | str:
    """One row in its own process, within ``limit`` seconds; its whole output in ``log_file``."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as err:
        result: BenchmarkRow | str = f"timed out after {limit:.0f} s"
        out, errs = _text(err.stdout), _text(err.stderr)
    else:
        result, out, errs = _result(proc), proc.stdout, proc.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"{out}\n--- stderr ---\n{errs}")
    return result


def _text(stream: str | bytes | None) -> str:
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


def _line(row: TableRow, result: BenchmarkRow | str) -> str:
    if isinstance(result, BenchmarkRow):
        return format_row(result, header=False)
    cells = [row.name or Path(row.spec).stem, f"**{result}**"] + [""] * (len(COLUMNS) - 2)
    return "| " + " | ".join(cells) + " |"


def format_table(results: list[tuple[TableRow, BenchmarkRow | str]]) -> str:
    names = "| " + " | ".join(n for n, _ in COLUMNS) + " |"
    return "\n".join([names, "|" + " --- |" * len(COLUMNS), *(_line(r, x) for r, x in results)])


def _record(
    folder: str, results: list[tuple[TableRow, BenchmarkRow | str]], argv: Sequence[str] | None
) -> None:
    """The rows that ran, as a record (:mod:`mpt_train.tools.records`) dated today (UTC)."""
    import datetime
    import shlex

    from mpt_train.tools.records import write_record

    ran = {(r.name or Path(r.spec).stem): x for r, x in results if isinstance(x, BenchmarkRow)}
    if not ran:
        log.warning("no row ran: no record written")
        return
    args = list(sys.argv[1:] if argv is None else argv)
    command = "python scripts/benchmark_table.py " + shlex.join(args)
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path = write_record(folder, date, command, ran)
    print(f"record: {path}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark_table.py", description=__doc__.split("\n")[0])
    parser.add_argument("table", help="table file (see yamls/benchmarks/)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only rows with these names, in this order"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time for the whole table: no row runs past it, rows left over are listed as not run",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--logs", default=None, help="write each row's whole output to DIR/NAME.log"
    )
    parser.add_argument(
        "--record",
        default=None,
        metavar="DIR",
        help="also write the rows that ran as a new dated record in DIR (e.g. "
        "benchmarks/results), with this machine's GPU and software stack",
    )
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args, argv), prefix=f"error in table {args.table}")


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    table = load_table(args.table)
    if args.only is not None:
        names = [r.name or Path(r.spec).stem for r in table.rows]
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise ConfigError("--only", f"{unknown} not in {args.table} (rows: {names})")
        by_name = dict(zip(names, table.rows))
        table.rows = [by_name[n] for n in dict.fromkeys(args.only)]
    table_dir = root = Path(args.table).resolve().parent
    while not (root / "yamls").is_dir() and root != root.parent:
        root = root.parent  # specs are relative to the repository root
    if not (root / "yamls").is_dir():
        root = table_dir  # not in a repository: relative to the table file
    logs = Path(args.logs) if args.logs else None
    results = run_table(table, root, logs=logs, budget_s=args.budget_s)
    print("\n" + format_table(results), flush=True)
    if args.json:
        rows = [
            {"name": r.name, "spec": r.spec, "overrides": r.overrides,
             "result": x.__dict__ if isinstance(x, BenchmarkRow) else {"error": x}}
            for r, x in results
        ]  # fmt: skip
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.record:
        _record(args.record, results, argv)
    return 0 if all(isinstance(x, BenchmarkRow) for _, x in results) else 1
