"""Keep secrets out of logs, saved specs and checkpoints.

A run spec may interpolate ``${oc.env:WANDB_API_KEY}`` or carry credentials in callback
kwargs; whatever is saved or printed passes through :func:`redact` first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_name", "redact", "secret_values"]

REDACTED = "**redacted**"
_SECRET_NAME = re.compile(r"(^|_)(token|key|secret|password|passwd|apikey|credentials?)$", re.I)
_SPECIAL_TOKEN = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask)_token$", re.I)


def is_secret_name(name: str) -> bool:
    """True for names such as ``WANDB_API_KEY``, ``HF_TOKEN``, ``aws_secret_access_key``."""
    return bool(_SECRET_NAME.search(name)) and not _SPECIAL_TOKEN.match(name)


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of secret-looking environment variables (long enough not to be noise)."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if is_secret_name(k) and len(v) >= 6}


def redact(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Copy ``obj`` with secret-named keys and any secret environment value masked."""
    values = secret_values(environ)

    def walk(x: Any, name: str = "") -> Any:
        if isinstance(x, Mapping):
            return {k: walk(v, str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(walk(v, name) for v in x)
        if isinstance(x, str):
            if name and is_secret_name(name) and x:
                return REDACTED
            for v in values:
                if v in x:
                    x = x.replace(v, REDACTED)
            return x
        return x

    return walk(obj)
