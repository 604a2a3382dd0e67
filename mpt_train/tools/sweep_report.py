"""Gather a sweep's results: final loss, tokens/s, MFU and cost per point -> CSV, markdown, PNG.

Reads each point's ``metrics.jsonl`` (written by :class:`mpt_train.loggers.JsonlLogger`). The
cost monitor's metrics (``cost/*``) are preferred; Composer's SpeedMonitor ones
(``throughput/*``) fill in when the cost monitor was off. A point with no metrics (not run yet,
crashed before its first step) is listed with its status rather than silently left out.

Status: ``exit N`` for a point the local launcher saw fail, ``ok`` for one it saw exit 0. A
point without an exit status (a Slurm job, or a dry run) is judged by what its run left: ``ok``
when its metrics show training reached the spec's ``max_duration`` (Composer logs the final
``time/<unit>`` only after the last batch), ``incomplete (step N of <max_duration>)`` when they
stop short (still running, or crashed or cancelled: the metrics cannot tell which), ``unknown``
when the spec or the time metrics cannot be read, and ``missing`` when there are no metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpt_train.loggers.jsonl import read_metrics
from mpt_train.tools.sweep import MANIFEST

__all__ = ["PointResult", "collect", "summarize"]

log = logging.getLogger(__name__)

LOSS = "loss/train/total"


@dataclass
class PointResult:
    index: int
    run_name: str
    overrides: str
    status: str
    steps: int | None = None
    tokens: float | None = None
    final_loss: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    cost_usd: float | None = None
    gpu_hours: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list, repr=False)


def _last(rows: list[dict[str, Any]], *keys: str) -> float | None:
    for key in keys:
        for row in reversed(rows):
            v = row.get(key)
            if isinstance(v, int | float) and math.isfinite(v):
                return float(v)
    return None


def summarize(point: dict[str, Any]) -> PointResult:
    """One point's numbers from its metrics file (see the module docstring for the sources)."""
    over = ", ".join(f"{k}={v}" for k, v in point["overrides"].items())
    rc = point.get("returncode")
    # A local point that exited says so even when it died before writing any metrics.
    early = "missing" if rc is None else "ok" if rc == 0 else f"exit {rc}"
    res = PointResult(point["index"], point["run_name"], over, status=early)
    path = Path(point["metrics"]) if point.get("metrics") else None
    if path is None or not path.is_file():
        return res
    rows = read_metrics(path)
    if not rows:
        return res
    per_batch = point.get("global_batch_tokens") or 0

    def tokens_of(row: dict[str, Any]) -> float:
        return float(row.get("cost/tokens", row["step"] * per_batch))

    res.curve = [(tokens_of(r), float(r[LOSS])) for r in rows if LOSS in r]
    res.steps = int(rows[-1]["step"])
    res.tokens = tokens_of(rows[-1])
    res.final_loss = res.curve[-1][1] if res.curve else None
    res.tokens_per_sec = _last(rows, "cost/tokens_per_sec", "throughput/tokens_per_sec")
    res.mfu = _last(rows, "cost/mfu", "throughput/device/mfu")
    res.cost_usd = _last(rows, "cost/usd")
    res.gpu_hours = _last(rows, "cost/gpu_hours")
    res.status = (
        _status_from_metrics(point, rows) if rc is None else "ok" if rc == 0 else f"exit {rc}"
    )
    return res


# Composer's time units -> the ``time/<name>`` count its trainer logs. During training it is
# logged as each batch starts (work done before it); the full count only once the last batch has
# finished, so reaching ``max_duration`` in it means the run trained to the end.
_TIME_METRIC = {"ba": "time/batch", "tok": "time/token", "sp": "time/sample", "ep": "time/epoch"}


def _max_duration(point: dict[str, Any]) -> tuple[str, float, str] | None:
    """``(as written, value, unit)`` of the point's ``max_duration`` from its resolved spec."""
    from composer.core import Time

    try:
        written = yaml.safe_load(Path(point["spec"]).read_text(encoding="utf-8"))["max_duration"]
        t = Time.from_input(written, "ep")
    except (KeyError, OSError, TypeError, ValueError, yaml.YAMLError):
        return None
    unit = t.unit.value
    return (str(written), float(t.value), unit) if unit in _TIME_METRIC else None


def _status_from_metrics(point: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A point with no exit status: did its run reach ``max_duration``? (module docstring)."""
    target = _max_duration(point)
    if target is None:
        return "unknown"
    written, value, unit = target
    key = _TIME_METRIC[unit]
    done = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    if not done:
        return "unknown"
    if max(done) >= value:
        return "ok"
    return f"incomplete (step {int(rows[-1]['step'])} of {written})"


COLUMNS = (
    "index",
    "run_name",
    "overrides",
    "status",
    "steps",
    "tokens",
    "final_loss",
    "tokens_per_sec",
    "mfu",
    "cost_usd",
    "gpu_hours",
)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(results: list[PointResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        d = asdict(r)
        lines.append("| " + " | ".join(_fmt(d[c]).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: list[PointResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mfu) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        if r.curve:
            xs, ys = zip(*r.curve)
            ax_loss.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=r.run_name)
    ax_loss.set_xlabel("tokens")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_title("loss vs tokens")
    if any(r.curve for r in results):
        ax_loss.legend(fontsize=7)
    names = [str(r.index) for r in results]
    mfus = [100 * (r.mfu or 0.0) for r in results]
    bars = ax_mfu.bar(names, mfus)
    for bar, r in zip(bars, results):
        label = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}"
        ax_mfu.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax_mfu.set_xlabel("sweep point")
    ax_mfu.set_ylabel("MFU (%)")
    ax_mfu.set_title("MFU per point")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def collect(sweep_dir: str | Path) -> tuple[list[PointResult], dict[str, Path]]:
    """Summarise every point of the sweep in ``sweep_dir``; write results.{csv,md,png}."""
    sweep_dir = Path(sweep_dir)
    manifest = json.loads((sweep_dir / MANIFEST).read_text(encoding="utf-8"))
    results = [summarize(p) for p in manifest["points"]]
    out = {
        "csv": sweep_dir / "results.csv",
        "md": sweep_dir / "results.md",
        "png": sweep_dir / "results.png",
    }
    with out["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    out["md"].write_text(f"## sweep {manifest['name']}\n\n{_markdown(results)}", encoding="utf-8")
    _plot(results, out["png"])
    missing = [r.run_name for r in results if r.status == "missing"]
    if missing:
        log.warning("no metrics yet for %d point(s): %s", len(missing), ", ".join(missing))
    return results, out
