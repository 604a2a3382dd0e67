"""Sweeps: one base spec, a grid and/or a list of overrides, one resolved spec per point.

A sweep file::

    name: lr-bs                        # run names are {name}-{index}-{slug}
    base: ../yamls/quickstart.yaml     # relative to the sweep file
    overrides: [max_duration=200ba]    # applied to every point
    grid:                              # cartesian product, in key order
      optimizer.lr: [1.0e-3, 3.0e-3]
      global_train_batch_size: [16, 32]
    points:                            # extra points, each a mapping of overrides
      - {optimizer.lr: 1.0e-2}
    nodes: 1                           # per point (Slurm)
    gpus: 8                            # per node
    master_port: 29500
    slurm: {partition: null, account: null, time: null, setup: ["source .venv/bin/activate"]}

Every point is resolved through the same loader as ``train.py`` before anything launches, so a
typo in one point fails the sweep at once, naming the key, not hours later on a cluster. The
resolved specs are written in full (includes and ``${...}`` resolved): each is exactly what that
run trained with, re-runnable alone with ``composer train.py SPEC``.

Launch: ``local`` runs the points in turn with Composer's launcher (``composer -n G train.py
SPEC``); ``slurm`` writes one sbatch script per point and submits it when ``sbatch`` exists.
Results are gathered by :mod:`mpt_train.tools.sweep_report`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpt_train.config import load_config, to_container
from mpt_train.config.checks import check_spec
from mpt_train.config.schema import train_seq_len
from mpt_train.errors import ConfigError

__all__ = [
    "Point",
    "Sweep",
    "launch_local",
    "load_sweep",
    "resolve",
    "slurm_script",
    "write_slurm",
]

log = logging.getLogger(__name__)

MANIFEST = "sweep.json"


@dataclass
class Point:
    """One resolved run of a sweep."""

    index: int
    run_name: str
    overrides: dict[str, Any]
    spec: str  # absolute path of the resolved spec
    metrics: str | None  # absolute path of its metrics.jsonl (None when the jsonl logger is off)
    global_batch_tokens: int = 0
    gpu_type: str | None = None
    price_per_gpu_hour: float | None = None
    returncode: int | None = None


@dataclass
class Sweep:
    name: str
    base: Path
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    nodes: int = 1
    gpus: int = 1
    master_port: int = 29500
    slurm: dict[str, Any] = field(default_factory=dict)
    out_dir: Path = Path("runs/sweeps")

    def point_overrides(self) -> list[dict[str, Any]]:
        """The grid's cartesian product, then the listed points."""
        keys = list(self.grid)
        grid = [dict(zip(keys, vals)) for vals in itertools.product(*self.grid.values())]
        return (grid if keys else []) + [dict(p) for p in self.points]


_SWEEP_KEYS = {
    "name",
    "base",
    "overrides",
    "grid",
    "points",
    "nodes",
    "gpus",
    "master_port",
    "slurm",
    "out_dir",
}
_SLURM_KEYS = {"partition", "account", "time", "cpus_per_task", "setup", "extra"}


def load_sweep(path: str | Path, out_dir: str | Path | None = None) -> Sweep:
    """Read and check a sweep file; paths in it are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("sweep", f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError("sweep", f"{path}: not YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError("sweep", f"{path}: expected a mapping")
    unknown = set(raw) - _SWEEP_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown sweep key; valid: {sorted(_SWEEP_KEYS)}")
    for key in ("name", "base"):
        if not raw.get(key):
            raise ConfigError(key, f"{path}: required")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(raw["name"])):
        raise ConfigError("name", f"{raw['name']!r}: use letters, digits, '.', '_', '-'")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("grid", "expected a mapping of dotted keys to non-empty lists")
    points = raw.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("points", "expected a list of mappings of dotted keys to values")
    if not grid and not points:
        raise ConfigError("grid", "a sweep needs a grid, a list of points, or both")
    slurm = raw.get("slurm") or {}
    if set(slurm) - _SLURM_KEYS:
        raise ConfigError(f"slurm.{sorted(set(slurm) - _SLURM_KEYS)[0]}", "unknown key")
    for key in ("nodes", "gpus"):
        if int(raw.get(key, 1)) < 1:
            raise ConfigError(key, f"got {raw[key]}, expected >= 1")
    default_out = Path("runs/sweeps") / str(raw["name"])
    return Sweep(
        name=str(raw["name"]),
        base=(path.parent / str(raw["base"])).resolve(),
        overrides=[str(o) for o in raw.get("overrides") or []],
        grid={str(k): list(v) for k, v in grid.items()},
        points=points,
        nodes=int(raw.get("nodes", 1)),
        gpus=int(raw.get("gpus", 1)),
        master_port=int(raw.get("master_port", 29500)),
        slurm=slurm,
        out_dir=Path(out_dir or raw.get("out_dir") or default_out).resolve(),
    )


def _dotlist_value(v: Any) -> str:
    """A value as the loader's ``a.b=c`` parser reads it back (YAML flow style)."""
    if isinstance(v, str):
        return v
    return json.dumps(v)


def _slug(overrides: dict[str, Any]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}{_dotlist_value(v)}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._-]+", "", "-".join(parts))[:48].strip("-.")


def resolve(sweep: Sweep, world_size: int | None = None) -> list[Point]:
    """Load every point through the spec loader and write its resolved spec and the manifest.

    Each point is checked as ``train.py`` would check it on ``world_size`` ranks (default
    ``nodes x gpus``), so a batch that does not split fails here, before anything is queued;
    schedule warnings are logged with the point they concern.
    """
    world = world_size or sweep.nodes * sweep.gpus
    specs = sweep.out_dir / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    points = []
    for i, over in enumerate(sweep.point_overrides()):
        run_name = "-".join(filter(None, [sweep.name, f"{i:02d}", _slug(over)]))
        dotlist = [*sweep.overrides, *(f"{k}={_dotlist_value(v)}" for k, v in over.items())]
        try:
            cfg = load_config(sweep.base, [*dotlist, f"run_name={run_name}"])
            warning = check_spec(cfg, world)  # what train.py would refuse on `world` ranks
        except ConfigError as e:
            raise ConfigError(e.key, f"sweep point {i} {over}: {e.msg}") from None
        if warning:
            log.warning("sweep point %d %s: %s", i, over, warning)
        spec_path = specs / f"{run_name}.yaml"
        spec_path.write_text(yaml.safe_dump(to_container(cfg), sort_keys=False), encoding="utf-8")
        jsonl = cfg.loggers.jsonl
        points.append(
            Point(
                index=i,
                run_name=run_name,
                overrides=over,
                spec=str(spec_path),
                metrics=str(Path(jsonl.path.format(run_name=run_name)).resolve())
                if jsonl
                else None,
                global_batch_tokens=cfg.global_train_batch_size * train_seq_len(cfg),
                gpu_type=cfg.cost.gpu_type,
                price_per_gpu_hour=cfg.cost.price_per_gpu_hour,
            )
        )
    write_manifest(sweep, points)
    return points


def write_manifest(sweep: Sweep, points: list[Point]) -> Path:
    path = sweep.out_dir / MANIFEST
    data = {
        "name": sweep.name,
        "base": str(sweep.base),
        "nodes": sweep.nodes,
        "gpus": sweep.gpus,
        "points": [asdict(p) for p in points],
    }
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def composer_command(gpus: int, train_script: str, spec: str) -> list[str]:
    """``composer -n G train.py SPEC`` run with this interpreter (no PATH assumptions)."""
    return [sys.executable, "-m", "composer.cli.launcher", "-n", str(gpus), train_script, spec]


def launch_local(
    sweep: Sweep, points: list[Point], train_script: str = "train.py", dry_run: bool = False
) -> int:
    """Run the points one after another on this node; a failed point does not stop the rest."""
    if sweep.nodes != 1:
        # One sweep file serves both launchers; here every point runs on this node alone.
        log.warning(
            "nodes=%d is for --launcher slurm: the local launcher runs each point on this "
            "node's %d GPU(s)",
            sweep.nodes,
            sweep.gpus,
        )
    failed = 0
    for p in points:
        cmd = composer_command(sweep.gpus, train_script, p.spec)
        print(f"[{p.index}] composer -n {sweep.gpus} {train_script} {p.spec}", flush=True)
        if dry_run:
            continue
        p.returncode = subprocess.run(cmd, check=False).returncode
        if p.returncode != 0:
            failed += 1
            log.error("sweep point %s (%s) exited %d", p.index, p.run_name, p.returncode)
    write_manifest(sweep, points)
    return 1 if failed else 0


def slurm_script(sweep: Sweep, point: Point, train_script: str, workdir: Path) -> str:
    """An sbatch script: one task per node, each running Composer's launcher for G GPUs.

    World size, node rank and master address come from Slurm at run time, so the same script
    works whatever nodes the scheduler hands out.
    """
    s = sweep.slurm
    g = sweep.gpus
    logs = sweep.out_dir / "logs"
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={point.run_name}",
        f"#SBATCH --nodes={sweep.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={g}",
        "#SBATCH --exclusive",
        f"#SBATCH --output={logs}/%x-%j.out",
    ]
    for key, flag in (
        ("partition", "partition"),
        ("account", "account"),
        ("time", "time"),
        ("cpus_per_task", "cpus-per-task"),
    ):
        if s.get(key):
            head.append(f"#SBATCH --{flag}={s[key]}")
    head += [f"#SBATCH {x}" for x in s.get("extra") or []]
    launch = (
        f"composer --world_size $((SLURM_NNODES*{g})) --node_rank $SLURM_NODEID "
        f"--master_addr $MASTER_ADDR --master_port $MASTER_PORT -n {g} "
        f"{shlex.quote(train_script)} {shlex.quote(point.spec)}"
    )
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        *(s.get("setup") or []),
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"export MASTER_PORT={sweep.master_port}",
        "# One task per node; $SLURM_NODEID is expanded on each node, so it is single-quoted.",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(launch)}",
    ]
    return "\n".join([*head, "", *body]) + "\n"


def write_slurm(
    sweep: Sweep,
    points: list[Point],
    train_script: str = "train.py",
    dry_run: bool = False,
    workdir: Path | None = None,
) -> list[Path]:
    """Write one sbatch script per point; submit them when ``sbatch`` exists and not dry-run."""
    workdir = (workdir or Path.cwd()).resolve()
    out = sweep.out_dir / "slurm"
    out.mkdir(parents=True, exist_ok=True)
    (sweep.out_dir / "logs").mkdir(exist_ok=True)
    scripts = []
    for p in points:
        path = out / f"{p.run_name}.sbatch"
        path.write_text(slurm_script(sweep, p, train_script, workdir), encoding="utf-8")
        path.chmod(0o755)
        scripts.append(path)
        print(f"[{p.index}] {path}")
    sbatch = shutil.which("sbatch")
    if dry_run:
        return scripts
    if sbatch is None:
        print(f"sbatch not found: submit them with  for f in {out}/*.sbatch; do sbatch $f; done")
        return scripts
    for path in scripts:
        subprocess.run([sbatch, str(path)], check=True)
    return scripts
