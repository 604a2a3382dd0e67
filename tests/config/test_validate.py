"""Mistakes a run spec can only show against the world: each fails before any model is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mpt_train.config import ConfigError, load_config_dict
from mpt_train.config.checks import check_spec
from mpt_train.config.validate import validate_run
from tests.helpers import REPO


def spec(data: Path, **top: object) -> dict:
    base = {
        "max_duration": "4ba",
        "global_train_batch_size": 8,
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "max_seq_len": 32, "vocab_size": 256},
        "train_loader": {"dataset": {"local": str(data), "max_seq_len": 32}},
    }
    base.update(top)
    return base


# An MDS index of one shard with 4 samples: the checks read indexes, not shards.
INDEX = '{"shards": [{"samples": 4, "column_encodings": [], "column_names": []}], "version": 2}'


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "mds" / "train").mkdir(parents=True)
    (tmp_path / "mds" / "train" / "index.json").write_text(INDEX)
    return tmp_path / "mds"


def check(s: dict, world: int = 1) -> None:
    """As training checks: the spec alone, then the world."""
    cfg = load_config_dict(s)
    check_spec(cfg, world)
    validate_run(cfg, world)


def test_valid_spec_passes(data: Path) -> None:
    check(spec(data), world=2)


def test_global_batch_must_split_across_ranks(data: Path) -> None:
    with pytest.raises(ConfigError, match="does not split across 3 ranks") as e:
        check(spec(data), world=3)
    assert e.value.key == "global_train_batch_size"


def test_microbatch_must_divide_rank_batch(data: Path) -> None:
    with pytest.raises(ConfigError) as e:
        check(spec(data, device_train_microbatch_size=3), world=2)
    assert e.value.key == "device_train_microbatch_size"


def test_seq_len_above_model(data: Path) -> None:
    s = spec(data)
    s["train_loader"]["dataset"]["max_seq_len"] = 64
    with pytest.raises(ConfigError, match="above the model's max_seq_len 32") as e:
        check(s)
    assert e.value.key == "train_loader.dataset.max_seq_len"


def test_missing_data_path(tmp_path: Path, data: Path) -> None:
    with pytest.raises(ConfigError, match="no MDS dataset") as e:
        check(spec(tmp_path / "absent"))
    assert e.value.key == "train_loader.dataset.local"
    s = spec(data, eval_loaders={"held_out": {"dataset": {"local": str(data), "split": "val"}}})
    with pytest.raises(ConfigError) as e:
        check(s)
    assert e.value.key == "eval_loaders.held_out.dataset.local"


def test_stream_mixture_paths_are_checked(data: Path, tmp_path: Path) -> None:
    s = spec(data)
    s["train_loader"]["dataset"] = {
        "max_seq_len": 32,
        "streams": {
            "good": {"local": str(data), "proportion": 0.5},
            "bad": {"local": str(tmp_path / "nope"), "proportion": 0.5},
        },
    }
    with pytest.raises(ConfigError) as e:
        check(s)
    assert e.value.key == "train_loader.dataset.streams.bad.local"


def test_unwritable_save_folder(data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match="cannot write") as e:
        check(spec(data, save_folder=str(blocker / "ckpt")))
    assert e.value.key == "save_folder"


def test_cli_reports_bad_spec_in_one_line_without_traceback(data: Path, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec(data)))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), str(path), "optimizer.weight_decy=0.1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "optimizer.weight_decy" in proc.stderr and "optimizer.weight_decay" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_s3_save_folder_is_probed_and_left_clean(
    s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpt_train.config.validate import check_save_folder

    check_save_folder(s3_server.url("ckpt", "run-1"))
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix="ckpt/run-1/")
    assert listed.get("KeyCount", 0) == 0
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # the server enforces keys
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(ConfigError, match="cannot write to s3://") as e:
        check_save_folder(s3_server.url("ckpt", "run-2"))
    assert e.value.key == "save_folder"
