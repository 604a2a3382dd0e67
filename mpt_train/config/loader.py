"""YAML + ``a.b=c`` overrides -> a typed :class:`RunConfig`, or a ConfigError naming the key.

Every key is checked against the schema at any depth before anything is built: a typo such as
``optimizer.weight_decy`` fails at once with the dotted key and the nearest valid one, instead of
being silently ignored or surfacing as a traceback from deep inside Composer.
YAML is read with omegaconf's safe loader (no object construction from tags).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mpt_train.config.schema import RunConfig
from mpt_train.errors import ConfigError

__all__ = ["load_config", "load_config_dict", "to_container"]


def load_config(spec: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run spec file (or none: overrides only) and apply CLI overrides."""
    raw = _read_yaml(Path(spec)) if spec is not None else OmegaConf.create({})
    if overrides:
        raw = OmegaConf.merge(raw, _parse_overrides(overrides))
    return _build(raw)


def load_config_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Like :func:`load_config` for a spec already in memory (sweeps, tests)."""
    if not isinstance(data, dict):
        raise ConfigError(
            "", f"a run spec must be a mapping of sections, got {type(data).__name__}"
        )
    try:
        raw = OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise ConfigError("", f"cannot read the spec: {_first_line(e)}") from None
    if overrides:
        raw = OmegaConf.merge(raw, _parse_overrides(overrides))
    return _build(raw)


def to_container(cfg: RunConfig) -> dict[str, Any]:
    """The resolved spec as plain dicts and lists (for logging and saving)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def _read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a spec file; its ``includes:`` (paths relative to it) are merged underneath it."""
    if path.resolve() in _seen:
        raise ConfigError(
            "includes", f"{path} includes itself (via {' -> '.join(map(str, _seen))})"
        )
    if not path.is_file():
        raise ConfigError("spec", f"file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        loc = f"{path}:{where.line + 1}" if where is not None else str(path)
        raise ConfigError("spec", f"{loc}: invalid YAML: {getattr(e, 'problem', e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError("spec", f"{path}: {_first_line(e)}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError("spec", f"{path}: a run spec must be a mapping of sections")
    includes = raw.pop("includes", None)
    if includes is None:
        return raw
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, ListConfig) and not isinstance(includes, list):
        raise ConfigError("includes", f"{path}: expected a list of spec files")
    base = OmegaConf.create({})
    for inc in includes:
        base = OmegaConf.merge(base, _read_yaml(path.parent / str(inc), (*_seen, path.resolve())))
    return OmegaConf.merge(base, raw)


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.strip():
            raise ConfigError("", f"override {item!r} is not of the form a.b=c")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(
            "", f"cannot parse overrides {list(overrides)}: {_first_line(e)}"
        ) from None


def _build(raw: DictConfig) -> RunConfig:
    _check_keys(raw, RunConfig, "")
    _fill_run_name(raw)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
    except OmegaConfBaseException as e:
        raise ConfigError(_key_of(e), _first_line(e)) from None
    return _construct(RunConfig, merged, "")


def _fill_run_name(raw: DictConfig) -> None:
    if raw.get("run_name") is None and os.environ.get("RUN_NAME"):
        raw.run_name = os.environ["RUN_NAME"]


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``, if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _container_of(tp: Any) -> tuple[type | None, Any]:
    """(dict or list, element type) for ``dict[str, X]`` / ``list[X]`` (optionally Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _container_of(arg)
    if origin in (dict, list):
        args = typing.get_args(tp)
        return origin, (args[-1] if args else Any)
    return None, None


def _check_keys(node: Any, cls: type, path: str) -> None:
    """Reject keys the schema does not have, at any depth, suggesting the nearest valid one."""
    if not isinstance(node, DictConfig):
        return
    hints = typing.get_type_hints(cls)
    for key in node:
        key = str(key)
        dotted = f"{path}.{key}" if path else key
        if key not in hints:
            near = difflib.get_close_matches(key, list(hints), n=1, cutoff=0.6)
            hint = f"; did you mean {(path + '.' if path else '') + near[0]!r}?" if near else ""
            raise ConfigError(
                dotted, f"unknown key (valid keys here: {', '.join(sorted(hints))}){hint}"
            )
        child = node._get_node(key)
        if child is None or getattr(child, "_is_interpolation", lambda: False)():
            continue
        value = node[key] if not OmegaConf.is_missing(node, key) else None
        sub = _dataclass_of(hints[key])
        if sub is not None:
            if value is not None and not isinstance(value, DictConfig):
                what = "a list" if isinstance(value, ListConfig) else repr(value)
                raise ConfigError(dotted, f"expected a section (a mapping of keys), got {what}")
            _check_keys(value, sub, dotted)
            continue
        kind, elem = _container_of(hints[key])
        elem_cls = _dataclass_of(elem)
        if elem_cls is None:
            continue
        if kind is dict and isinstance(value, DictConfig):
            for k in value:
                _check_keys(value[k], elem_cls, f"{dotted}.{k}")
        elif kind is list and isinstance(value, ListConfig):
            for i, item in enumerate(value):
                _check_keys(item, elem_cls, f"{dotted}.{i}")


def _construct(cls: type, node: DictConfig, path: str) -> Any:
    """Build dataclasses bottom-up so a ``__post_init__`` error carries its full dotted path."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dotted = f"{path}.{f.name}" if path else f.name
        if OmegaConf.is_missing(node, f.name):
            raise ConfigError(dotted, "required, but not set")
        try:
            value = node[f.name]
        except OmegaConfBaseException as e:
            raise ConfigError(dotted, _first_line(e)) from None
        kwargs[f.name] = _convert(hints[f.name], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.with_prefix(path) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(path, str(e)) from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    if value is None:
        return None
    sub = _dataclass_of(tp)
    if sub is not None and isinstance(value, DictConfig):
        return _construct(sub, value, path)
    kind, elem = _container_of(tp)
    if isinstance(value, DictConfig):
        if kind is dict:
            return {str(k): _convert(elem, value[k], f"{path}.{k}") for k in value}
        return _plain(value, path)
    if isinstance(value, ListConfig):
        if kind is list:
            return [_convert(elem, v, f"{path}.{i}") for i, v in enumerate(value)]
        return _plain(value, path)
    return value


def _plain(value: DictConfig | ListConfig, path: str) -> Any:
    try:
        return OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(path, _first_line(e)) from None


def _key_of(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", "") or "")


def _first_line(e: BaseException) -> str:
    return str(getattr(e, "msg", None) or e).strip().splitlines()[0]
