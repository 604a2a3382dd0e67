"""Export straight from a bucket: a run's save_folder URI means its newest checkpoint.

Runs save to the real S3 server on 127.0.0.1 (``s3_server``). A save folder holds every kept
checkpoint and Composer's ``latest-rank0.pt.symlink`` pointer; export follows the pointer and
downloads only the checkpoint it names, and anything else is refused with the URI named before
a byte of checkpoint is fetched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from composer.utils.object_store import S3ObjectStore

from mpt_train.config import load_config_dict
from mpt_train.export import CheckpointError, export_hf, load_model, read_checkpoint
from mpt_train.model import MPTModel
from mpt_train.train.builder import train
from tests.helpers import REPO
from tests.s3_server import S3Server
from tests.train.conftest import tiny_spec


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Object names fetched through Composer's S3 store (the download itself still happens)."""
    fetched: list[str] = []
    real = S3ObjectStore.download_object

    def recording(self: S3ObjectStore, object_name: str, *args: object, **kw: object) -> None:
        fetched.append(object_name)
        real(self, object_name, *args, **kw)

    monkeypatch.setattr(S3ObjectStore, "download_object", recording)
    return fetched


def _keys(server: S3Server, prefix: str) -> set[str]:
    pages = (
        server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=server.bucket, Prefix=prefix)
    )
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _assert_same_weights(net: MPTModel, trained: dict[str, torch.Tensor]) -> None:
    got = net.state_dict()
    assert set(got) == set(trained)
    for name, value in trained.items():
        assert torch.equal(got[name], value), name


@pytest.fixture(scope="module")
def s3_run(
    s3_session: S3Server, mds32: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny run saving to the bucket at batches 2 and 4: its save_folder URI and final weights."""
    prefix = f"export-{uuid.uuid4().hex[:8]}"
    spec = tiny_spec(
        mds32,
        max_duration="4ba",
        save_interval="2ba",
        save_folder=f"s3://{s3_session.bucket}/{prefix}/{{run_name}}",
        loggers={"console": False},
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_session.env.items():
            mp.setenv(key, value)
        mp.chdir(tmp_path_factory.mktemp("s3run"))
        trainer = train(load_config_dict(spec))
    weights = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
    return s3_session.url(prefix, "tiny"), weights


def test_save_folder_uri_exports_the_newest_checkpoint_only(
    s3_run: tuple[str, dict[str, torch.Tensor]],
    s3_server: S3Server,
    tmp_path: Path,
    downloads: list[str],
) -> None:
    """The URI users have at hand (the spec's save_folder) gives the run's final weights, and
    the older checkpoint kept beside it is never downloaded."""
    folder, trained = s3_run
    key = folder.removeprefix(f"s3://{s3_server.bucket}/")
    stored = _keys(s3_server, key + "/")
    assert {f"{key}/ep0-ba2-rank0.pt", f"{key}/ep0-ba4-rank0.pt"} <= stored
    pointer = s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=f"{key}/latest-rank0.pt.symlink"
    )
    assert pointer["Body"].read().decode() == f"{key}/ep0-ba4-rank0.pt"  # Composer's format

    out = export_hf(folder, tmp_path / "hf")
    assert downloads == [f"{key}/latest-rank0.pt.symlink", f"{key}/ep0-ba4-rank0.pt"]
    exported, tokenizer = load_model(out)  # transformers' MptForCausalLM, read back
    _assert_same_weights(exported, trained)
    assert tokenizer == str(out)
    # Not merely some checkpoint: the one from batch 2 holds other weights.
    older = read_checkpoint(f"{folder}/ep0-ba2-rank0.pt").model_state
    assert not torch.equal(older["wte.weight"], trained["wte.weight"])


def test_save_folder_copied_to_disk_follows_the_pointer_file(
    s3_run: tuple[str, dict[str, torch.Tensor]], s3_server: S3Server, tmp_path: Path
) -> None:
    """``aws s3 sync`` of a save folder brings the pointer as a text file naming the object in
    its old bucket: the checkpoint of that name in the copied folder is the one read."""
    folder, trained = s3_run
    key = folder.removeprefix(f"s3://{s3_server.bucket}/")
    client = s3_server.client()
    for obj in _keys(s3_server, key + "/"):
        client.download_file(s3_server.bucket, obj, str(tmp_path / obj.rsplit("/", 1)[1]))
    assert not (tmp_path / "latest-rank0.pt").exists()
    net, _ = load_model(tmp_path)
    _assert_same_weights(net, trained)


def test_prefix_without_pointer_or_metadata_is_refused_before_downloading(
    s3_run: tuple[str, dict[str, torch.Tensor]], s3_server: S3Server, downloads: list[str]
) -> None:
    """The bucket one level up holds checkpoints but is no checkpoint: say so, with the URI and
    what was expected, instead of downloading everything and failing on a missing file."""
    folder, _ = s3_run
    parent = folder.rsplit("/", 1)[0]
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(parent)
    message = str(err.value)
    assert message.startswith(f"{parent}: ")
    assert "latest-rank0.pt.symlink" in message and ".metadata" in message
    assert downloads == []


def test_convert_script_reports_a_prefix_that_is_no_checkpoint(
    s3_run: tuple[str, dict[str, torch.Tensor]], s3_server: S3Server, tmp_path: Path
) -> None:
    """Users see one line naming the URI and exit status 2, not a traceback."""
    folder, _ = s3_run
    parent = folder.rsplit("/", 1)[0]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert_to_hf.py"), parent, str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **s3_server.env},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: cannot export {parent}: {parent}: neither a save_folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "hf").exists()


def test_pointer_to_a_deleted_checkpoint_is_named(
    tiny_ckpt: Path, s3_server: S3Server, downloads: list[str]
) -> None:
    """Retention removed the checkpoint the pointer names: the error names both."""
    key = f"stale-{uuid.uuid4().hex[:8]}/run"
    client = s3_server.client()
    client.upload_file(str(tiny_ckpt), s3_server.bucket, f"{key}/ep0-ba3-rank0.pt")
    client.put_object(
        Bucket=s3_server.bucket,
        Key=f"{key}/latest-rank0.pt.symlink",
        Body=f"{key}/ep0-ba9-rank0.pt",
    )
    with pytest.raises(
        CheckpointError, match=r"latest-rank0\.pt\.symlink names .*ep0-ba9-rank0\.pt"
    ):
        read_checkpoint(s3_server.url(key))
    assert downloads == [f"{key}/latest-rank0.pt.symlink"]


def test_sharded_checkpoint_prefix_downloads_only_its_own_objects(
    tiny_ckpt: Path, s3_server: S3Server, tmp_path: Path, downloads: list[str]
) -> None:
    """A sharded checkpoint's folder URI, and a save folder whose pointer names one (Composer
    writes the folder's object name), fetch that folder's ``.metadata`` and shards alone."""
    import torch.distributed.checkpoint as dcp
    from composer.utils import create_symlink_file

    state = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)["state"]
    key = f"sharded-{uuid.uuid4().hex[:8]}/run"
    client = s3_server.client()
    for batch in (2, 3):
        local = tmp_path / f"ep0-ba{batch}"
        dcp.save({"state": state}, checkpoint_id=str(local))
        for f in local.iterdir():
            client.upload_file(str(f), s3_server.bucket, f"{key}/ep0-ba{batch}/{f.name}")
    pointer = tmp_path / "latest.symlink"
    create_symlink_file(f"{key}/ep0-ba3", pointer)
    client.upload_file(str(pointer), s3_server.bucket, f"{key}/latest-rank0.pt.symlink")
    newest = {f"{key}/ep0-ba3/{f.name}" for f in (tmp_path / "ep0-ba3").iterdir()}
    assert f"{key}/ep0-ba3/.metadata" in newest

    want = {k[len("model.") :]: v for k, v in state["model"].items()}
    for uri, fetched in (
        (s3_server.url(key, "ep0-ba3"), newest),
        (s3_server.url(key), {f"{key}/latest-rank0.pt.symlink", *newest}),
    ):
        downloads.clear()
        net, _ = load_model(uri)
        assert set(downloads) == fetched and len(downloads) == len(fetched), uri
        _assert_same_weights(net, want)


def test_local_save_folder_whose_latest_names_a_cut_short_save(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """``latest-rank0.pt`` naming a sharded folder without ``.metadata`` (rank 0 died before
    writing it) is a CheckpointError naming that folder, not a bare FileNotFoundError."""
    partial = tmp_path / "ep0-ba4"
    partial.mkdir()
    (partial / "__1_0.distcp").write_bytes(b"\0" * 64)
    os.symlink("ep0-ba4", tmp_path / "latest-rank0.pt")
    with pytest.raises(CheckpointError, match=rf"{partial}: not a sharded checkpoint"):
        read_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"{empty}: a folder without \.metadata"):
        read_checkpoint(empty)


@pytest.mark.slow
def test_two_rank_sharded_run_exports_from_its_save_folder_uri(
    mds32: Path, s3_server: S3Server, tmp_path: Path, downloads: list[str]
) -> None:
    """Two FSDP ranks save sharded checkpoints to the bucket; the save folder URI exports the
    weights the run ended with, fetching only the newest checkpoint's folder."""
    from tests.train.conftest import composer_cmd, run, write_spec

    prefix = f"sharded-run-{uuid.uuid4().hex[:8]}"
    spec = tiny_spec(
        mds32, max_duration="4ba", save_interval="2ba",
        save_folder=f"s3://{s3_server.bucket}/{prefix}/{{run_name}}",
        fsdp={"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    )  # fmt: skip
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    script = str(REPO / "tests/reliability/fault_run.py")
    run(
        [*composer_cmd(2), script, "--ledger", str(tmp_path / "run"), str(spec_file)],
        cwd=tmp_path,
        env=s3_server.env,
    )
    key = f"{prefix}/tiny"
    stored = _keys(s3_server, key + "/")
    assert {f"{key}/ep0-ba2/.metadata", f"{key}/ep0-ba4/.metadata"} <= stored
    pointer = s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=f"{key}/latest-rank0.pt.symlink"
    )
    assert pointer["Body"].read().decode() == f"{key}/ep0-ba4"  # the folder, for sharded saves

    net, _ = load_model(export_hf(s3_server.url(key), tmp_path / "hf"))
    newest = {k for k in stored if k.startswith(f"{key}/ep0-ba4/")}
    assert sorted(downloads) == sorted({f"{key}/latest-rank0.pt.symlink", *newest})
    trained = torch.load(tmp_path / "run.weights.pt")
    _assert_same_weights(net, {k[len("model.") :]: v for k, v in trained.items()})
