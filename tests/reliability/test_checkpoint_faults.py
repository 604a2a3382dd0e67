"""Crashes during a save, corrupted checkpoints, a vanished or full save_folder: real runs."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from mpt_train.config import load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.reliability import CheckpointCorruptError, CheckpointSaveError
from mpt_train.train.builder import build_trainer, train
from tests.helpers import REPO
from tests.reliability.faults import ReplaceFolderWithFile, StopAfter
from tests.train.conftest import run, tiny_spec, write_spec

CKPT = "ep0-ba{}-rank0.pt"


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss/train/total"] for r in read_metrics(path) if "loss/train/total" in r}


def spec_for(mds: Path, folder: Path, **top: Any) -> dict[str, Any]:
    top = {"save_folder": str(folder), "save_interval": "2ba", "max_duration": "8ba", **top}
    return tiny_spec(mds, **top)


def killed_at_save(cwd: Path, spec_file: Path, fault: str, batch: int):
    """Train ``spec_file`` in its own process, SIGKILLed by ``fault`` at the save of ``batch``."""
    cmd = [sys.executable, str(REPO / "tests/reliability/fault_run.py"), fault, str(batch),
           str(spec_file), "loggers.jsonl.path=first.jsonl"]  # fmt: skip
    return run(cmd, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def reference(mds_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of an uninterrupted 8-batch run (no checkpoints)."""
    where = tmp_path_factory.mktemp("reference")
    spec = tiny_spec(mds_dir, run_name="reference", max_duration="8ba")
    spec["loggers"]["jsonl"] = {"path": str(where / "metrics.jsonl")}
    train(load_config_dict(spec))
    return losses(where / "metrics.jsonl")


def test_kill_during_save_resumes_from_previous_complete_checkpoint(
    mds_dir: Path, in_tmp: Path, reference: dict[int, float]
) -> None:
    ckpt = in_tmp / "ckpt"
    spec_file = write_spec(in_tmp / "spec.yaml", spec_for(mds_dir, ckpt))
    killed = killed_at_save(in_tmp, spec_file, "--kill-during-save", 6)
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = ckpt / CKPT.format(6)
    assert partial.is_file() and not (ckpt / f"{partial.name}.manifest.json").exists()
    assert (ckpt / f"{CKPT.format(4)}.manifest.json").is_file()

    spec = spec_for(mds_dir, ckpt)
    spec["loggers"]["jsonl"] = {"path": "second.jsonl"}
    train(load_config_dict(spec))
    second = losses(in_tmp / "second.jsonl")
    assert sorted(second) == [5, 6, 7, 8]
    assert all(second[s] == reference[s] for s in second), (second, reference)
    assert (ckpt / ".quarantine" / CKPT.format(6)).is_file()
    assert (ckpt / CKPT.format(8)).is_file() and (
        ckpt / f"{CKPT.format(8)}.manifest.json"
    ).is_file()


def test_kill_before_the_manifest_keeps_the_previous_checkpoint_with_keep_one(
    mds_dir: Path, in_tmp: Path, reference: dict[int, float]
) -> None:
    """With ``save_num_checkpoints_to_keep: 1`` (the pretraining default) the previous
    checkpoint is deleted only once the new one is complete: a crash while the new one is
    hashed resumes from the previous one, not from batch 0."""
    ckpt = in_tmp / "ckpt"
    spec_file = write_spec(
        in_tmp / "spec.yaml", spec_for(mds_dir, ckpt, save_num_checkpoints_to_keep=1)
    )
    killed = killed_at_save(in_tmp, spec_file, "--kill-before-manifest", 6)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (ckpt / CKPT.format(4)).is_file(), "the last complete checkpoint was rotated away"
    assert not (ckpt / CKPT.format(2)).exists()  # rotation still happens once complete

    spec = spec_for(mds_dir, ckpt, save_num_checkpoints_to_keep=1)
    spec["loggers"]["jsonl"] = {"path": "second.jsonl"}
    train(load_config_dict(spec))
    second = losses(in_tmp / "second.jsonl")
    assert sorted(second) == [5, 6, 7, 8]
    assert all(second[s] == reference[s] for s in second), (second, reference)
    kept = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("."))
    assert kept == [CKPT.format(8), f"{CKPT.format(8)}.manifest.json", "latest-rank0.pt"]


def test_fallback_with_no_intact_checkpoint_stops_instead_of_starting_over(
    mds_dir: Path, in_tmp: Path
) -> None:
    ckpt = in_tmp / "ckpt"
    trainer = build_trainer(
        load_config_dict(spec_for(mds_dir, ckpt, save_num_checkpoints_to_keep=1)),
        extra_callbacks=[StopAfter(4)],
    )
    trainer.fit()
    trainer.close()
    only = ckpt / CKPT.format(4)
    assert sorted(p.name for p in ckpt.glob("ep*.pt")) == [only.name]
    data = bytearray(only.read_bytes())
    data[len(data) // 2] ^= 0x40
    only.write_bytes(bytes(data))
    spec = spec_for(mds_dir, ckpt, reliability={"on_corrupt_checkpoint": "fallback"})
    with pytest.raises(CheckpointCorruptError, match="nothing to fall back to") as err:
        train(load_config_dict(spec))
    assert str(only) in str(err.value)
    assert only.is_file(), "nothing is moved when the run stops"


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_corrupt_checkpoint_is_named_then_fallback_resumes(
    damage: str, mds_dir: Path, in_tmp: Path, reference: dict[int, float]
) -> None:
    ckpt = in_tmp / "ckpt"
    trainer = build_trainer(
        load_config_dict(spec_for(mds_dir, ckpt)), extra_callbacks=[StopAfter(6)]
    )
    trainer.fit()
    trainer.close()
    bad = ckpt / CKPT.format(6)
    data = bytearray(bad.read_bytes())
    if damage == "bitflip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) - 100]
    bad.write_bytes(bytes(data))

    with pytest.raises(CheckpointCorruptError, match=str(bad)) as err:
        train(load_config_dict(spec_for(mds_dir, ckpt)))
    assert "on_corrupt_checkpoint=fallback" in str(err.value)
    assert bad.is_file(), "fail mode must not move anything"

    spec = spec_for(mds_dir, ckpt, reliability={"on_corrupt_checkpoint": "fallback"})
    spec["loggers"]["jsonl"] = {"path": "second.jsonl"}
    train(load_config_dict(spec))
    second = losses(in_tmp / "second.jsonl")
    assert sorted(second) == [5, 6, 7, 8]
    assert all(second[s] == reference[s] for s in second)
    assert (ckpt / ".quarantine" / CKPT.format(6)).read_bytes() == bytes(data)


def test_save_folder_replaced_by_file_fails_naming_the_path(mds_dir: Path, in_tmp: Path) -> None:
    ckpt = in_tmp / "ckpt"
    trainer = build_trainer(
        load_config_dict(spec_for(mds_dir, ckpt)),
        extra_callbacks=[ReplaceFolderWithFile(3, ckpt)],
    )
    with pytest.raises(CheckpointSaveError, match=f"{ckpt}.* not a directory"):
        trainer.fit()
    trainer.close()
    # The checkpoints written before the folder vanished are intact and complete.
    moved = in_tmp / "ckpt.moved"
    assert (moved / CKPT.format(2)).is_file() and (
        moved / f"{CKPT.format(2)}.manifest.json"
    ).is_file()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"mpt-{uuid.uuid4().hex[:6]}", str(where)],
        capture_output=True,
    )
    return proc.returncode == 0


def test_disk_full_fails_before_writing_naming_the_path(mds_dir: Path, in_tmp: Path) -> None:
    """A 1 MiB tmpfs is too small for one ~3 MiB checkpoint (weights + Adam state). Without
    root (no tmpfs) the disk is made "full" by asking for more free space than any disk has
    (``min_free_space_factor``): the same check, on the same branch, fails the same way."""
    disk = in_tmp / "disk"
    mounted = _mount_tmpfs(disk, "1m")
    reliability = {} if mounted else {"min_free_space_factor": 1e12}
    try:
        ckpt = disk / "ckpt"
        ckpt.mkdir(parents=True)
        spec = spec_for(mds_dir, ckpt, reliability=reliability)
        with pytest.raises(CheckpointSaveError, match=f"not saving checkpoint {ckpt}.*MiB free"):
            train(load_config_dict(spec))
        assert not list(ckpt.glob("ep*")), "nothing partial may be written"
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_each_rank_verifies_only_the_shards_it_wrote(tmp_path: Path) -> None:
    from mpt_train.reliability.manifest import (
        describe_files,
        new_manifest,
        owner_of,
        verify_manifest,
    )

    unit = tmp_path / "ep0-ba4"
    unit.mkdir()
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"):
        (unit / name).write_bytes(name.encode() * 1000)
    files = describe_files(sorted(unit.iterdir()), tmp_path)
    manifest = new_manifest("ep0-ba4", 4, "run", files)
    assert [owner_of(rel, 3) for rel in sorted(files)] == [0, 0, 1, 2]
    assert owner_of("ep0-ba4/__2_0.distcp", 2) == 0  # resumed on fewer ranks
    data = bytearray((unit / "__1_0.distcp").read_bytes())
    data[10] ^= 1
    (unit / "__1_0.distcp").write_bytes(bytes(data))
    verify_manifest(tmp_path, manifest, rank=0, world_size=3)  # not rank 0's file
    verify_manifest(tmp_path, manifest, rank=2, world_size=3)
    with pytest.raises(CheckpointCorruptError, match=r"__1_0\.distcp.*xxh3_128"):
        verify_manifest(tmp_path, manifest, rank=1, world_size=3)
    with pytest.raises(CheckpointCorruptError, match=r"__1_0\.distcp"):
        verify_manifest(tmp_path, manifest)  # one process checks everything


@pytest.mark.slow
def test_two_ranks_find_a_corrupt_shard_of_rank_one_and_fall_back(
    mds_dir: Path, in_tmp: Path
) -> None:
    from tests.train.conftest import composer_cmd

    ckpt = in_tmp / "ckpt"
    spec = spec_for(
        mds_dir, ckpt, max_duration="4ba",
        fsdp={"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    )  # fmt: skip
    spec_file = write_spec(in_tmp / "spec.yaml", spec)
    launch = [*composer_cmd(2), str(REPO / "train.py"), str(spec_file)]
    run(launch, cwd=in_tmp)
    bad = ckpt / "ep0-ba4" / "__1_0.distcp"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad.write_bytes(bytes(data))

    failed = run([*launch, "max_duration=6ba"], cwd=in_tmp, check=False)
    assert failed.returncode != 0
    assert f"corrupt checkpoint {bad}" in failed.stdout + failed.stderr
    assert bad.is_file()

    run([*launch, "max_duration=6ba", "reliability.on_corrupt_checkpoint=fallback",
         "loggers.jsonl.path=second.jsonl"], cwd=in_tmp)  # fmt: skip
    assert sorted(losses(in_tmp / "second.jsonl")) == [3, 4, 5, 6]  # resumed from batch 2
    assert (ckpt / ".quarantine" / "ep0-ba4" / "__1_0.distcp").is_file()


def test_unreadable_shard_is_reported_like_corruption_not_raised_past_the_collective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error on one rank's shard must reach every rank as a named problem: a rank that
    raised on its own would leave the others waiting on the collective until the timeout."""
    import errno

    import mpt_train.reliability.manifest as manifest_mod
    from mpt_train.reliability.manifest import describe_files, new_manifest, write_manifest
    from mpt_train.reliability.resume import choose_local_checkpoint

    for batch in (2, 4):
        name = CKPT.format(batch)
        (tmp_path / name).write_bytes(b"x" * 100)
        files = describe_files([tmp_path / name], tmp_path)
        write_manifest(tmp_path, new_manifest(name, batch, "run", files))
    bad = tmp_path / CKPT.format(4)

    def failing_digest(path: Path) -> str:
        if Path(path) == bad:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    real = manifest_mod.file_digest
    monkeypatch.setattr(manifest_mod, "file_digest", failing_digest)
    with pytest.raises(CheckpointCorruptError, match=rf"{bad}: unreadable \(Input/output error\)"):
        choose_local_checkpoint(tmp_path, "fail")
    assert choose_local_checkpoint(tmp_path, "fallback") == CKPT.format(2)
    assert (tmp_path / ".quarantine" / CKPT.format(4)).is_file()
    assert (tmp_path / "latest-rank0.pt").resolve() == (tmp_path / CKPT.format(2)).resolve()


def test_resuming_a_one_rank_checkpoint_on_two_sharded_ranks_names_it(
    mds_dir: Path, in_tmp: Path
) -> None:
    """Same run name on one process, then on two FSDP ranks: the checkpoint is one file, the
    sharded run needs a folder. One line naming the checkpoint, not a traceback from inside
    Composer after the model is built; the reverse (a sharded folder, one rank) likewise."""
    from mpt_train.reliability import CheckpointLayoutError, check_resume_layout
    from tests.train.conftest import composer_cmd

    ckpt = in_tmp / "ckpt"
    spec = spec_for(mds_dir, ckpt, max_duration="2ba", fsdp={"sharding_strategy": "FULL_SHARD"})
    train(load_config_dict(spec))
    spec_file = write_spec(in_tmp / "spec.yaml", {**spec, "max_duration": "4ba"})
    two = run([*composer_cmd(2), str(REPO / "train.py"), str(spec_file)], cwd=in_tmp, check=False)
    assert two.returncode != 0
    line = f"run failed: cannot resume from {ckpt / CKPT.format(2)}: it was written as one file"
    assert line in two.stderr, two.stderr[-3000:]
    assert "Traceback" not in two.stderr

    sharded = in_tmp / "sharded" / "ep0-ba2"
    sharded.mkdir(parents=True)
    (sharded.parent / "latest-rank0.pt").symlink_to("ep0-ba2")
    with pytest.raises(CheckpointLayoutError, match="written as a sharded folder"):
        check_resume_layout(str(sharded.parent), "tiny", sharded=False)
    check_resume_layout(str(sharded.parent), "tiny", sharded=True)


def test_rotation_keeps_the_new_save_and_leaves_later_batches_alone(tmp_path: Path) -> None:
    """Another run's checkpoint at a later batch in the same folder (a shared save_folder, an
    overwritten run) is not "older": rotation removes only this lineage's past saves."""
    from types import SimpleNamespace

    from composer.core import Timestamp

    from mpt_train.reliability.checkpoints import CheckpointIntegrity

    for batch in (50, 100, 600):
        (tmp_path / CKPT.format(batch)).write_bytes(b"x")
        (tmp_path / f"{CKPT.format(batch)}.manifest.json").write_text("{}")
    guard = CheckpointIntegrity(str(tmp_path))
    guard._saver, guard._keep = object(), 1  # type: ignore[assignment]
    state = SimpleNamespace(timestamp=Timestamp(batch=100))
    guard._rotate(state, tmp_path, CKPT.format(100), remote=False)  # type: ignore[arg-type]
    left = sorted(p.name for p in tmp_path.glob("ep*.pt"))
    assert left == sorted([CKPT.format(100), CKPT.format(600)])
    assert not (tmp_path / f"{CKPT.format(50)}.manifest.json").exists()
