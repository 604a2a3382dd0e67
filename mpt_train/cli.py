"""``composer train.py SPEC [a.b=c ...]`` and ``python train.py SPEC``: parse, check, train.

A bad spec ends with one line naming the key to fix and exit status 2, never a traceback; a
run stopped by a known failure (corrupt checkpoint, unreachable bucket, loss guard) ends with
one line naming the path, URL or step, and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mpt_train.errors import ConfigError, RunInterrupted, run_cli, setup_logging

__all__ = ["main", "setup_logging"]

if TYPE_CHECKING:
    from mpt_train.config import RunConfig


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an MPT model from a YAML run spec. Overrides: a.b=c (dotted keys).",
    )
    parser.add_argument("spec", help="run spec YAML, e.g. yamls/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as max_duration=20ba")
    parser.add_argument("--dry-run", action="store_true", help="check the spec, print it, exit")
    parser.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="with --dry-run: the GPU count the batch sizes must split across (default: "
        "$WORLD_SIZE or 1)",
    )
    args = parser.parse_intermixed_args(argv)
    return run_cli(lambda: _run(args), prefix=f"error in run spec {args.spec}")


def _run(args: argparse.Namespace) -> int:
    from mpt_train.config import load_config

    cfg = load_config(args.spec, args.overrides)
    if args.dry_run:
        return _dry_run(cfg, args.world_size)
    from mpt_train.train.builder import train

    # A scheduler's SIGTERM (preemption, scancel) stops the run like Ctrl-C: one line saying
    # where it stopped and what the same command does next.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        train(cfg)
    except RunInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    return 0


def _dry_run(cfg: RunConfig, world_size: int) -> int:
    """Refuse what training would refuse for the spec alone (before any process starts);
    print the spec resolved, as a spec that loads as it is."""
    import yaml

    from mpt_train.config import redact, to_container
    from mpt_train.config.checks import check_spec
    from mpt_train.config.validate import check_batch_split

    if world_size < 1:
        raise ConfigError("--world-size", f"got {world_size}, expected >= 1")
    note = check_spec(cfg, world_size)  # every refusal training would make for the spec alone
    per_rank = check_batch_split(cfg, world_size)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    mb = cfg.device_train_microbatch_size
    split = f"{per_rank} per rank"
    if isinstance(mb, int):
        split += f", microbatch {mb} ({per_rank // mb} step(s) of gradient accumulation)"
    # A YAML comment: the output stays a spec that loads as it is.
    print(
        f"# global_train_batch_size {cfg.global_train_batch_size} over "
        f"{world_size} rank(s): {split}"
    )
    print(yaml.safe_dump(redact(to_container(cfg)), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
