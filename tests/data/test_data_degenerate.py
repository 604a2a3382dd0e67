"""Empty corpora, empty splits and damaged local shards: one line naming the path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mpt_train.cli import main as train_main
from mpt_train.data import DataReadError, TextDatasetConfig, TextLoaderConfig, build_text_dataloader
from mpt_train.data.convert_cli import main as convert_main
from tests.data.data_helpers import write_jsonl
from tests.train.conftest import tiny_spec, write_spec

pytestmark = pytest.mark.timeout(180)


def convert(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = convert_main([*args, "--no-progress", "--workers", "1"])
    out = capsys.readouterr()
    return code, (out.out + out.err).splitlines()


def test_a_corpus_with_no_text_fails_naming_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "", ""])
    code, lines = convert(
        capsys, str(empty), "--out", str(tmp_path / "out"), "--concat-tokens", "16"
    )
    assert code == 1
    (line,) = [ln for ln in lines if not ln[:2].isdigit()]  # all but log lines
    assert line == (
        f"run failed: no document in {empty}: 3 record(s) read, 3 with empty text, 0 skipped as malformed "
        "(is --text-field 'text' right?)"
    )
    assert not (tmp_path / "out" / "train" / "index.json").exists()


def test_a_corpus_too_short_for_one_sample_fails_naming_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    short = write_jsonl(tmp_path / "short.jsonl", ["Two words.", "And three more."])
    out = tmp_path / "out"
    code, lines = convert(capsys, str(short), "--out", str(out), "--concat-tokens", "4096")
    assert code == 1
    (line,) = [ln for ln in lines if not ln[:2].isdigit()]  # all but log lines
    assert line.startswith(f"run failed: no sample for split 'train' from {short}: 2 document(s), ")
    assert "fewer than one sample of --concat-tokens 4096" in line


def test_training_on_a_split_with_no_samples_fails_before_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    (split / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    spec = write_spec(tmp_path / "spec.yaml", tiny_spec(tmp_path / "data"))
    assert train_main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"train_loader.dataset.local: the split at {split} holds no samples" in err
    assert "Traceback" not in err
    assert "built MPT" not in caplog.text


def _loader(local: Path) -> TextLoaderConfig:
    ds = TextDatasetConfig(local=str(local), split="train", max_seq_len=32, shuffle=False)
    return TextLoaderConfig(dataset=ds, num_workers=0)


def _first_shard(data: Path, suffix: str) -> Path:
    return sorted((data / "train").rglob(f"shard.00000.mds{suffix}"))[0]


def test_a_damaged_decompressed_copy_is_rebuilt_from_the_compressed_shard(
    mds_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(mds_dir, data)
    good = [b["input_ids"] for b in build_text_dataloader(_loader(data), None, 4)]
    copy = _first_shard(data, "")
    assert copy.is_file() and _first_shard(data, ".zstd").is_file()
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])  # a copy cut short
    again = [b["input_ids"] for b in build_text_dataloader(_loader(data), None, 4)]
    assert len(again) == len(good) and all((a == b).all() for a, b in zip(again, good))
    assert f"decompressed shard {copy} is damaged" in caplog.text


def test_a_damaged_header_of_an_uncompressed_shard_is_one_line_naming_it(
    mds_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(mds_dir, data)
    list(build_text_dataloader(_loader(data), None, 4))  # decompressed copies beside .zstd
    for zipped in (data / "train").rglob("*.zstd"):
        zipped.unlink()
    index = json.loads((data / "train" / "index.json").read_text())
    for shard in index["shards"]:
        shard["zip_data"], shard["compression"] = None, None
    (data / "train" / "index.json").write_text(json.dumps(index))
    shard = _first_shard(data, "")
    raw = bytearray(shard.read_bytes())
    raw[0:4] = (10**6).to_bytes(4, "little")  # the sample count
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataReadError, match=rf"^shard {shard} is damaged: damaged header"):
        build_text_dataloader(_loader(data), None, 4)
