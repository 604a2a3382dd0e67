"""A run name reused: the earlier records are moved aside, never overwritten or mixed in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from composer.core import Callback, State
from composer.loggers import Logger

from mpt_train.config import load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.train.builder import build_trainer, train
from tests.train.conftest import tiny_spec

RUN = Path("runs/tiny")


class CrashAfter(Callback):
    """Fail once batch ``batch`` is done and logged, before the next one (no checkpoint)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            raise RuntimeError("node lost")


def steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_a_new_run_under_a_finished_runs_name_moves_its_records_aside(
    mds_dir: Path, in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train(load_config_dict(tiny_spec(mds_dir, max_duration="3ba")))
    first = {n: (RUN / n).read_text() for n in ("metrics.jsonl", "config.yaml", "cost_ledger.json")}
    assert json.loads(first["cost_ledger.json"])["finished"] is True

    train(load_config_dict(tiny_spec(mds_dir, max_duration="2ba", seed=8)))
    (aside,) = (RUN / "previous").iterdir()
    assert {n: (aside / n).read_text() for n in first} == first  # kept whole
    assert f"moved metrics.jsonl, config.yaml, cost_ledger.json to {aside}" in caplog.text
    assert sorted({r["step"] for r in read_metrics(RUN / "metrics.jsonl")}) == [1, 2]
    assert yaml.safe_load((RUN / "config.yaml").read_text())["seed"] == 8
    assert json.loads((RUN / "cost_ledger.json").read_text())["restarts"] == 0


def test_after_a_resume_the_metrics_hold_one_row_per_step(
    mds_dir: Path, in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first attempt fails after batch 5, past its checkpoint at 4: row 5 is moved aside
    and written again by the resumed run, once."""
    spec = tiny_spec(mds_dir, max_duration="6ba", save_folder="ckpt", save_interval="2ba")
    trainer = build_trainer(load_config_dict(spec), extra_callbacks=[CrashAfter(5)])
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.fit()
    trainer.close()
    assert sorted(set(steps(RUN / "metrics.jsonl"))) == [1, 2, 3, 4, 5]

    train(load_config_dict(spec))
    got = steps(RUN / "metrics.jsonl")
    assert sorted(set(got)) == [1, 2, 3, 4, 5, 6]
    # A step may take two lines (metrics logged after its row was written); step 3, written by
    # one attempt only, is the measure: without the roll-back step 5 would have twice as many.
    assert got.count(5) == got.count(3), got
    (aside,) = (RUN / "previous").iterdir()
    moved = steps(aside / "metrics.jsonl")
    assert set(moved) == {5}
    assert f"moved {len(moved)} metrics row(s) the earlier attempt wrote past it" in caplog.text
