"""The ``scripts/sweep.py`` command: resolve a sweep, launch it (local or Slurm), or collect
its results. The logic lives in :mod:`mpt_train.tools.sweep` and
:mod:`mpt_train.tools.sweep_report`; this module only maps flags onto them."""

from __future__ import annotations

import argparse
from pathlib import Path

import mpt_train.tools.sweep as _sweep
from mpt_train.errors import ConfigError, run_cli
from mpt_train.tools.sweep import launch_local, load_sweep, resolve, write_slurm
from mpt_train.tools.sweep_plan import fitting_points
from mpt_train.tools.sweep_report import collect

__all__ = ["main"]


def _train_script(given: str) -> str:
    """The entry point as given when it is there (the scripts ``cd`` to this directory), else
    the checkout's own ``train.py`` by absolute path (a sweep started from elsewhere)."""
    if Path(given).is_file():
        return given
    own = Path(__file__).resolve().parents[2] / "train.py"
    if given == "train.py" and own.is_file():
        return str(own)
    raise ConfigError("--train-script", f"{given} not found (from {Path.cwd()})")


def main(argv: list[str] | None = None) -> int:
    """``scripts/sweep.py SWEEP.yaml [--launcher local|slurm] [--dry-run] [--collect]``."""
    parser = argparse.ArgumentParser(prog="sweep.py", description=_sweep.__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML (base spec + grid and/or points)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--dry-run", action="store_true", help="write specs/scripts, print, stop")
    parser.add_argument("--collect", action="store_true", help="gather results of a run sweep")
    parser.add_argument("--out-dir", default=None, help="default runs/sweeps/{name}")
    parser.add_argument("--train-script", default="train.py", help="the entry composer runs")
    parser.add_argument(
        "--plan", action="store_true", help="print each point's fit, time and cost; skip misfits"
    )
    parser.add_argument("--gpus", type=int, help="with --plan: GPUs per point (default the file's)")
    parser.add_argument("--gpu", help="with --plan: GPU type (default each spec's cost.gpu_type)")
    parser.add_argument("--mfu", type=float, help="with --plan: single-GPU MFU")
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args), prefix=f"error in sweep {args.sweep}")


def _run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, args.out_dir)
    if args.collect:
        _, out = collect(sweep.out_dir)
        print(out["md"].read_text(encoding="utf-8"))
        print("\n".join(f"wrote {p}" for p in out.values()))
        return 0
    train_script = _train_script(args.train_script)
    # The local launcher runs every point on this machine's `gpus` ranks.
    world = args.gpus or (None if args.launcher == "slurm" else sweep.gpus)
    points = resolve(sweep, world)
    print(f"sweep {sweep.name}: {len(points)} points, specs in {sweep.out_dir / 'specs'}")
    if args.plan:
        gpus = args.gpus or sweep.nodes * sweep.gpus
        points = fitting_points(points, gpus, args.gpu, args.mfu)
    if args.launcher == "slurm":
        write_slurm(sweep, points, train_script, dry_run=args.dry_run)
        return 0
    return launch_local(sweep, points, train_script, dry_run=args.dry_run)
