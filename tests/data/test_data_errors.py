"""Errors name what to fix: the record (file:line), the shard, the URL, the config key."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest

import mpt_train.data.convert as convert_mod
import mpt_train.data.convert_cli as convert_cli
from mpt_train.data import DataReadError, TextDatasetConfig, TextLoaderConfig, build_text_dataloader
from mpt_train.data.config import StreamConfig
from mpt_train.data.convert import ConvertOptions, convert_corpus
from mpt_train.data.sources import BadRecordError, InputReadError
from mpt_train.data.storage import OutputNotWritableError
from mpt_train.errors import ConfigError
from tests.data.data_helpers import read_split, shipped_texts, write_jsonl
from tests.s3_server import find_free_port

# Streaming runs background threads; a hang must fail the test, not the CI job.
pytestmark = pytest.mark.timeout(180)


def _opts(inputs, out, **kw) -> ConvertOptions:
    base = {"concat_tokens": 16, "progress": False, "workers": 1}
    base.update(kw)
    return ConvertOptions(inputs=[str(i) for i in inputs], out=str(out), **base)


@pytest.fixture
def bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"text": "A good first document."})
        + "\n"
        + '{"text": "unterminated\n'
        + json.dumps({"body": "wrong field"})
        + "\n"
        + json.dumps({"text": "A good last document."})
        + "\n"
    )
    return path


def test_malformed_line_names_file_and_line(bad_jsonl: Path, tmp_path: Path) -> None:
    with pytest.raises(BadRecordError, match=rf"{bad_jsonl}:2: malformed JSON"):
        convert_corpus(_opts([bad_jsonl], tmp_path / "out"))
    assert not (tmp_path / "out" / "train" / "index.json").exists()


def test_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", ["one", "two"], field="content")
    with pytest.raises(BadRecordError, match=rf"{path}:1: missing text field 'text'"):
        convert_corpus(_opts([path], tmp_path / "out"))


def test_cli_reports_bad_record_and_fails(bad_jsonl: Path, tmp_path: Path, capsys) -> None:
    code = convert_cli.main(
        [
            str(bad_jsonl),
            "--out",
            str(tmp_path / "o"),
            "--concat-tokens",
            "8",
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    assert code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("run failed: ") and f"{bad_jsonl}:2: malformed JSON" in line


def test_skip_bad_records_counts_them(bad_jsonl: Path, tokenizer, tmp_path: Path) -> None:
    stats = convert_corpus(
        _opts([bad_jsonl], tmp_path / "out", skip_bad_records=True, concat_tokens=4)
    )
    assert stats.skipped_records == 2
    assert stats.records_read == 4
    assert stats.splits["train"].documents == 2
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["skipped_records"] == 2
    good = "A good first document.", "A good last document."
    expected = []
    for text in good:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [0]
    got = read_split(str(tmp_path / "out"), "train", tmp_path / "cache").reshape(-1).tolist()
    assert got == expected[: len(expected) // 4 * 4]


def test_unwritable_bucket_fails_before_tokenizing(small_corpus, s3_server, monkeypatch) -> None:
    path, _ = small_corpus
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenizer loaded before the output was probed")

    monkeypatch.setattr(convert_mod, "load_tokenizer", no_tokenizing)
    with pytest.raises(OutputNotWritableError, match="s3://no-such-bucket-here/corpus"):
        convert_corpus(_opts([path], "s3://no-such-bucket-here/corpus"))


def test_unwritable_local_folder_fails_before_tokenizing(small_corpus, tmp_path, monkeypatch):
    path, _ = small_corpus
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(convert_mod, "load_tokenizer", lambda *_: pytest.fail("tokenized"))
    with pytest.raises(OutputNotWritableError, match="a_file/out"):
        convert_corpus(_opts([path], tmp_path / "a_file" / "out"))


def test_missing_input_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        convert_corpus(_opts([tmp_path / "nope.jsonl"], tmp_path / "out"))


def _loader(**dataset) -> TextLoaderConfig:
    ds = {"max_seq_len": 16, "shuffle": False, **dataset}
    return TextLoaderConfig(dataset=TextDatasetConfig(**ds), num_workers=0)


def test_missing_local_folder_names_key_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    with pytest.raises(ConfigError, match=f"folder {missing} does not exist") as info:
        build_text_dataloader(_loader(local=str(missing)), None, 2)
    assert info.value.key == "dataset.local"
    streams = {"web": StreamConfig(local=str(missing), proportion=1.0)}
    with pytest.raises(ConfigError) as info:
        build_text_dataloader(_loader(streams=streams), None, 2)
    assert info.value.key == "dataset.streams.web.local"


def test_unfinished_conversion_is_not_read(small_corpus, tmp_path: Path) -> None:
    path, _ = small_corpus
    out = tmp_path / "out"
    convert_corpus(_opts([path], out, max_docs=40))
    (out / "train" / "index.json").unlink()  # as if the run stopped before publishing
    with pytest.raises(ConfigError, match="unfinished conversion") as info:
        build_text_dataloader(_loader(local=str(out)), None, 2)
    assert info.value.key == "dataset.local"


@pytest.fixture
def converted(small_corpus, tmp_path: Path) -> Path:
    path, _ = small_corpus
    out = tmp_path / "converted"
    convert_corpus(_opts([path], out, max_docs=60, docs_per_part=30))
    return out


def _corrupt_first_shard(root: Path) -> Path:
    shard = sorted((root / "train").rglob("shard.00000.mds.zstd"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    return shard


def test_corrupt_shard_names_the_shard(converted: Path, tmp_path: Path, caplog) -> None:
    # Flipped bytes inside a zstd frame decompress without error: only the hash catches them,
    # and it is checked by default.
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    shard = _corrupt_first_shard(data)
    loader = build_text_dataloader(_loader(local=str(data)), None, 2)
    with pytest.raises(DataReadError, match=f"cannot read shard {shard}: ValueError: Checksum"):
        list(loader)
    # The one-line error is the whole report: no traceback logged from the download thread.
    loader.dataset._executor.shutdown(wait=True)  # its failure callback has run
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_unexpected_background_failure_is_logged_with_its_traceback(converted, caplog) -> None:
    """Only a shard's own failure is left to the one-line error: anything else is logged."""
    from concurrent.futures import Future

    loader = build_text_dataloader(_loader(local=str(converted)), None, 2)
    batches = iter(loader)
    next(batches)
    failed: Future = Future()
    failed.set_exception(RuntimeError("boom"))
    loader.dataset.on_exception(failed)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "a background shard thread failed" and record.exc_info
    assert loader.dataset._event.is_set()  # streaming's sample loop stops, as before


def test_truncated_shard_names_the_shard(converted: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(converted, data)
    shard = sorted((data / "train").rglob("shard.00000.mds.zstd"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    loader = build_text_dataloader(_loader(local=str(data), validate_hash=None), None, 2)
    with pytest.raises(DataReadError, match=f"cannot read shard {shard}: Error: Decompression"):
        list(loader)


def test_datasets_without_hashes_still_load(small_corpus, tmp_path: Path, caplog) -> None:
    path, _ = small_corpus
    out = tmp_path / "nohash"
    convert_corpus(_opts([path], out, max_docs=30, hashes=[]))
    loader = build_text_dataloader(_loader(remote=str(out), local=str(tmp_path / "c")), None, 2)
    assert next(iter(loader))["input_ids"].shape == (2, 16)
    assert "records no xxh3_64 hashes" in caplog.text


def test_corrupt_remote_shard_names_url(converted: Path, tmp_path: Path) -> None:
    # A local folder used as `remote`: the shard is copied into the cache, then decompressed.
    shard = _corrupt_first_shard(converted)
    rel = shard.relative_to(converted / "train")
    loader = build_text_dataloader(
        _loader(remote=str(converted), local=str(tmp_path / "cache")), None, 2
    )
    with pytest.raises(DataReadError, match=f"cannot read shard {converted}/train/{rel}"):
        next(iter(loader))


def test_unreachable_remote_names_url(s3_server, tmp_path: Path, monkeypatch) -> None:
    port = find_free_port()  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    cfg = _loader(
        remote="s3://mpt-train/gone",
        local=str(tmp_path / "cache"),
        download_retry=2,
        download_timeout=5.0,
    )
    with pytest.raises(DataReadError) as info:
        build_text_dataloader(cfg, None, 2)
    message = str(info.value)
    assert "s3://mpt-train/gone/train/index.json" in message
    assert "after 2 retries" in message  # download_retry: 2 re-attempts, 3 attempts
    assert f"127.0.0.1:{port}" in message  # streaming's own cause is kept


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_undecodable_line_is_a_bad_record(suffix: str, tokenizer, tmp_path: Path) -> None:
    """One invalid UTF-8 byte spoils its line only: it stops with file:line, or is skipped."""
    good = "A good first document.", "A good last document."
    data = (
        json.dumps({"text": good[0]}).encode()
        + b'\n{"text": "caf\xe9 latin-1"}\n'
        + json.dumps({"text": good[1]}).encode()
        + b"\n"
    )
    path = tmp_path / f"mixed{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(BadRecordError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9"):
        convert_corpus(_opts([path], tmp_path / "out"))

    stats = convert_corpus(_opts([path], tmp_path / "skip", skip_bad_records=True, concat_tokens=4))
    assert (stats.records_read, stats.skipped_records) == (3, 1)
    expected = []
    for text in good:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [0]
    got = read_split(str(tmp_path / "skip"), "train", tmp_path / "cache").reshape(-1).tolist()
    assert got == expected[: len(expected) // 4 * 4]


def _damaged_gzip(path: Path, damage: str) -> Path:
    """A gzip file of 200 shipped documents, cut short or with its deflate data overwritten."""
    data = gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in shipped_texts(200)).encode()
    )
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "corrupt":
        middle = len(data) // 2
        data = data[:middle] + b"\xff" * 256 + data[middle + 256 :]
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_gzip_stops_naming_the_file(damage: str, tmp_path: Path) -> None:
    """A damaged archive is not a record: even --skip-bad-records stops, naming the file."""
    path = _damaged_gzip(tmp_path / "docs.jsonl.gz", damage)
    with pytest.raises(InputReadError, match=rf"{path}: truncated or corrupt compressed data"):
        convert_corpus(_opts([path], tmp_path / "out", skip_bad_records=True))
    assert not (tmp_path / "out" / "train" / "index.json").exists()


def test_truncated_gzip_text_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt.gz"
    path.write_bytes(gzip.compress(" ".join(shipped_texts(50)).encode())[:-200])
    with pytest.raises(InputReadError, match=rf"{path}: .*EOFError"):
        convert_corpus(_opts([path], tmp_path / "out"))


def test_cli_reports_truncated_gzip_in_one_line(tmp_path: Path, capsys) -> None:
    path = _damaged_gzip(tmp_path / "docs.jsonl.gz", "truncated")
    argv = [str(path), "--out", str(tmp_path / "o"), "--concat-tokens", "8", "--no-progress"]
    assert convert_cli.main([*argv, "--workers", "1"]) == 1
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("run failed: ")]
    assert line.startswith(f"run failed: {path}: truncated or corrupt compressed data after line ")
    assert "Traceback" not in err


def test_lone_surrogate_is_a_bad_record(tmp_path: Path) -> None:
    """JSON can escape half a UTF-16 pair (``"\\ud800"``); no tokenizer takes the result. It is
    that record's fault, named by line, not a crash of the whole conversion."""
    path = tmp_path / "halves.jsonl"
    path.write_text(
        json.dumps({"text": "A good first document."})
        + '\n{"text": "half a pair \\ud800 here"}\n'
        + json.dumps({"text": "A good last document."})
        + "\n"
    )
    with pytest.raises(BadRecordError, match=rf"{path}:2: .*lone surrogate \(U\+D800"):
        convert_corpus(_opts([path], tmp_path / "out"))
    stats = convert_corpus(_opts([path], tmp_path / "skip", skip_bad_records=True, concat_tokens=4))
    assert (stats.records_read, stats.skipped_records) == (3, 1)


def test_token_ids_past_the_vocabulary_name_the_shard(small_corpus, tmp_path: Path) -> None:
    """Uncompressed shards in a local folder are read in place, unhashed: flipped bytes become
    token ids past the vocabulary. They stop the run naming the shard, not at the embedding
    (on a GPU, a device-side assert). Data tokenized for a larger vocabulary stops the same way."""
    path, _ = small_corpus
    out = tmp_path / "raw"
    convert_corpus(_opts([path], out, max_docs=30, compression=None))
    assert next(iter(build_text_dataloader(_loader(local=str(out)), None, 2, vocab_size=8192)))
    with pytest.raises(DataReadError, match=r"shard .*shard\.00000\.mds holds token id \d+, past"):
        next(iter(build_text_dataloader(_loader(local=str(out)), None, 2, vocab_size=100)))

    shard = sorted((out / "train").rglob("shard.00000.mds"))[0]
    data = bytearray(shard.read_bytes())
    data[-200:-100] = bytes(b ^ 0xFF for b in data[-200:-100])  # inside the last samples' tokens
    shard.write_bytes(bytes(data))
    with pytest.raises(DataReadError, match=rf"{shard} holds token id \d+, past the model's vocab"):
        list(build_text_dataloader(_loader(local=str(out)), None, 2, vocab_size=8192))


def test_download_retry_zero_still_downloads(converted: Path, tmp_path: Path) -> None:
    """``download_retry`` counts re-attempts: 0 is one attempt (streaming's own count is of
    attempts, and would never try)."""
    cfg = _loader(remote=str(converted), local=str(tmp_path / "cache"), download_retry=0)
    assert next(iter(build_text_dataloader(cfg, None, 2)))["input_ids"].shape == (2, 16)
