"""``sweep.py --plan``: each point's fit, micro batch, time and cost before launch; misfits skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mpt_train.tools.sweep_cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_plan_prints_each_point_and_launches_only_those_that_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = {
        "name": "mb",
        "base": str(ROOT / "yamls" / "mpt-1b.yaml"),
        "overrides": ["global_train_batch_size=32", "max_duration=100ba"],
        "grid": {"device_train_microbatch_size": [1, 32]},
        "gpus": 1,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out_dir = tmp_path / "out"
    args = [str(path), "--dry-run", "--out-dir", str(out_dir), "--plan", "--gpu", "a100_40gb"]
    assert main(args) == 0
    out = capsys.readouterr().out
    fits, skipped = (next(ln for ln in out.splitlines() if ln.startswith(f"[{i}]")) for i in (0, 1))
    assert "fits (" in fits and "micro batch 1" in fits and "$" in fits and " h, " in fits
    # 32 sequences of 2048 tokens at 1.3B do not fit 40 GB; the line says what would.
    assert "does not fit" in skipped and "skipped" in skipped and "micro batch 32" in skipped
    assert "1 of 2 points fit" in out
    launched = [ln for ln in out.splitlines() if "composer -n" in ln]
    assert len(launched) == 1 and "mb-00-" in launched[0]
    # On an 80 GB card a larger micro batch fits than on a 40 GB one.
    assert main([*args[:-1], "h100"]) == 0
    h100 = capsys.readouterr().out
    largest = {
        card: int(text.split("(largest ")[1].split(")")[0])
        for card, text in (("a", out), ("h", h100))
    }
    assert largest["h"] > largest["a"]
    # Without a GPU type (none in the spec either) --plan says what it needs.
    assert main(args[:-2]) == 2
    assert "--gpu" in capsys.readouterr().err
