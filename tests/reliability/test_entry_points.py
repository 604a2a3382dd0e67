"""Every entry point ends a known failure in one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import re
import runpy
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.s3_server import find_free_port
from tests.train.conftest import tiny_spec, write_spec

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \[rank\d+\] (DEBUG|INFO|WARNING) ")


def script(name: str) -> Callable[[list[str]], int]:
    return runpy.run_path(str(REPO / "scripts" / name), run_name="entry")["main"]


def one_line(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> str:
    """The failure's one line: printed to stderr or logged as the only error."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Traceback" not in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    printed = [ln for ln in err.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    lines = printed + errors
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A hub endpoint nothing listens on, and an empty cache: a name cannot be fetched."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{find_free_port()}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return "someorg/no-such-tokenizer"


def test_train_with_an_unreachable_hub_name_fails_fast(
    mds_dir: Path, tmp_path: Path, offline_hub: str, capsys, caplog
) -> None:
    from mpt_train.cli import main

    spec = write_spec(tmp_path / "spec.yaml", tiny_spec(mds_dir, tokenizer={"name": offline_hub}))
    start = time.monotonic()
    assert main([str(spec)]) == 2
    assert time.monotonic() - start < 30
    line = one_line(capsys, caplog)
    assert (
        f"tokenizer.name: cannot load tokenizer '{offline_hub}': not a local folder nor in" in line
    )
    assert "cannot be reached from this machine within 3 s" in line


def test_offline_setting_names_itself(
    mds_dir: Path, tmp_path: Path, offline_hub: str, monkeypatch, capsys, caplog
) -> None:
    from mpt_train.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = write_spec(tmp_path / "spec.yaml", tiny_spec(mds_dir, tokenizer={"name": offline_hub}))
    assert main([str(spec)]) == 2
    assert "and HF_HUB_OFFLINE is set" in one_line(capsys, caplog)


def test_convert_with_an_unreachable_tokenizer(
    tmp_path: Path, offline_hub: str, capsys, caplog
) -> None:
    from mpt_train.data.convert_cli import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a document"}\n')
    args = [str(docs), "--out", str(tmp_path / "out"), "--concat-tokens", "8", "--no-progress"]
    assert main([*args, "--tokenizer", offline_hub]) == 2
    line = one_line(capsys, caplog)
    assert line.startswith(f"error: --tokenizer: cannot load tokenizer '{offline_hub}': not a")


@pytest.fixture
def broken_ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    path = tmp_path / "broken" / tiny_ckpt.name
    path.parent.mkdir()
    path.write_bytes(tiny_ckpt.read_bytes()[:1000])
    return path


def test_generate_with_a_damaged_checkpoint(broken_ckpt: Path, capsys, caplog) -> None:
    assert script("generate.py")([str(broken_ckpt), "--prompt", "hi"]) == 2
    assert one_line(capsys, caplog).startswith(f"error: {broken_ckpt} is damaged: not a checkpo")


def test_eval_with_a_damaged_checkpoint(
    broken_ckpt: Path, tmp_path: Path, mds_dir: Path, capsys, caplog
) -> None:
    spec = tmp_path / "eval.yaml"
    sets = {"val": {"mds": str(mds_dir), "split": "val", "max_seq_len": 32}}
    spec.write_text(yaml.safe_dump({"model": str(broken_ckpt), "eval_sets": sets}))
    assert script("eval.py")([str(spec)]) == 2
    assert f"{broken_ckpt} is damaged: not a checkpoint" in one_line(capsys, caplog)


def test_plan_and_sweep_with_a_missing_file(tmp_path: Path, capsys, caplog) -> None:
    missing = tmp_path / "nope.yaml"
    assert script("plan.py")([str(missing), "--gpus", "8", "--gpu", "h100"]) == 2
    assert str(missing) in one_line(capsys, caplog)
    caplog.clear()
    assert script("sweep.py")([str(missing)]) == 2
    assert str(missing) in one_line(capsys, caplog)


def test_export_into_a_file_path(tiny_ckpt: Path, tmp_path: Path, capsys, caplog) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert script("convert_to_hf.py")([str(tiny_ckpt), str(taken)]) != 0
    assert one_line(capsys, caplog).endswith(f"output {taken} is a file, not a folder")
