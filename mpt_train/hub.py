"""Fail in seconds, not after a minute of retries, when a Hugging Face hub name cannot load.

``from_pretrained("org/name")`` on a machine without network (a cluster's compute nodes, an
air-gapped box) retries for about a minute and then prints a traceback that does not say
whether the name is wrong or the machine is offline. :func:`check_hub_name` answers first: a
local folder or a name in the local cache loads as it is; otherwise ``HF_HUB_OFFLINE`` or a
3-second connection attempt to the hub decides, and the message says which.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from mpt_train.errors import ConfigError

__all__ = ["check_hub_name", "hub_reachable"]

PROBE_SECONDS = 3.0
_TRUE = {"1", "true", "yes", "on"}


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cached(name: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}").is_dir()


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds, name
    lookup included (a resolver with no network can hang for minutes: it runs in a thread)."""
    url = urlparse(_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def check_hub_name(name: str, key: str, what: str = "tokenizer") -> None:
    """Raise a one-line :class:`ConfigError` on ``key`` when ``name`` can neither be read here
    (a folder, or the local hub cache) nor fetched (offline, or the hub unreachable)."""
    if Path(name).exists():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub name
        raise ConfigError(key, f"cannot load {what} {name!r}: no such folder")
    if _cached(name):
        return
    from huggingface_hub import constants

    where = f"not a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if _offline():
        raise ConfigError(
            key,
            f"cannot load {what} {name!r}: {where}, and HF_HUB_OFFLINE is set: give the path of "
            "a local copy, or fetch it on a machine with network into that cache",
        )
    if not hub_reachable():
        raise ConfigError(
            key,
            f"cannot load {what} {name!r}: {where}, and {_endpoint()} cannot be reached from "
            f"this machine within {PROBE_SECONDS:.0f} s (offline, or the name is a typo of a "
            "local path): give the path of a local copy",
        )
