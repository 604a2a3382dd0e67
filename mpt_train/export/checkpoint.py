"""Composer checkpoint -> Hugging Face MPT folder, and HF MPT folder -> a fine-tune start point.

A training checkpoint is only useful outside this repo once transformers can load it without
remote code, so :func:`export_hf` writes exactly what ``AutoModelForCausalLM.from_pretrained``
expects for its native ``MptForCausalLM``: safetensors weights, ``config.json``, tokenizer files
and ``generation_config.json``. The model config comes from the run spec that
``RunSpecRecorder`` saved inside the checkpoint (or a ``config.yaml`` given explicitly), so the
export cannot disagree with what was trained. Configs transformers' MPT cannot represent are
refused by :func:`mpt_train.model.hf.config_to_hf` before anything is written.

Checkpoints are read without executing pickled code where possible: a monolithic ``.pt`` is
loaded with ``torch.load(weights_only=True)`` and an allow-list of the plain types Composer
stores next to tensors; a sharded checkpoint (a ``torch.distributed.checkpoint`` folder) is
read key by key without a process group.

A remote URI (``s3://`` or any Composer object store) is resolved to one checkpoint before
anything is downloaded: a file, a sharded checkpoint folder (holding ``.metadata``), or a run's
save_folder, whose ``latest-rank0.pt.symlink`` pointer names its newest checkpoint. Only that
checkpoint's objects are fetched, to a temporary folder; any other prefix is refused naming the
URI.
"""

from __future__ import annotations

import datetime
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "LoadedCheckpoint", "read_checkpoint"]

log = logging.getLogger(__name__)

_MODEL_PREFIX = "model."  # ComposerMPT keeps the network as ``self.model``
_SPEC_KEY = "RunSpecRecorder"
_DCP_METADATA = ".metadata"
_LATEST_LINK = "latest-rank0.pt"  # Composer's newest-checkpoint symlink in a local save_folder
_LATEST_POINTER = f"{_LATEST_LINK}.symlink"  # the same pointer as an object in a bucket


class CheckpointError(ValueError):
    """A checkpoint cannot be read or used; the message names the file and what is wrong."""


@dataclass
class LoadedCheckpoint:
    """The parts of a Composer checkpoint that export needs.

    Attributes:
        model_state: The network's weights, keys as in :class:`MPTModel` (no ``model.`` prefix).
        spec: The resolved run spec saved with the checkpoint, or ``None`` if it has none.
        source: Where it was read from (for messages).
    """

    model_state: dict[str, torch.Tensor]
    spec: dict[str, Any] | None
    source: str


def _safe_globals() -> list[Any]:
    """Plain types Composer pickles next to tensors (time deltas, numpy RNG state, versions)."""
    import numpy as np
    from torch.torch_version import TorchVersion

    types: list[Any] = [TorchVersion, datetime.timedelta, np.dtype, np.ndarray]
    types.append(np._core.multiarray._reconstruct)
    types.extend(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))
    return types


def _read_monolithic(path: Path, trust: bool) -> dict[str, Any]:
    from mpt_train.reliability.manifest import damage_of

    if (damage := damage_of(path)) is not None:
        raise CheckpointError(f"{path} is damaged: {damage}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with the offending global
        if not trust:
            first = str(err).strip().splitlines()
            why = next((ln for ln in first if "GLOBAL" in ln), first[0] if first else "")
            raise CheckpointError(
                f"{path}: cannot be loaded as plain tensors ({why.strip()}); if you trust this "
                "file, pass trust=True (--trust-checkpoint) to unpickle it"
            ) from None
    log.warning("%s: unpickling with weights_only=False (trusted by the caller)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_sharded(folder: Path) -> dict[str, Any]:
    """Gather ``state.model.*`` and the saved spec from a DCP folder, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not (folder / _DCP_METADATA).is_file():
        raise CheckpointError(
            f"{folder}: not a sharded checkpoint (no {_DCP_METADATA}; a save cut short, or the "
            "wrong folder); pass a .pt file, a sharded checkpoint folder or a save_folder"
        )
    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    spec_prefix = f"state.callbacks.{_SPEC_KEY}.spec"
    keys = {k for k in meta.state_dict_metadata if k.startswith("state.model.") or k == spec_prefix}
    if not any(k.startswith("state.model.") for k in keys):
        raise CheckpointError(f"{folder}: sharded checkpoint holds no state.model.* tensors")
    has_spec = any(k.startswith(spec_prefix) for k in meta.state_dict_metadata)
    if has_spec:
        keys.add(spec_prefix)
    return _load_state_dict_from_keys(keys=keys, checkpoint_id=str(folder))


def _pointer_candidates(target: str, folder: str) -> list[str]:
    """Where the checkpoint a ``latest`` pointer names may be, most literal first.

    Composer writes the checkpoint's object name in the bucket (``ckpt/run/ep0-ba4-rank0.pt``,
    or a sharded checkpoint's folder ``ckpt/run/ep0-ba4``). A save folder copied to another
    prefix, bucket or disk keeps that name, so the same name inside the pointer's own folder is
    tried next.
    """
    target = target.strip().lstrip("/")
    names = [
        target,
        posixpath.join(folder, target),
        posixpath.join(folder, posixpath.basename(target)),
    ]
    return list(dict.fromkeys(n.lstrip("/") for n in names if target))


def _is_sharded(store: Any, name: str) -> bool:
    """Whether the prefix ``name`` holds a sharded checkpoint's ``.metadata``."""
    metadata = posixpath.join(name, _DCP_METADATA)
    return metadata in store.list_objects(metadata)


def _remote_kind(store: Any, name: str) -> str | None:
    """``"sharded"`` for a prefix holding ``.metadata``, ``"file"`` for an object, else None."""
    if _is_sharded(store, name):
        return "sharded"
    if name and name in store.list_objects(name):  # lists only names starting with ``name``
        return "file"
    return None


def _follow_remote_pointer(store: Any, root: str, pointer: str, tmp: Path) -> tuple[str, str]:
    """The (object name, kind) of the checkpoint a remote ``latest`` pointer object names."""
    local = tmp / ".pointer"
    store.download_object(pointer, str(local), overwrite=True)
    target = local.read_text(encoding="utf-8")
    local.unlink()
    for name in _pointer_candidates(target, posixpath.dirname(pointer)):
        kind = _remote_kind(store, name)
        if kind is not None:
            return name, kind
    raise CheckpointError(
        f"{root}/{pointer} names {root}/{target.strip()}, which is neither an object nor a "
        f"sharded checkpoint folder (with {_DCP_METADATA}); it may have been deleted"
    )


def _checkpoints_in(names: list[str], folder: str) -> list[str]:
    """Checkpoint files and sharded folders directly under ``folder``, for error messages."""
    found = set()
    for name in names:
        rest = name[len(folder) :].lstrip("/")
        if "/" not in rest and rest.endswith((".pt", ".pt.tar")):
            found.add(rest)
        elif rest.endswith(f"/{_DCP_METADATA}") and rest.count("/") == 1:
            found.add(rest.split("/")[0] + "/")
    return sorted(found)


def _remote_checkpoint(store: Any, uri: str, root: str, key: str, tmp: Path) -> tuple[str, str]:
    """Resolve a remote URI to the one checkpoint it means: (object name, kind).

    A file name is taken as is (or, missing, through its ``.symlink`` as Composer does); a
    ``.symlink`` is followed; a prefix is a save_folder (its ``latest-rank0.pt.symlink`` is
    followed) or a sharded checkpoint folder (holds ``.metadata``). Nothing else is accepted.
    """
    if key.endswith(".symlink"):
        if _remote_kind(store, key) != "file":
            raise CheckpointError(f"{uri}: no such object")
        return _follow_remote_pointer(store, root, key, tmp)
    if key.endswith((".pt", ".pt.tar")):
        kind = _remote_kind(store, key)
        if kind is not None:
            return key, kind
        if _remote_kind(store, key + ".symlink") == "file":
            return _follow_remote_pointer(store, root, key + ".symlink", tmp)
        raise CheckpointError(f"{uri}: no such object (nor {key}.symlink pointing at one)")
    folder = key.rstrip("/")
    pointer = posixpath.join(folder, _LATEST_POINTER)
    if _remote_kind(store, pointer) == "file":
        return _follow_remote_pointer(store, root, pointer, tmp)
    if _is_sharded(store, folder):
        return folder, "sharded"
    names = store.list_objects(f"{folder}/" if folder else "")
    if not names:
        raise CheckpointError(f"{uri}: no objects under this prefix (expected a .pt or a folder)")
    found = _checkpoints_in(names, folder)
    hint = f"; checkpoints here: {', '.join(found[-5:])}" if found else ""
    raise CheckpointError(
        f"{uri}: neither a save_folder (no {_LATEST_POINTER}) nor a sharded checkpoint folder "
        f"(no {_DCP_METADATA}); pass a checkpoint's .pt or sharded folder URI{hint}"
    )


def _download(uri: str, tmp: Path) -> Path:
    """Fetch the one checkpoint a remote URI names (see :func:`_remote_checkpoint`) into ``tmp``.

    Only that checkpoint's objects are downloaded: for a save_folder, the newest checkpoint its
    ``latest`` pointer names, never the other checkpoints kept next to it.
    """
    from composer.utils import get_file, maybe_create_object_store_from_uri, parse_uri

    scheme, bucket, path = parse_uri(uri)
    if scheme in ("http", "https"):  # one file; nothing to list or follow
        dest = tmp / (posixpath.basename(path) or "checkpoint.pt")
        try:
            get_file(uri, str(dest), progress_bar=False)
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: not found") from None
        return dest
    try:
        store = maybe_create_object_store_from_uri(uri)
    except NotImplementedError as err:
        raise CheckpointError(f"{uri}: {err}") from None
    if store is None:
        raise CheckpointError(f"{uri}: not an object-store URI (s3://, gs://, oci://, ...)")
    root = f"{scheme}://{bucket}"
    name, kind = _remote_checkpoint(store, uri, root, path.strip("/"), tmp)
    dest = tmp / posixpath.basename(name)
    if kind == "file":
        log.info("downloading %s/%s", root, name)
        store.download_object(name, str(dest))
        return dest
    prefix = f"{name}/" if name else ""
    objects = [n for n in store.list_objects(prefix) if "/" not in n[len(prefix) :]]
    log.info("downloading %s/%s (%d objects)", root, prefix, len(objects))
    for obj in objects:
        store.download_object(obj, str(dest / obj[len(prefix) :]))
    return dest


def _resolve_local(path: Path) -> Path:
    """A checkpoint file, a sharded folder, or a save_folder (its ``latest-rank0.pt``, or the
    ``latest-rank0.pt.symlink`` pointer file of a save_folder copied from a bucket)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.is_dir() and not (path / _DCP_METADATA).is_file():
        latest = path / _LATEST_LINK
        if latest.exists():
            return latest.resolve()
        pointer = path / _LATEST_POINTER  # a save_folder copied down from a bucket
        if pointer.is_file():
            target = pointer.read_text(encoding="utf-8")
            for name in _pointer_candidates(target, ""):
                if (path / name).exists():
                    return path / name
            raise CheckpointError(f"{pointer} names {target.strip()}, which is not in {path}")
        if latest.is_symlink():
            raise CheckpointError(f"{latest} points at {os.readlink(latest)}, which does not exist")
        raise CheckpointError(
            f"{path}: a folder without {_DCP_METADATA} (not a sharded checkpoint) and without "
            f"{_LATEST_LINK}; pass a .pt file or a sharded checkpoint folder"
        )
    return path


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> LoadedCheckpoint:
    """Read the network weights and run spec of a Composer checkpoint (local or remote URI).

    Args:
        path: A monolithic ``.pt``, a sharded checkpoint folder (``.metadata`` + ``*.distcp``),
            a ``save_folder`` (its newest checkpoint, through ``latest-rank0.pt`` or, as in a
            bucket, ``latest-rank0.pt.symlink``), or an object-store URI of any of these.
        trust: Allow full unpickling when the file holds types outside the allow-list.
    """
    src = str(path)
    with tempfile.TemporaryDirectory(prefix="mpt-ckpt-") as tmp:
        local = _download(src, Path(tmp)) if "://" in src else _resolve_local(Path(src))
        raw = _read_sharded(local) if local.is_dir() else _read_monolithic(local, trust)
    state = raw.get("state") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{src}: not a Composer checkpoint (no state['model'])")
    weights = {
        k[len(_MODEL_PREFIX) :]: v
        for k, v in state["model"].items()
        if k.startswith(_MODEL_PREFIX) and isinstance(v, torch.Tensor)
    }
    if not weights:
        raise CheckpointError(f"{src}: state['model'] has no '{_MODEL_PREFIX}*' tensors")
    spec = state.get("callbacks", {}).get(_SPEC_KEY, {}).get("spec")
    return LoadedCheckpoint(weights, spec, src)
