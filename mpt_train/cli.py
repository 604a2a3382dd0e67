"""``composer train.py SPEC [a.b=c ...]`` and ``python train.py SPEC``: parse, check, train.

A bad spec ends with one line naming the key to fix and exit status 2, never a traceback; a
run stopped by a known failure (corrupt checkpoint, unreachable bucket, loss guard) ends with
one line naming the path, URL or step, and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mpt_train.errors import ConfigError, RunFailure

__all__ = ["main", "setup_logging"]


def setup_logging(level: str | None = None) -> None:
    """Rank-aware logging: rank 0 at INFO, other ranks only warnings (unless MPT_LOG_ALL_RANKS)."""
    rank = int(os.environ.get("RANK", "0"))
    default = "INFO" if rank == 0 or os.environ.get("MPT_LOG_ALL_RANKS") else "WARNING"
    logging.basicConfig(
        level=(level or os.environ.get("MPT_LOG_LEVEL") or default).upper(),
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("composer", "streaming", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    setup_logging()

    from mpt_train.config import load_config, redact, to_container

    try:
        cfg = load_config(args.spec, args.overrides)
        if args.dry_run:
            import yaml

            from mpt_train.config.schema import check_schedule
            from mpt_train.config.validate import check_batch_split

            if args.world_size < 1:
                raise ConfigError("--world-size", f"got {args.world_size}, expected >= 1")
            per_rank = check_batch_split(cfg, args.world_size)
            note = check_schedule(cfg.scheduler, cfg.max_duration)
            if note:
                print(f"warning: {note}", file=sys.stderr)
            mb = cfg.device_train_microbatch_size
            split = f"{per_rank} per rank"
            if isinstance(mb, int):
                split += f", microbatch {mb} ({per_rank // mb} step(s) of gradient accumulation)"
            # A YAML comment: the output stays a spec that loads as it is.
            print(
                f"# global_train_batch_size {cfg.global_train_batch_size} over "
                f"{args.world_size} rank(s): {split}"
            )
            print(yaml.safe_dump(redact(to_container(cfg)), sort_keys=False))
            return 0
        from mpt_train.train.builder import train

        train(cfg)
    except ConfigError as e:
        print(f"error in run spec {args.spec}: {e}", file=sys.stderr)
        return 2
    except RunFailure as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
