"""Every fsdp.sharding_strategy trains the same model on two real processes (gloo).

The strategies differ in what each rank holds between steps (FULL_SHARD: a shard of weights,
grads and optimizer state; SHARD_GRAD_OP: whole weights during the step; HYBRID_SHARD: shards
within a node, replicas across nodes; NO_SHARD: plain data parallelism), never in the maths:
the losses of a 4-step run must match FULL_SHARD's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mpt_train.config import load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.train.builder import train
from tests.helpers import REPO
from tests.train.conftest import composer_cmd, run, tiny_spec, write_spec


def _losses(path: Path) -> list[float]:
    return [r["loss/train/total"] for r in read_metrics(path)]


@pytest.mark.slow
def test_every_sharding_strategy_gives_full_shards_losses(mds_dir: Path, tmp_path: Path) -> None:
    strategies = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
    paths = []
    for strategy in strategies:
        spec = tiny_spec(mds_dir, run_name=strategy.lower(), max_duration="4ba",
                         fsdp={"sharding_strategy": strategy})  # fmt: skip
        paths.append(str(write_spec(tmp_path / f"{strategy}.yaml", spec)))
    run([*composer_cmd(2), str(REPO / "tests/train/train_many.py"), *paths], cwd=tmp_path)
    losses = {s: _losses(tmp_path / f"runs/{s.lower()}/metrics.jsonl") for s in strategies}
    assert len(losses["FULL_SHARD"]) == 4
    for strategy, got in losses.items():
        assert got == pytest.approx(losses["FULL_SHARD"], rel=1e-5), strategy


def test_one_rank_says_sharding_settings_do_nothing(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """With one rank there is no FSDP wrapper: settings that only shape sharding are named
    in a warning instead of being silently ignored."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, max_duration="1ba",
                     fsdp={"sharding_strategy": "SHARD_GRAD_OP", "mixed_precision": "PURE"})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mpt_train.train.parallel"):
        train(load_config_dict(spec))
    [line] = [r.getMessage() for r in caplog.records if "have no effect" in r.getMessage()]
    assert "fsdp.mixed_precision=PURE" in line and "SHARD_GRAD_OP" in line


def test_hybrid_shard_on_part_of_a_node_is_refused_before_any_mesh(
    mds_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HYBRID_SHARD needs whole nodes: said at start, naming the key, not deep in the first
    backward. (Across nodes of CPU ranks it runs: tests/train/test_multinode.py.)"""
    from mpt_train.config import ConfigError
    from mpt_train.train import parallel

    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(parallel.dist, "get_local_world_size", lambda: 2)
    cfg = load_config_dict(tiny_spec(mds_dir, fsdp={"sharding_strategy": "HYBRID_SHARD"}))
    with pytest.raises(ConfigError, match=r"fsdp\.sharding_strategy.*whole nodes"):
        parallel.parallelism_config(cfg, "cpu")
