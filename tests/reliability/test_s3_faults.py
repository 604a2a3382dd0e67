"""The S3 server stopped while a checkpoint uploads: a short outage is ridden out with retries
and backoff; a long one fails the run naming the URL. Never a silent gap."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger

from mpt_train.config import load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.reliability import CheckpointUploadError
from mpt_train.train.builder import build_trainer, train
from tests.s3_server import S3Server
from tests.train.conftest import tiny_spec


class OutageAt(Callback):
    """Take the S3 server down at the end of batch ``batch``; start it again ``seconds`` after
    the next checkpoint save begins (``None``: only after the test), so the outage meets that
    save's upload however long the batch in between takes."""

    def __init__(self, server: S3Server, batch: int, seconds: float | None) -> None:
        self.server, self.batch, self.seconds = server, batch, seconds
        self.restarter: threading.Timer | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            self.server.go_down()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        late = int(state.timestamp.batch) > self.batch
        if late and self.seconds is not None and self.restarter is None:
            self.restarter = threading.Timer(self.seconds, self.server.start)
            self.restarter.start()


def fast_symlink_checks(trainer: Trainer) -> None:
    """Composer polls for finished uploads every 30 s before moving its `latest` symlink;
    its own tests shorten that (the attribute exists for them), and so do these."""
    trainer._checkpoint_saver._symlink_upload_wait_before_next_try_in_seconds = 0.5


def objects(server: S3Server, prefix: str) -> dict[str, int]:
    pages = (
        server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=server.bucket, Prefix=prefix)
    )
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_short_outage_during_upload_is_retried(
    mds_dir: Path, in_tmp: Path, reliability_s3: S3Server
) -> None:
    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    spec = tiny_spec(
        mds_dir,
        max_duration="6ba",
        save_interval="2ba",
        save_folder=f"s3://{reliability_s3.bucket}/{prefix}/{{run_name}}",
    )
    outage = OutageAt(reliability_s3, 3, seconds=4.0)  # the save after batch 4 meets it
    trainer = build_trainer(load_config_dict(spec), extra_callbacks=[outage])
    fast_symlink_checks(trainer)
    try:
        trainer.fit()
    finally:
        trainer.close()
        if outage.restarter is not None:
            outage.restarter.join()
    assert reliability_s3.running
    # The upload was tried while the bucket was away, and the checkpoint is there in full.
    assert reliability_s3.attempts_while_down > 0
    stored = objects(reliability_s3, f"{prefix}/tiny/")
    for batch in (2, 4, 6):
        name = f"{prefix}/tiny/ep0-ba{batch}-rank0.pt"
        assert stored.get(name, 0) > 0, f"{name} missing: {sorted(stored)}"
        body = (
            reliability_s3.client()
            .get_object(Bucket=reliability_s3.bucket, Key=f"{name}.manifest.json")["Body"]
            .read()
        )
        manifest = json.loads(body)
        assert manifest["files"] == {name: {"size": stored[name]}}


@pytest.mark.slow
def test_long_outage_during_upload_fails_naming_the_url(
    mds_dir: Path, in_tmp: Path, reliability_s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # give up in seconds, not a minute
    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    folder_url = f"s3://{reliability_s3.bucket}/{prefix}/tiny"
    spec = tiny_spec(
        mds_dir,
        max_duration="6ba",
        save_interval="2ba",
        save_folder=f"s3://{reliability_s3.bucket}/{prefix}/{{run_name}}",
    )
    trainer = build_trainer(
        load_config_dict(spec), extra_callbacks=[OutageAt(reliability_s3, 3, seconds=None)]
    )
    fast_symlink_checks(trainer)
    try:
        with pytest.raises(CheckpointUploadError, match=f"uploading checkpoint.*{folder_url}"):
            trainer.fit()
    finally:
        reliability_s3.start()
        trainer.close()
        saver = trainer._checkpoint_saver
        if saver is not None and saver.remote_uploader is not None:
            # The failed upload is this test's expected outcome: settle Composer's uploader now,
            # not in an exit handler that would report it after the test session's summary.
            saver.post_close()
            saver.remote_uploader = None
    # The checkpoint before the outage is complete; the failed one has no manifest.
    stored = objects(reliability_s3, f"{prefix}/tiny/")
    assert f"{prefix}/tiny/ep0-ba2-rank0.pt.manifest.json" in stored
    assert f"{prefix}/tiny/ep0-ba4-rank0.pt.manifest.json" not in stored


@pytest.mark.slow
def test_outage_while_streaming_shards_is_retried(
    mds_dir: Path, in_tmp: Path, reliability_s3: S3Server
) -> None:
    """The bucket goes away after the index is read, before the first shard is fetched: the
    download is retried with backoff and the run trains on exactly the data a local run does."""
    prefix = f"data-{uuid.uuid4().hex[:8]}"
    client = reliability_s3.client()
    for f in (mds_dir / "train").rglob("*"):
        if f.is_file():
            key = f"{prefix}/train/{f.relative_to(mds_dir / 'train').as_posix()}"
            client.put_object(Bucket=reliability_s3.bucket, Key=key, Body=f.read_bytes())
    local = tiny_spec(mds_dir, max_duration="6ba")
    local["loggers"]["jsonl"] = {"path": "local.jsonl"}
    train(load_config_dict(local))

    remote = tiny_spec(mds_dir, max_duration="6ba")
    remote["train_loader"]["dataset"].update(
        local=str(in_tmp / "cache"), remote=f"s3://{reliability_s3.bucket}/{prefix}"
    )
    remote["loggers"]["jsonl"] = {"path": "remote.jsonl"}
    trainer = build_trainer(load_config_dict(remote))
    assert not list((in_tmp / "cache").rglob("*.mds*")), "no shard may be cached before the outage"
    reliability_s3.go_down()
    restarter = threading.Timer(4.0, reliability_s3.start)
    restarter.start()
    try:
        trainer.fit()
    finally:
        restarter.join()
        trainer.close()
    assert reliability_s3.attempts_while_down > 0, "no shard download met the outage"
    got = {r["step"]: r["loss/train/total"] for r in read_metrics(in_tmp / "remote.jsonl")}
    want = {r["step"]: r["loss/train/total"] for r in read_metrics(in_tmp / "local.jsonl")}
    assert got == want
