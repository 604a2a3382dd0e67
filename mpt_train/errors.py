"""Errors that name what the user must fix.

A bad run spec must fail before any GPU time is spent, with a message that points at the
offending key (``train_loader.dataset.max_seq_len``), the bad value and what was expected.
"""

from __future__ import annotations

__all__ = ["ConfigError", "RunFailure", "check_choice"]


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
