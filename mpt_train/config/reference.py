"""The run-spec reference page, written from the typed schema itself.

Every section of :class:`~mpt_train.config.schema.RunConfig` is a dataclass; this walks them
and writes each key with its type, default and description (the class's ``Attributes:``
docstring entry or the comment above the field). ``docs/specs.md`` is this output, and a test
compares them, so the page lists exactly the keys the loader accepts.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any

from mpt_train.config.schema import RunConfig

__all__ = ["describe_fields", "render_reference"]

_FIELD = re.compile(r"^    (\w+): [^=]+?(?:=.*?)?(?:\s+#\s*(.*))?$")
_COMMENT = re.compile(r"^    #\s?(.*)$")
_ATTR = re.compile(r"^\s{4,8}(\w+):\s+(.*)$")


def describe_fields(cls: type) -> dict[str, str]:
    """Each field's description: its ``Attributes:`` entry, else the comments above it (a
    subclass's own first, then its bases')."""
    out: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        out.update(_own_descriptions(base))
    return out


def _own_descriptions(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" in doc:
        key = None
        for line in doc.split("Attributes:", 1)[1].splitlines():
            m = re.match(r"^    (\w+):\s+(.*)$", line)
            if m:
                key = m.group(1)
                out[key] = m.group(2).strip()
            elif key and line.startswith("        "):
                out[key] += " " + line.strip()
            elif line.strip():
                key = None
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        comment, field = _COMMENT.match(line), _FIELD.match(line)
        if comment:
            pending.append(comment.group(1).strip())
        elif field:
            text = " ".join([*pending, field.group(2) or ""]).strip()
            if text and field.group(1) not in out:
                out[field.group(1)] = text
            pending = []
        else:
            pending = []
    return out


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in _args(tp))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return f"list of {_type_name(_args(tp)[0])}"
    if origin is dict:
        return f"map of {_type_name(_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _section_of(tp: Any) -> tuple[type | None, str]:
    """The dataclass a field holds and how its key is written below it (``x``, ``x.<name>``,
    ``x[]``)."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if _is_union(tp):
        for a in _args(tp):
            found, suffix = _section_of(a)
            if found is not None:
                return found, suffix
    origin = typing.get_origin(tp)
    if origin is list and dataclasses.is_dataclass(_args(tp)[0]):
        return _args(tp)[0], "[]"
    if origin is dict and dataclasses.is_dataclass(_args(tp)[1]):
        return _args(tp)[1], ".<name>"
    return None, ""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "on (its defaults)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(cls: type, key: str, seen: list[tuple[str, type]]) -> None:
    seen.append((key, cls))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub, suffix = _section_of(hints[f.name])
        if sub is not None:
            _sections(sub, f"{key}.{f.name}{suffix}" if key else f"{f.name}{suffix}", seen)


# Top-level keys whose meaning the schema leaves to their name.
TOP_LEVEL = {
    "model": "The architecture (`yamls/models/` holds the published sizes).",
    "max_duration": "Length of the run in Composer time: `ba` (batches), `tok`, `ep`, `sp`.",
    "global_train_batch_size": "Sequences per optimizer step, across all GPUs.",
    "variables": "Free values, used elsewhere as `${variables.x}`.",
    "run_name": "Names `runs/<run_name>/` and the checkpoints; fixed, it makes the run "
    "resumable (also `$RUN_NAME`).",
    "seed": "Seeds the model's initialisation, the data order and dropout.",
    "eval_loader": "Loss and perplexity on a held-out split at `eval_interval`.",
    "eval_loaders": "Several labelled eval sets instead of one.",
    "eval_interval": "How often evaluation runs (Composer time).",
    "eval_first": "Evaluate once before the first step (logged as step 0).",
    "eval_subset_num_batches": "Batches per evaluation; -1 = the whole set.",
    "device_eval_batch_size": "Sequences per GPU per eval batch.",
    "device": "`auto` (GPU when there is one), `gpu` or `cpu`.",
    "save_folder": "Checkpoint folder or `s3://` prefix; `{run_name}` is filled in.",
    "save_interval": "How often a checkpoint is saved (Composer time).",
    "save_num_checkpoints_to_keep": "Older checkpoints are removed beyond this many; -1 keeps all.",
    "save_overwrite": "Allow overwriting checkpoints already in `save_folder`.",
    "load_path": "A checkpoint to start from (local path or `s3://`).",
    "load_weights_only": "Load only the weights from `load_path` (a fine-tune), not the "
    "optimizer, schedule or data position.",
    "load_strict_model_weights": "Refuse a `load_path` whose weights do not match the model.",
    "progress_bar": "Composer's progress bar instead of the one-line console log.",
}


# Keys whose section documents them in prose only, by section class and field.
NOTES: dict[str, dict[str, str]] = {
    "MPTConfig": {
        "d_model": "Width of the residual stream.",
        "n_heads": "Attention heads; must divide `d_model`.",
        "n_layers": "Transformer blocks.",
        "expansion_ratio": "MLP width as a multiple of `d_model`.",
        "max_seq_len": "Longest sequence the model is built for (ALiBi evaluates beyond it).",
        "vocab_size": "Embedding rows; GPT-NeoX-20B's 50277 ids padded to a multiple of 64.",
        "no_bias": "No bias in any linear layer or LayerNorm (MPT).",
        "norm_type": "`low_precision_layernorm` (MPT: in the autocast dtype), `layernorm` or `rmsnorm`.",
        "norm_eps": "LayerNorm epsilon.",
        "learned_pos_emb": "Learned position embeddings (MPT uses ALiBi instead).",
        "logit_scale": "Multiply the output logits by this; null = 1.",
        "embedding_fraction": "Scale the embedding's gradient by this fraction (1 = plain).",
        "emb_pdrop": "Dropout after the embedding.",
        "resid_pdrop": "Dropout on each block's residual branches.",
        "init_device": "`cpu`, or `meta`: build without storage and materialise on the GPU "
        "(only the local shards under FSDP).",
    },
    "AttentionConfig": {
        "impl": "`torch`, `sdpa`, `flex`, `flash` or `cudnn` ([models.md](models.md#attention-kernels)).",
        "alibi": "ALiBi position bias (MPT).",
        "alibi_bias_max": "ALiBi's largest slope exponent (MPT: 8).",
        "qk_ln": "LayerNorm on queries and keys.",
        "clip_qkv": "Clamp the QKV projection to +- this; null = no clamp.",
        "softmax_scale": "Attention scale; null = 1 / sqrt(head dim).",
        "kv_n_heads": "Key/value heads for grouped-query attention; null = `n_heads`.",
        "attn_pdrop": "Attention dropout.",
        "attn_uses_sequence_id": "Mask attention between packed documents (`sequence_id`).",
        "flex_kernel_options": "FlexAttention kernel options, passed unchanged; speed only.",
        "sdpa_backends": "SDPA kernels `impl: sdpa` may use; empty = all.",
    },
    "InitConfig": {
        "name": "`kaiming_normal` (MPT) or `normal`.",
        "fan_mode": "`fan_in` or `fan_out` for kaiming init.",
        "init_gain": "Negative slope for `init_nonlinearity: leaky_relu`.",
        "init_nonlinearity": "`relu` or `leaky_relu`.",
        "init_std": "Standard deviation for `name: normal`.",
        "emb_init_std": "The embedding's own standard deviation; null = as the other layers.",
        "init_div_is_residual": "Divide residual output projections by sqrt(2 * n_layers).",
    },
    "TokenizerConfig": {
        "name": "Hugging Face tokenizer name or local path (`mpt-train/tiny-bpe` is shipped).",
        "kwargs": "Passed to `AutoTokenizer.from_pretrained`.",
    },
    "OptimizerConfig": {
        "name": "`decoupled_adamw`, `decoupled_lionw` or `adamw`.",
        "lr": "Peak learning rate.",
        "betas": "The two moment decay rates.",
        "eps": "Adam's epsilon.",
        "weight_decay": "Decoupled (absolute) for `decoupled_*`; multiplied by lr for `adamw`.",
        "decay_embeddings": "Also decay the embedding (MPT does not).",
    },
    "SchedulerConfig": {
        "name": "`cosine_with_warmup`, `linear_decay_with_warmup` or `constant_with_warmup`.",
        "t_warmup": "Warmup length in Composer time; shorter than the run.",
        "alpha_f": "Final learning rate as a fraction of `optimizer.lr`.",
        "t_max": "Length of the decay (`1dur` = the whole run).",
    },
    "GradientClippingConfig": {
        "clipping_type": "`norm`, `value` or `adaptive`.",
        "clipping_threshold": "Largest gradient norm (or value).",
        "implementation": "`auto`, `fused` (into torch's fused AdamW) or `composer`.",
    },
    "FSDPConfig": {
        "sharding_strategy": "`FULL_SHARD`, `SHARD_GRAD_OP`, `HYBRID_SHARD` or `NO_SHARD`.",
        "mixed_precision": "`DEFAULT`, `PURE` (bf16 parameters and gradients) or `FULL`.",
        "activation_checkpointing": "Recompute each block in backward.",
        "activation_cpu_offload": "Keep saved activations on the host.",
        "limit_all_gathers": "Limit in-flight all-gathers (less memory).",
        "state_dict_type": "`sharded` (one file per rank) or `full` checkpoints.",
    },
    "CompileConfig": {
        "enabled": "Compile each block with `torch.compile`.",
        "mode": "`torch.compile` mode (`default`, `reduce-overhead`, `max-autotune`, "
        "`max-autotune-no-cudagraphs`); null = default.",
        "dynamic": "Dynamic shapes (off: one compile per shape).",
        "fullgraph": "Fail on a graph break instead of falling back to eager.",
    },
    "LoggersConfig": {
        "console": "Rank 0's one-line progress log.",
        "console_log_interval": "How often it prints (Composer time).",
    },
    "WandbLoggerConfig": {
        "project": "W&B project.",
        "entity": "W&B team or user.",
        "group": "W&B run group.",
        "tags": "W&B run tags.",
        "log_artifacts": "Upload checkpoints as W&B artifacts.",
    },
    "JsonlLoggerConfig": {"path": "Where the metrics file goes."},
    "CallbacksConfig": {
        "lr_monitor": "Log the learning rate.",
        "memory_monitor": "Log GPU memory.",
        "runtime_estimator": "Log the estimated time left.",
    },
    "SpeedMonitorConfig": {"window_size": "Steps averaged for throughput and MFU."},
    "CostMonitorConfig": {"log_interval": "Steps between cost lines."},
}


def _notes(cls: type) -> dict[str, str]:
    """The descriptions of ``cls``'s fields; a note for a field that does not exist fails."""
    notes = {**NOTES.get(cls.__name__, {}), **describe_fields(cls)}
    if cls is RunConfig:
        notes = {**TOP_LEVEL, **notes}
    names = {f.name for f in dataclasses.fields(cls)}
    stale = sorted(set(NOTES.get(cls.__name__, {})) - names)
    if cls is RunConfig:
        stale += sorted(set(TOP_LEVEL) - names)
    if stale:
        raise KeyError(f"{cls.__name__} has no field {stale[0]!r} (mpt_train/config/reference.py)")
    return notes


def _section_text(key: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    notes = _notes(cls)
    doc = (inspect.getdoc(cls) or "").split("Attributes:", 1)[0].strip()
    lines = [f"## `{key}`" if key else "## Top level", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        name = f"{key}.{f.name}" if key else f.name
        if f.name not in notes and _section_of(hints[f.name])[0] is not None:
            notes[f.name] = "a section: its keys follow"
        lines.append(
            f"| `{name}` | {_cell(_type_name(hints[f.name]))} | {_cell(_default(f))} | "
            f"{_cell(notes.get(f.name, ''))} |"
        )
    return [*lines, ""]


def render_reference(root: type = RunConfig) -> str:
    """Every section and key of the run spec, as markdown (the body of ``docs/specs.md``).
    A section type met again (``eval_loader.dataset``) points at its first table."""
    found: list[tuple[str, type]] = []
    _sections(root, "", found)
    lines = ["Sections: " + ", ".join(f"`{k}`" for k, _ in found if k), ""]
    first: dict[type, str] = {}
    for key, cls in found:
        if cls in first:
            lines += [f"## `{key}`", "", f"The keys of `{first[cls]}`, under `{key}`.", ""]
            continue
        first[cls] = key
        lines += _section_text(key, cls)
    return "\n".join(lines).rstrip() + "\n"
