"""Which checkpoints may be unpickled, and loading weights without unpickling code.

Composer 0.32.1 loads checkpoints with ``torch.load(weights_only=False)``: a checkpoint is a
pickle, and a pickle can run any code when it is read. So:

* resuming from the run's own ``save_folder`` (written by this run) is trusted;
* a ``load_path`` anywhere else is refused before anything reads it, unless the spec says
  ``reliability.trust_checkpoint: true`` (then a warning records that choice);
* inference and export read weights with :func:`load_weights_safely`: safetensors, or
  ``torch.load(weights_only=True)``, which refuses any object that is not a tensor or plain
  container instead of constructing it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from mpt_train.errors import ConfigError, RunFailure

__all__ = ["UntrustedCheckpointError", "check_load_path_trusted", "load_weights_safely"]

log = logging.getLogger(__name__)


class UntrustedCheckpointError(RunFailure):
    """A file would need full unpickling (code execution) to load; the message names it."""


def _inside(path: str, folder: str) -> bool:
    if "://" in path or "://" in folder:
        return path.rstrip("/").startswith(folder.rstrip("/") + "/")
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def check_load_path_trusted(
    load_path: str | None, save_folder: str | None, run_name: str, trust: bool
) -> None:
    """Refuse to unpickle a ``load_path`` this run did not write, unless trusted explicitly.

    Raises:
        ConfigError: on ``load_path``, naming it and the way to accept it.
    """
    if not load_path:
        return
    if "://" not in load_path and Path(load_path).is_file():
        from mpt_train.reliability.manifest import damage_of

        if (damage := damage_of(load_path)) is not None:
            raise ConfigError("load_path", f"{load_path} is damaged: {damage}")
    folder = save_folder.format(run_name=run_name) if save_folder else None
    if folder is not None and _inside(load_path, folder):
        return
    if trust:
        log.warning(
            "loading checkpoint %s from outside save_folder because trust_checkpoint is true: "
            "it is a pickle and runs code when loaded",
            load_path,
        )
        return
    if _plain_weights(load_path):
        log.info("loading %s: it holds only tensors and plain data, nothing that runs", load_path)
        return
    raise ConfigError(
        "load_path",
        f"{load_path} is not in this run's save_folder; Composer checkpoints are pickles that "
        "can run code when loaded. If you wrote it, set reliability.trust_checkpoint=true; to "
        "use only its weights, load them with mpt_train.reliability.load_weights_safely",
    )


def _plain_weights(path: str) -> bool:
    """Whether a local checkpoint unpickles with torch's weights-only loader (tensors, dicts,
    numbers: what ``scripts/convert_from_hf.py`` writes). Such a pickle calls nothing else, so
    Composer may load it in full. The tensors are memory-mapped, not read."""
    if "://" in path or not Path(path).is_file():
        return False
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not weights-only (Composer's own checkpoints), or not a torch file
        return False
    return True


def load_weights_safely(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a weights-only torch file, never executing code.

    A Composer checkpoint's model weights (``state.model``) are returned when the file can be
    read with ``weights_only=True``; anything that needs arbitrary objects is refused.

    Raises:
        UntrustedCheckpointError: naming the file, when it cannot be read without unpickling
            arbitrary objects.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    from mpt_train.reliability.manifest import damage_of

    if (damage := damage_of(p)) is not None:
        raise UntrustedCheckpointError(f"{p} is damaged: {damage}")
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError for refused globals
        raise UntrustedCheckpointError(
            f"{p} cannot be loaded as weights only (it needs arbitrary pickled objects, which "
            f"could run code): {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    if isinstance(obj, dict) and "state" in obj and isinstance(obj["state"], dict):
        obj = obj["state"].get("model", obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UntrustedCheckpointError(f"{p} holds no mapping of names to tensors")
    return obj
