"""Hugging Face MPT folders from training checkpoints, and back."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from mpt_train.export.checkpoint import (
    _MODEL_PREFIX,
    CheckpointError,
    LoadedCheckpoint,
    read_checkpoint,
)
from mpt_train.model import MPTConfig, MPTModel
from mpt_train.model.hf import config_to_hf, from_hf, to_hf

__all__ = ["export_hf", "import_hf", "is_hf_folder", "load_model", "model_config_from_spec"]

log = logging.getLogger(__name__)


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
    overwrite: bool = False,
) -> Path:
    """Write a transformers ``MptForCausalLM`` folder for a Composer checkpoint.

    Args:
        checkpoint: See :func:`read_checkpoint`.
        out_dir: Created if missing. The export is written beside it first; a folder holding
            files this export does not write is refused unless ``overwrite`` (then they are
            left there, and same-named files are replaced).
        spec_path: A run spec YAML, for checkpoints that do not carry one.
        tokenizer: Tokenizer name/path to save alongside (default: the spec's ``tokenizer``).
        max_seq_len: ``config.max_seq_len`` to export (transformers sizes its ALiBi table by
            it); default the trained length.
        dtype: Cast weights (e.g. ``torch.bfloat16``); default as stored (fp32).
        trust: See :func:`read_checkpoint`.
        overwrite: Export into a folder that holds other files.

    Raises:
        CheckpointError: unreadable checkpoint or no spec, or ``out_dir`` holds other files.
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.export-", dir=out.parent) as tmp:
        staged = Path(tmp)
        hf.save_pretrained(staged, safe_serialization=True)
        if tok is not None:
            tok.model_max_length = hf.config.max_seq_len
            tok.save_pretrained(staged)
        else:
            log.warning("no tokenizer in the spec or arguments: %s has no tokenizer files", out)
        _publish(staged, out, overwrite)
    log.info("exported %s -> %s (%.1fM params)", checkpoint, out, hf.num_parameters() / 1e6)
    return out


def _publish(staged: Path, out: Path, overwrite: bool) -> None:
    """Move the staged export into ``out`` with ordinary permissions (rw-r--r--), refusing a
    folder that holds files this export does not write unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} is a file, not a folder")
    written = {p.name for p in staged.iterdir()}
    others = sorted(p.name for p in out.iterdir() if p.name not in written) if out.is_dir() else []
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (f", ... ({len(others)} in all)" if len(others) > 3 else "")
        raise CheckpointError(
            f"output folder {out} holds files this export does not write ({shown}); choose an "
            "empty folder, or pass --overwrite to export into it anyway"
        )
    out.mkdir(exist_ok=True)
    for p in staged.iterdir():
        p.chmod(0o644)
        os.replace(p, out / p.name)


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
