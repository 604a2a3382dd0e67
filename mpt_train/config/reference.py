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
    """Each field's description: its ``Attributes:`` entry, else the comments above it."""
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
    "dist_timeout": "Seconds a collective waits for the other ranks before failing.",
    "progress_bar": "Composer's progress bar instead of the one-line console log.",
}


def _section_text(key: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    notes = describe_fields(cls)
    if cls is RunConfig:
        notes = {**TOP_LEVEL, **notes}
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
