"""Benchmark records: the shipped ones load and are complete; the newest measurement wins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mpt_train.errors import ConfigError
from mpt_train.tools.benchmark_table import load_table
from mpt_train.tools.records import (
    RESULTS,
    ROW_FIELDS,
    latest_rows,
    load_records,
    record_path,
    render_table,
)
from tests.helpers import REPO


def test_shipped_records_load_with_every_field_and_their_stack() -> None:
    records = load_records()
    assert records, f"no records in {RESULTS}"
    for rec in records:
        assert rec.gpu and rec.gpu_type and rec.date and rec.command
        assert all(rec.stack[k] for k in ("torch", "composer", "cuda")), rec.path
        table = REPO / "yamls" / "benchmarks" / f"{rec.gpu_type}.yaml"
        names = {r.name for r in load_table(table).rows}
        assert set(rec.rows) <= names, f"{rec.path.name}: rows not in {table.name}"
        for row in rec.rows.values():
            assert row.gpu == rec.gpu_type and row.global_batch == (
                row.micro_batch * row.grad_accum * row.gpus
            )
        raw = json.loads(rec.path.read_text())
        assert all(set(r) == {"name", *ROW_FIELDS} for r in raw["rows"]), rec.path.name


def test_newest_record_wins_per_row_and_older_rows_stay(tmp_path: Path) -> None:
    src = RESULTS / "2026-11-27-h100.json"
    shutil.copy(src, tmp_path / src.name)
    newer = json.loads(src.read_text())
    kept = newer["rows"][0]
    kept["mfu"] = 0.4321
    newer.update(date="2026-12-01", rows=[kept])
    newer.pop("attention")
    (tmp_path / "2026-12-01-h100.json").write_text(json.dumps(newer))
    latest = latest_rows("h100", tmp_path)
    assert latest[kept["name"]].row.mfu == 0.4321
    assert latest[kept["name"]].record.date == "2026-12-01"
    assert latest["mpt-1b"].record.date == "2026-11-27"  # not measured again: the older one
    table = render_table("h100", tmp_path)
    assert f"| {kept['name']} | " in table and "| 43.21 |" in table
    assert "- 2026-11-27: NVIDIA H100" in table and "- 2026-12-01: NVIDIA H100" in table
    assert record_path(tmp_path, "2026-12-01", "h100").name == "2026-12-01-h100-2.json"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d["rows"][0].pop("peak_memory_gb"), "rows.0.peak_memory_gb"),
        (lambda d: d["stack"].pop("cuda"), "stack.cuda"),
        (lambda d: d.pop("gpu"), "gpu"),
        (lambda d: d["rows"][1].update(tokens_per_sec=None), "rows.1.tokens_per_sec"),
        (lambda d: d.update(date="2026-11-28"), "date"),
    ],
)
def test_an_incomplete_record_fails_naming_the_field(tmp_path: Path, edit, key: str) -> None:
    data = json.loads((RESULTS / "2026-11-27-h100.json").read_text())
    edit(data)
    (tmp_path / "2026-11-27-h100.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_records(tmp_path)
    assert err.value.key == f"2026-11-27-h100.json.{key}"
