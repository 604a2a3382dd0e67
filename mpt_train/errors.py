"""Errors that name what the user must fix.

A bad run spec must fail before any GPU time is spent, with a message that points at the
offending key (``train_loader.dataset.max_seq_len``), the bad value and what was expected.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

__all__ = [
    "ConfigError",
    "RunFailure",
    "RunInterrupted",
    "check_choice",
    "run_cli",
    "setup_logging",
]


class ConfigError(ValueError):
    """A run-spec problem, located by the dotted key that holds it."""

    def __init__(self, key: str, msg: str) -> None:
        self.key = key
        self.msg = msg
        super().__init__(f"{key}: {msg}" if key else msg)

    def with_prefix(self, prefix: str) -> ConfigError:
        """Return the same error located under ``prefix`` (e.g. the spec section)."""
        if not prefix:
            return self
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.msg)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(key, f"got {value!r}, expected one of: {', '.join(allowed)}")


class RunFailure(RuntimeError):
    """A run stopped for a reason the message states in full (the path, URL or step).

    The command line prints it as one line instead of a traceback: the operator needs the
    checkpoint that is corrupt or the bucket that is unreachable, not Composer's call stack.
    """


class RunInterrupted(RunFailure):
    """A run stopped by Ctrl-C or a scheduler's SIGTERM; the message says where it stopped and
    how it resumes."""


def setup_logging(level: str | int | None = None) -> None:
    """Rank-aware logging: rank 0 at INFO, other ranks only warnings (unless MPT_LOG_ALL_RANKS).

    ``level`` (or ``$MPT_LOG_LEVEL``) overrides the default; Composer's, streaming's and
    torch.distributed's chatter stays at WARNING.
    """
    rank = int(os.environ.get("RANK", "0"))
    default = "INFO" if rank == 0 or os.environ.get("MPT_LOG_ALL_RANKS") else "WARNING"
    if isinstance(level, int):
        level = logging.getLevelName(level)
    root = logging.getLogger()
    # Replace plain console handlers (an earlier call's, a library's basicConfig); keep the
    # rest (files, a test's capture).
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setFormatter(
        logging.Formatter(
            f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    )
    root.addHandler(console)
    root.setLevel((level or os.environ.get("MPT_LOG_LEVEL") or default).upper())
    for noisy in ("composer", "streaming", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(
    body: Callable[[], int | None],
    *,
    prefix: str = "error",
    bad_input: tuple[type[BaseException], ...] = (),
    failures: tuple[type[BaseException], ...] = (),
    log_level: str | int | None = None,
) -> int:
    """Run a command's ``body`` the way every mpt-train command starts and ends; return its
    exit status (``body``'s return value, None meaning 0).

    Logging is set up first (:func:`setup_logging` at ``log_level``). Then, one line on stderr
    each, never a traceback (the user needs the key, path or URL to fix, not the call stack):

    * :class:`ConfigError` and the command's ``bad_input`` types (a bad spec key, flag or input
      file): ``PREFIX: message``, exit 2. ``prefix`` names the input, e.g.
      ``"error in run spec yamls/mpt-1b.yaml"``.
    * :class:`RunFailure` and the command's ``failures`` types (a run or conversion stopped
      for a reason its message states in full): ``run failed: message``, exit 1.
    * ``KeyboardInterrupt`` (Ctrl-C, or a scheduler's SIGINT): ``interrupted``, exit 130.

    Any other exception is a bug and keeps its traceback. Typical use::

        def main(argv=None) -> int:
            args = parser.parse_args(argv)
            return run_cli(lambda: _run(args), prefix=f"error in run spec {args.spec}")
    """
    setup_logging(log_level)
    try:
        status = body()
    except (ConfigError, *bad_input) as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 2
    except (RunFailure, *failures) as err:
        print(f"run failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)
