"""``scripts/eval.py SPEC``: a typed eval spec, and the run that reports loss, perplexity, ICL.

An eval spec names one model (a Composer checkpoint or an HF MPT folder), its eval sets and its
ICL tasks::

    model: runs/quickstart/checkpoints          # checkpoint, save_folder, s3:// or HF folder
    eval_sets:
      val: {mds: data/quickstart, split: val, max_seq_len: 128}
      notes: {jsonl: my_texts.jsonl, max_seq_len: 256}
    icl_tasks:
      - {label: stdlib_mc, path: icl/stdlib_mc.jsonl, kind: multiple_choice, num_fewshot: 2}

Unknown keys are rejected with the dotted key, like run specs.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mpt_train.errors import ConfigError
from mpt_train.eval.icl import ICLTaskConfig, build_icl_task, evaluate_icl, for_model
from mpt_train.eval.perplexity import EvalSetConfig, evaluate_perplexity

__all__ = ["EvalSpec", "load_eval_spec", "run_eval"]

log = logging.getLogger(__name__)


@dataclass
class EvalSpec:
    """What to evaluate.

    Attributes:
        model: Checkpoint path/URI or HF MPT folder.
        spec: Run spec YAML for checkpoints that carry none.
        tokenizer: Override the tokenizer (default: the checkpoint spec's / the HF folder's).
        attn_impl: Attention kernel to run with (default: as trained).
        eval_sets: Named loss/perplexity sets.
        icl_tasks: ICL tasks.
        device: ``cpu`` or ``cuda``.
        precision: ``fp32``, or ``amp_bf16`` / ``amp_fp16`` (autocast, as training ran on
            GPUs; ``flash`` attention needs one of them).
    """

    model: str = ""
    spec: str | None = None
    tokenizer: str | None = None
    attn_impl: str | None = None
    eval_sets: dict[str, EvalSetConfig] = field(default_factory=dict)
    icl_tasks: list[ICLTaskConfig] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "amp_bf16", "amp_fp16"):
            raise ConfigError(
                "precision", f"got {self.precision!r}, expected fp32, amp_bf16 or amp_fp16"
            )
        if not self.model:
            raise ConfigError("model", "required: a checkpoint or HF folder")
        if not self.eval_sets and not self.icl_tasks:
            raise ConfigError("eval_sets", "nothing to evaluate: give eval_sets or icl_tasks")


def _make(cls: type, values: dict[str, Any], key: str) -> Any:
    """Instantiate a section, unknown keys and ``__post_init__`` errors named by dotted key."""
    names = {f.name for f in fields(cls)}
    for k in values:
        if k not in names:
            near = difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.6)
            hint = f"did you mean {key}.{near[0]}? " if near else ""
            raise ConfigError(
                f"{key}.{k}", f"unknown key ({hint}valid keys here: {', '.join(sorted(names))})"
            )
    try:
        return cls(**values)
    except ConfigError as err:
        raise err.with_prefix(key) from None


def load_eval_spec(path: str | Path, overrides: list[str] | None = None) -> EvalSpec:
    """Read and check an eval spec; a :class:`ConfigError` names the dotted key to fix."""
    if not Path(path).is_file():
        raise ConfigError("spec", f"file not found: {path}")
    try:
        raw = OmegaConf.load(path)
        if overrides:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides))
        data = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(path), str(err).splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "an eval spec must be a mapping")
    sets = data.pop("eval_sets", None) or {}
    tasks = data.pop("icl_tasks", None) or []
    if not isinstance(sets, dict) or not isinstance(tasks, list):
        raise ConfigError("eval_sets", "eval_sets must be a mapping, icl_tasks a list")
    data["eval_sets"] = {
        str(n): _make(EvalSetConfig, dict(v or {}), f"eval_sets.{n}") for n, v in sets.items()
    }
    data["icl_tasks"] = [
        _make(ICLTaskConfig, dict(v or {}), f"icl_tasks.{i}") for i, v in enumerate(tasks)
    ]
    return _make(EvalSpec, data, "")


def run_eval(spec: EvalSpec) -> dict[str, Any]:
    """Evaluate and return ``{'eval/<set>/loss', 'eval/<set>/perplexity', 'icl/<t>/accuracy'}``."""
    from mpt_train.data import load_tokenizer
    from mpt_train.export import load_model

    if str(spec.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{spec.device!r} but no CUDA device is visible; use cpu")
    model, tok_name = load_model(spec.model, spec_path=spec.spec, impl=spec.attn_impl)
    model = model.to(spec.device)
    try:
        tokenizer = load_tokenizer(spec.tokenizer or tok_name or "")
    except ConfigError as err:
        raise ConfigError("tokenizer", err.msg) from None
    results: dict[str, Any] = {}
    with _precision(spec):
        _evaluate(spec, model, tokenizer, results)
    return results


def _precision(spec: EvalSpec) -> contextlib.AbstractContextManager:
    """Autocast for ``amp_*`` (the dtype training's forward ran in), nothing for fp32."""
    if spec.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if spec.precision == "amp_bf16" else torch.float16
    return torch.autocast(torch.device(spec.device).type, dtype=dtype)


def _evaluate(spec: EvalSpec, model: Any, tokenizer: Any, results: dict[str, Any]) -> None:
    for name, es in spec.eval_sets.items():
        t0 = time.monotonic()
        try:
            r = evaluate_perplexity(model, es, tokenizer)
        except ConfigError as err:
            raise err.with_prefix(f"eval_sets.{name}") from None
        results[f"eval/{name}/loss"] = r.loss
        results[f"eval/{name}/perplexity"] = r.perplexity
        results[f"eval/{name}/tokens"] = r.tokens
        log.info(
            "%s: loss %.4f ppl %.2f (%d tokens, %.1fs)",
            name,
            r.loss,
            r.perplexity,
            r.tokens,
            time.monotonic() - t0,
        )
    for i, tc in enumerate(spec.icl_tasks):
        tc = for_model(tc, model.cfg.learned_pos_emb, model.cfg.max_seq_len)
        try:
            task = build_icl_task(tc, tokenizer)
        except ConfigError as err:
            raise err.with_prefix(f"icl_tasks.{i}") from None
        results[f"icl/{tc.label}/accuracy"] = evaluate_icl(model, task)
