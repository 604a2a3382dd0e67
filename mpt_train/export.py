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
read key by key without a process group. ``s3://`` (any Composer object store URI) is
downloaded to a temporary folder first.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mpt_train.model import MPTConfig, MPTModel
from mpt_train.model.hf import config_to_hf, from_hf, to_hf

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "export_hf",
    "import_hf",
    "is_hf_folder",
    "load_model",
    "model_config_from_spec",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

_MODEL_PREFIX = "model."  # ComposerMPT keeps the network as ``self.model``
_SPEC_KEY = "RunSpecRecorder"
_DCP_METADATA = ".metadata"


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

    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    spec_prefix = f"state.callbacks.{_SPEC_KEY}.spec"
    keys = {k for k in meta.state_dict_metadata if k.startswith("state.model.") or k == spec_prefix}
    if not any(k.startswith("state.model.") for k in keys):
        raise CheckpointError(f"{folder}: sharded checkpoint holds no state.model.* tensors")
    has_spec = any(k.startswith(spec_prefix) for k in meta.state_dict_metadata)
    if has_spec:
        keys.add(spec_prefix)
    return _load_state_dict_from_keys(keys=keys, checkpoint_id=str(folder))


def _download(uri: str, tmp: Path) -> Path:
    """Fetch a remote checkpoint file, or every object of a remote sharded folder, into ``tmp``."""
    from composer.utils import get_file, maybe_create_object_store_from_uri, parse_uri

    if uri.endswith((".pt", ".pt.tar")):
        dest = tmp / os.path.basename(uri)
        get_file(uri, str(dest), progress_bar=False)
        return dest
    store = maybe_create_object_store_from_uri(uri)
    _, _, prefix = parse_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    names = store.list_objects(prefix)
    if not names:
        raise CheckpointError(f"{uri}: no objects under this prefix (expected a .pt or a folder)")
    for name in names:
        dest = tmp / name[len(prefix) :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_object(name, str(dest))
    return tmp


def _resolve_local(path: Path) -> Path:
    """A checkpoint file, a sharded folder, or a save_folder (its ``latest-rank0.pt``)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.is_dir() and not (path / _DCP_METADATA).is_file():
        latest = path / "latest-rank0.pt"
        if latest.exists():
            return latest.resolve()
        raise CheckpointError(
            f"{path}: a folder without {_DCP_METADATA} (not a sharded checkpoint) and without "
            "latest-rank0.pt; pass a .pt file or a sharded checkpoint folder"
        )
    return path


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> LoadedCheckpoint:
    """Read the network weights and run spec of a Composer checkpoint (local or remote URI).

    Args:
        path: A monolithic ``.pt``, a sharded checkpoint folder (``.metadata`` + ``*.distcp``),
            a ``save_folder`` holding ``latest-rank0.pt``, or an object-store URI of either.
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


def model_config_from_spec(spec: dict[str, Any], source: str = "spec") -> MPTConfig:
    """The ``model`` section of a run spec as an :class:`MPTConfig` (validated)."""
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{source}: the run spec has no 'model' section")
    try:
        return MPTConfig(**{**model, "init_device": "cpu"})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: model section invalid: {err}") from None


def _spec_for(ckpt: LoadedCheckpoint, spec_path: str | os.PathLike | None) -> dict[str, Any]:
    if spec_path is not None:
        return yaml.safe_load(Path(spec_path).read_text())
    if ckpt.spec is None:
        raise CheckpointError(
            f"{ckpt.source}: holds no run spec (RunSpecRecorder state); pass the run's "
            "config.yaml (runs/<run_name>/config.yaml) as spec_path / --spec"
        )
    return ckpt.spec


def _build(cfg: MPTConfig, weights: dict[str, torch.Tensor], source: str) -> MPTModel:
    with torch.device("meta"):
        model = MPTModel(cfg)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not match the spec's model: {err}") from None
    return model.eval()


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder with a transformers ``config.json`` of ``model_type`` mpt."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    return json.loads(cfg.read_text()).get("model_type") == "mpt"


def load_model(
    path: str | os.PathLike,
    *,
    spec_path: str | os.PathLike | None = None,
    impl: str | None = None,
    trust: bool = False,
) -> tuple[MPTModel, str | None]:
    """An eval-mode :class:`MPTModel` and its tokenizer name/path, from a checkpoint or HF folder.

    ``impl`` overrides the attention kernel (e.g. ``torch`` for CPU inference).
    """
    if "://" not in str(path) and is_hf_folder(path):
        from transformers import MptForCausalLM

        model = from_hf(MptForCausalLM.from_pretrained(str(path)), impl or "sdpa")
        return model.eval(), str(path)
    ckpt = read_checkpoint(path, trust=trust)
    spec = _spec_for(ckpt, spec_path)
    cfg = model_config_from_spec(spec, str(spec_path or path))
    if impl is not None:
        cfg.attn_config.impl = impl
    tokenizer = (spec.get("tokenizer") or {}).get("name")
    return _build(cfg, ckpt.model_state, ckpt.source), tokenizer


def export_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    spec_path: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
    trust: bool = False,
) -> Path:
    """Write a transformers ``MptForCausalLM`` folder for a Composer checkpoint.

    Args:
        checkpoint: See :func:`read_checkpoint`.
        out_dir: Created if missing; existing files with the same names are replaced.
        spec_path: A run spec YAML, for checkpoints that do not carry one.
        tokenizer: Tokenizer name/path to save alongside (default: the spec's ``tokenizer``).
        max_seq_len: ``config.max_seq_len`` to export (transformers sizes its ALiBi table by
            it); default the trained length.
        dtype: Cast weights (e.g. ``torch.bfloat16``); default as stored (fp32).
        trust: See :func:`read_checkpoint`.

    Raises:
        CheckpointError: unreadable checkpoint or no spec.
        ValueError: the model config has no transformers MPT equivalent (names each reason).
    """
    from transformers import GenerationConfig

    from mpt_train.data import load_tokenizer

    ckpt = read_checkpoint(checkpoint, trust=trust)
    spec = _spec_for(ckpt, spec_path)
    cfg = model_config_from_spec(spec, str(spec_path or checkpoint))
    config_to_hf(cfg, max_seq_len)  # refuse before reading more or writing anything
    hf = to_hf(_build(cfg, ckpt.model_state, ckpt.source), max_seq_len)
    if dtype is not None:
        hf = hf.to(dtype)
    tok_name = tokenizer or (spec.get("tokenizer") or {}).get("name")
    tok = load_tokenizer(tok_name) if tok_name else None
    if tok is not None:
        hf.config.eos_token_id = tok.eos_token_id
        hf.config.bos_token_id = tok.bos_token_id
        hf.config.pad_token_id = tok.pad_token_id
    hf.generation_config = GenerationConfig(
        eos_token_id=hf.config.eos_token_id,
        bos_token_id=hf.config.bos_token_id,
        pad_token_id=hf.config.pad_token_id
        if hf.config.pad_token_id is not None
        else hf.config.eos_token_id,
        use_cache=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    if tok is not None:
        tok.model_max_length = hf.config.max_seq_len
        tok.save_pretrained(out)
    else:
        log.warning("no tokenizer in the spec or arguments: %s has no tokenizer files", out)
    log.info("exported %s -> %s (%.1fM params)", checkpoint, out, hf.num_parameters() / 1e6)
    return out


def import_hf(
    hf_dir: str | os.PathLike, out_path: str | os.PathLike, *, impl: str = "sdpa"
) -> Path:
    """Write a weights-only Composer checkpoint from an HF MPT folder, to start a fine-tune.

    The file holds ``{'state': {'model': {'model.<name>': tensor}, ...}}``: exactly what
    ``load_path`` + ``load_weights_only: true`` restores into :class:`ComposerMPT`. The matching
    ``model:`` section is written next to it (``<out>.model.yaml``) to paste into the spec.
    """
    from omegaconf import OmegaConf
    from transformers import MptForCausalLM

    if not is_hf_folder(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a transformers MPT folder (config.json model_type)")
    model = from_hf(MptForCausalLM.from_pretrained(str(hf_dir)), impl)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {_MODEL_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save({"state": {"model": weights, "integrations": {}, "metadata": {}}}, out)

    section = OmegaConf.to_container(OmegaConf.structured(model.cfg), enum_to_str=True)
    Path(str(out) + ".model.yaml").write_text(yaml.safe_dump({"model": section}, sort_keys=False))
    log.info("imported %s -> %s", hf_dir, out)
    return out
