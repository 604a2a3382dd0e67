"""Mutated run specs: each one loads or fails with ConfigError naming a dotted key, never with
a traceback from deep inside torch, omegaconf or Composer."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpt_train.config import ConfigError, RunConfig, load_config_dict
from tests.train.conftest import tiny_spec

BASE = tiny_spec(
    "/data/mds",
    eval_loader={"dataset": {"local": "/data/mds", "split": "val"}},
    save_folder="ckpt",
    fsdp={"sharding_strategy": "FULL_SHARD"},
    reliability={"loss_guard": {"on_spike": "warn"}},
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "10ba",
            "1ep",
            "auto",
            "${variables.x}",
            "${oc.env:NOPE}",
            "FULL_SHARD",
            "${nope}",
            "1e9tok",
            "-3ba",
            "fp32",
            "torch",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    return out


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        all_paths = paths(spec)
        if not all_paths:
            break
        path = draw(st.sampled_from(all_paths))
        parent = spec
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(min_size=1, max_size=8))] = draw(values)
        elif op == "rename":
            parent[path[-1] + draw(st.sampled_from(["_", "s", "x"]))] = parent.pop(path[-1])
    return spec


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_specs())
def test_mutated_specs_load_or_name_a_key(spec: dict[str, Any]) -> None:
    try:
        cfg = load_config_dict(spec)
    except ConfigError as e:
        assert e.key, f"ConfigError without a key: {e}"
        top = e.key.split(".")[0]
        assert top in RunConfig.__dataclass_fields__ or top in spec, e.key
    else:
        assert isinstance(cfg, RunConfig)
