"""Resuming with another spec: refused before anything loads, moves or rotates."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mpt_train.cli import main
from mpt_train.config import load_config_dict
from mpt_train.reliability.resume_spec import ResumeSpecError, check_spec_change
from mpt_train.train.builder import train
from tests.train.conftest import tiny_spec, write_spec

CKPT = "ep0-ba{}-rank0.pt"


def spec_for(mds: Path, folder: Path, **top: Any) -> dict[str, Any]:
    top = {"save_folder": str(folder), "save_interval": "2ba", "max_duration": "4ba", **top}
    top.setdefault("device", "cpu")  # precision auto is fp32 here on any machine
    spec = tiny_spec(mds, **top)
    spec["save_num_checkpoints_to_keep"] = 1
    spec["model"]["n_layers"] = 4
    return spec


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(mds_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-batch run of a tiny 4-layer model, checkpoints in ckpt/."""
    where = tmp_path_factory.mktemp("trained")
    spec = spec_for(mds_dir, where / "ckpt")
    spec["loggers"]["jsonl"] = {"path": str(where / "metrics.jsonl")}
    train(load_config_dict(spec))
    return where


def changed_run(
    trained: Path, tmp_path: Path, mds: Path, overrides: list[str], capsys: pytest.CaptureFixture
) -> list[str]:
    """``train.py`` as a user runs it (in this process, for speed): the stderr lines."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt, symlinks=True)
    if overrides == ["precision=fp32"]:  # a checkpoint a GPU run wrote, resumed on a CPU
        manifest = ckpt / f"{CKPT.format(4)}.manifest.json"
        data = json.loads(manifest.read_text())
        data["spec"]["precision"] = "amp_bf16"
        manifest.write_text(json.dumps(data))
    before = snapshot(ckpt)
    spec_file = write_spec(tmp_path / "spec.yaml", spec_for(mds, ckpt))
    capsys.readouterr()
    assert main([str(spec_file), "max_duration=6ba", *overrides]) == 2
    err = capsys.readouterr().err
    assert snapshot(ckpt) == before  # nothing loaded into, moved, rotated or written
    return [line for line in err.splitlines() if "cannot resume" in line]


@pytest.mark.parametrize(
    ("overrides", "shown"),
    [
        (["model.n_layers=2"], "model.n_layers: 4 -> 2"),
        (["optimizer.name=decoupled_lionw"], "optimizer.name: decoupled_adamw -> decoupled_lionw"),
        (["precision=fp32"], "precision: amp_bf16 -> fp32"),
        (
            ["model.d_model=64", "tokenizer.name=EleutherAI/gpt-neox-20b"],
            "model.d_model: 32 -> 64, tokenizer.name: mpt-train/tiny-bpe -> EleutherAI/gpt-neox-20b",
        ),
    ],
    ids=["n_layers", "optimizer", "precision", "two-keys"],
)
def test_changed_spec_is_refused_with_every_key_and_nothing_touched(
    trained: Path,
    tmp_path: Path,
    mds_dir: Path,
    overrides: list[str],
    shown: str,
    capsys: pytest.CaptureFixture,
) -> None:
    lines = changed_run(trained, tmp_path, mds_dir, overrides, capsys)
    assert len(lines) == 1, lines
    assert f"({shown})" in lines[0]
    assert f"{CKPT.format(4)}" in lines[0]
    assert "reliability.resume_allow_changes=[" in lines[0]


def test_allowed_change_resumes_and_weights_load_strictly(
    trained: Path, tmp_path: Path, mds_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mpt_train.train.composer_model import WeightsMismatchError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt, symlinks=True)
    before = snapshot(ckpt)
    spec = spec_for(mds_dir, ckpt, max_duration="6ba")
    spec["model"]["n_layers"] = 2
    spec["reliability"] = {"resume_allow_changes": ["model.n_layers"]}
    with pytest.raises(WeightsMismatchError, match=r"unexpected: model\.blocks\.2\."):
        train(load_config_dict(spec))
    assert "model.n_layers: 4 -> 2" in caplog.text  # the accepted diff is logged
    assert {k: v for k, v in snapshot(ckpt).items() if "quarantine" not in k} == before

    spec = spec_for(mds_dir, ckpt, max_duration="6ba")
    spec["optimizer"]["lr"] = 5e-4
    trainer = train(load_config_dict(spec))
    assert int(trainer.state.timestamp.batch) == 6
    assert "optimizer.lr: 0.001 -> 0.0005" in caplog.text
    manifest = json.loads((ckpt / f"{CKPT.format(6)}.manifest.json").read_text())
    assert manifest["spec"]["optimizer"]["lr"] == 5e-4


def test_only_listed_keys_may_change() -> None:
    saved = {"model": {"n_layers": 4, "d_model": 8}, "max_duration": "20ba", "seed": 1}
    now = copy.deepcopy(saved)
    now["max_duration"] = "30ba"
    check_spec_change("c.pt", saved, now)
    now["seed"] = 2
    now["model"]["n_layers"] = 2
    with pytest.raises(ResumeSpecError, match=r"\(model\.n_layers: 4 -> 2, seed: 1 -> 2\)"):
        check_spec_change("c.pt", saved, now)
    check_spec_change("c.pt", saved, now, allow=["model", "seed"])


def test_changed_spec_is_refused_for_a_bucket_save_folder(
    mds_dir: Path, tmp_path: Path, s3_server, capsys: pytest.CaptureFixture
) -> None:
    """A cluster run saves to a bucket: the same refusal, read from the newest manifest there,
    before anything is downloaded or uploaded."""
    from tests.reliability.test_s3_faults import objects

    folder = s3_server.url("specs", "{run_name}")
    spec = spec_for(mds_dir, tmp_path / "unused", save_folder=folder, max_duration="2ba")
    train(load_config_dict(spec))
    before = objects(s3_server, "specs/")
    assert "specs/tiny/ep0-ba2-rank0.pt.manifest.json" in before
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    capsys.readouterr()
    assert main([str(spec_file), "max_duration=4ba", "model.n_layers=2"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "cannot resume" in line]
    assert len(lines) == 1, lines
    assert f"cannot resume from {s3_server.url('specs/tiny/ep0-ba2-rank0.pt')}" in lines[0]
    assert "(model.n_layers: 4 -> 2)" in lines[0]
    assert objects(s3_server, "specs/") == before
