"""Checkpoint integrity: a manifest after every save, and a verified choice at every resume.

Two halves of one promise, "a failure costs only the work since the last complete checkpoint":

* :class:`CheckpointIntegrity` (a callback) wraps Composer's own ``CheckpointSaver`` so that
  every save is (1) preceded by a check that the folder is a writable directory with room for
  the checkpoint, so a full disk or a vanished folder fails with the path named *before* a
  partial file is written; (2) followed, once every rank has finished (and, for ``s3://``,
  once the upload has completed), by an atomically written manifest. A save that fails is
  re-raised naming the checkpoint path or URL.
* :func:`prepare_resume` runs before Composer's autoresume looks at ``save_folder``. It moves
  checkpoints without a manifest (cut short by a crash) to ``.quarantine/``, verifies the newest
  complete one against its manifest, falls back past corrupt ones when told to (quarantining
  them too; nothing is deleted), and points ``latest-rank0.pt`` at the checkpoint it chose, so
  Composer resumes from exactly that one. Composer skips hidden folders, so quarantined files
  never collide with new saves.

Wrapping ``CheckpointSaver._save_checkpoint`` on the one instance the Trainer built (rather
than re-implementing the saver) keeps Composer's file layout, upload and rotation logic intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist, format_name_with_dist, format_name_with_dist_and_time

from mpt_train.errors import RunFailure
from mpt_train.reliability.manifest import (
    MANIFEST_SUFFIX,
    CheckpointCorruptError,
    Manifest,
    describe_files,
    files_written_by,
    manifest_path,
    new_manifest,
    read_manifest,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "LATEST_LINK",
    "QUARANTINE",
    "CheckpointIntegrity",
    "CheckpointLayoutError",
    "CheckpointSaveError",
    "CheckpointUploadError",
    "check_resume_layout",
    "prepare_resume",
]

log = logging.getLogger(__name__)

LATEST_LINK = "latest-rank0.pt"  # Composer's save_latest_filename for rank 0
QUARANTINE = ".quarantine"
_BATCH = re.compile(r"ba(\d+)")


#: How often the remote ``latest`` pointer's precondition (all objects uploaded) is re-checked.
SYMLINK_POLL_SECONDS = 1.0


class CheckpointSaveError(RunFailure):
    """A checkpoint could not be written; the message names the path and why."""


class CheckpointUploadError(RunFailure):
    """A checkpoint upload failed after retries; the message names the URL."""


class CheckpointLayoutError(RunFailure):
    """A checkpoint was written in the other layout (one file vs a sharded folder)."""


class CheckpointIntegrity(Callback):
    """Guard every save of the Trainer's ``CheckpointSaver`` (see the module docstring).

    Args:
        save_folder: The run's ``save_folder`` (``{run_name}`` allowed), local or a URL.
        min_free_space_factor: Free space required before a local save, as a multiple of the
            previous checkpoint's size on this rank (or of the model and optimizer state).
    """

    def __init__(self, save_folder: str, min_free_space_factor: float = 1.1) -> None:
        self.save_folder = save_folder
        self.min_free_space_factor = min_free_space_factor
        self._saver: CheckpointSaver | None = None
        self._last_size: int | None = None
        self._keep = -1

    def init(self, state: State, logger: Logger) -> None:
        savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]
        if not savers:
            log.warning("no CheckpointSaver: checkpoint manifests are not written")
            return
        self._saver = savers[0]
        # Composer rotates old checkpoints away inside its save, before this callback has
        # written the new one's manifest: a crash in between (hashing tens of GB takes a while)
        # would leave the new checkpoint incomplete and the previous one deleted, so the run
        # would restart from scratch. Rotation happens here instead, once the manifest exists.
        # (0, bucket only, keeps no local copy: Composer's own handling stays in charge.)
        self._keep = self._saver.num_checkpoints_to_keep
        if self._keep > 0:
            self._saver.num_checkpoints_to_keep = -1
        original = self._saver._save_checkpoint

        def guarded_save(state: State, logger: Logger) -> None:
            self._save(original, state, logger)

        self._saver._save_checkpoint = guarded_save  # type: ignore[method-assign]
        uploader = self._saver.remote_uploader
        if uploader is not None:
            # Composer polls the bucket for a checkpoint's objects every 30 s before it moves the
            # remote ``latest`` pointer; saves wait for that, so poll often (HEAD requests, cheap).
            self._saver._symlink_upload_wait_before_next_try_in_seconds = SYMLINK_POLL_SECONDS
            # Composer re-raises a failed background upload from batch_end/fit_end as the bare
            # botocore error; name the checkpoint folder URL instead.
            folder = format_name_with_dist(self.save_folder, state.run_name)
            for method in ("check_workers", "wait"):
                setattr(uploader, method, _naming_failures(getattr(uploader, method), folder))

    # -- one save ---------------------------------------------------------------------------

    def _unit(self, state: State) -> tuple[Path, str]:
        """(local folder, name of the checkpoint file or sharded folder inside it)."""
        assert self._saver is not None
        name = self._saver.filename.format(state, keep_placeholders=True)
        path = Path(composer_checkpoint.get_save_filename(state, name))
        unit = path.parent if state.fsdp_sharded_state_dict_enabled else path
        folder = Path(format_name_with_dist(self._saver.folder, state.run_name))
        return folder, unit.relative_to(folder).as_posix()

    def _remote_unit(self, state: State) -> str | None:
        """Object name of the checkpoint (file, or sharded prefix) in the bucket, if remote."""
        saver = self._saver
        if saver is None or saver.remote_file_name is None or saver.remote_uploader is None:
            return None
        if not state.fsdp_sharded_state_dict_enabled:
            return saver.remote_file_name.format(state).lstrip("/")
        assert state.fsdp_config is not None
        name = saver.remote_file_name.format(state, keep_placeholders=True).lstrip("/")
        prefix = os.path.join(Path(name).parent, state.fsdp_config.sharded_ckpt_prefix_dir)
        return format_name_with_dist_and_time(prefix, state.run_name, state.timestamp)

    def _url(self, state: State, object_name: str) -> str:
        from composer.utils import parse_uri

        backend, bucket, _ = parse_uri(format_name_with_dist(self.save_folder, state.run_name))
        return f"{backend}://{bucket}/{object_name}"

    def _save(self, original: Any, state: State, logger: Logger) -> None:
        folder, name = self._unit(state)
        remote = self._remote_unit(state)
        problem = None if remote is not None else self._space_problem(folder, state)
        problems = [p for p in dist.all_gather_object(problem) if p]
        if problems:
            raise CheckpointSaveError(f"not saving checkpoint {folder / name}: {problems[0]}")
        try:
            original(state, logger)
        except Exception as e:
            where = self._url(state, remote) if remote else str(folder / name)
            raise CheckpointSaveError(
                f"saving checkpoint {where} failed: {type(e).__name__}: {e}"
            ) from e
        if remote is not None:
            self._finish_remote(state, folder, name, remote)
        else:
            self._finish_local(state, folder, name)
        self._rotate(state, folder, name, remote is not None)

    def _rotate(self, state: State, folder: Path, saved: str, remote: bool) -> None:
        """Keep the newest ``save_num_checkpoints_to_keep`` checkpoints now that the one just
        saved is complete.

        Locally that counts every complete checkpoint in the folder, including those of
        earlier attempts of the run (Composer's own rotation forgets them at every restart, so
        each restart would leave one behind). For a bucket, the local copies of this process's
        uploaded saves are rotated as Composer does; the bucket keeps every checkpoint.
        """
        saver = self._saver
        if saver is None or self._keep <= 0:
            return
        if remote:
            saver.num_checkpoints_to_keep = self._keep
            try:
                saver._rotate_checkpoints(sharding_enabled=state.fsdp_sharded_state_dict_enabled)
            finally:
                saver.num_checkpoints_to_keep = -1
        elif dist.get_global_rank() == 0 and folder.is_dir():
            # Only this lineage's past: checkpoints at later batches (another run saving into
            # the same folder, an overwritten run) are not older, and never the one just saved.
            now = int(state.timestamp.batch)
            older = [
                n
                for b, n in _checkpoints(folder)
                if b <= now and n != saved and manifest_path(folder, n).exists()
            ]
            for name in older[self._keep - 1 :]:
                _delete_checkpoint(folder, name)
            _drop_stale_manifests(folder)

    def _space_problem(self, folder: Path, state: State) -> str | None:
        """Why a local save would fail now, or None. Checked on every rank before writing."""
        if not folder.is_dir():
            what = "a file" if folder.exists() else "missing"
            return f"save_folder {folder} is not a directory ({what})"
        if not os.access(folder, os.W_OK):
            return f"save_folder {folder} is not writable"
        need = self._last_size or _state_bytes(state)
        need = int(need * self.min_free_space_factor)
        free = shutil.disk_usage(folder).free
        if free < need:
            return (
                f"only {free / 2**20:.1f} MiB free on the disk of {folder}, the checkpoint needs "
                f"about {need / 2**20:.1f} MiB; free space or move save_folder"
            )
        return None

    def _finish_local(self, state: State, folder: Path, name: str) -> None:
        unit = folder / name
        mine = files_written_by(unit, dist.get_global_rank()) if unit.exists() else []
        files = describe_files(mine, folder)
        self._last_size = sum(e["size"] for e in files.values()) or self._last_size
        gathered = dist.all_gather_object(files)
        if dist.get_global_rank() == 0:
            merged: dict[str, Any] = {}
            for part in gathered:
                merged.update(part)
            path = write_manifest(
                folder,
                new_manifest(name, int(state.timestamp.batch), state.run_name, merged),
            )
            log.info("checkpoint %s complete (%d files, manifest %s)", unit, len(merged), path)
            _drop_stale_manifests(folder)
        dist.barrier()

    def _finish_remote(self, state: State, folder: Path, name: str, remote: str) -> None:
        """Wait for this save's uploads; then rank 0 lists them and uploads the manifest last."""
        assert self._saver is not None and self._saver.remote_uploader is not None
        uploader = self._saver.remote_uploader
        url = self._url(state, remote)
        try:
            uploader.wait()
        except Exception as e:
            raise CheckpointUploadError(
                f"uploading checkpoint {url} failed after retries: {type(e).__name__}: {e}"
            ) from e
        dist.barrier()
        if dist.get_global_rank() == 0:
            store = uploader.remote_backend
            names = [o for o in store.list_objects(remote) if not o.endswith(MANIFEST_SUFFIX)]
            names = [o for o in names if o == remote or o.startswith(remote.rstrip("/") + "/")]
            if not names:
                raise CheckpointUploadError(f"checkpoint {url} is not in the bucket after upload")
            files = {o: {"size": store.get_object_size(o)} for o in names}
            manifest = new_manifest(name, int(state.timestamp.batch), state.run_name, files)
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "m.json"
                local.write_text(manifest.to_json())
                _retry(
                    lambda: store.upload_object(f"{remote}{MANIFEST_SUFFIX}", str(local)),
                    f"uploading manifest {url}{MANIFEST_SUFFIX}",
                )
            log.info("checkpoint %s uploaded (%d objects, manifest written)", url, len(files))
        dist.barrier()


def _naming_failures(fn: Any, folder: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CheckpointUploadError:
            raise
        except Exception as e:
            raise CheckpointUploadError(
                f"uploading checkpoint files to {folder} failed after retries: "
                f"{type(e).__name__}: {e}"
            ) from e

    return call


def _retry(fn: Any, what: str, attempts: int = 6, first_wait: float = 1.0) -> Any:
    """Exponential backoff for small control objects (1, 2, 4, 8, 16 s): rides out an outage of
    tens of seconds, then fails naming ``what`` instead of leaving a silent gap."""
    wait = first_wait
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1:
                raise CheckpointUploadError(f"{what} failed after {attempts} attempts: {e}") from e
            log.warning("%s failed (%s); retrying in %.0f s", what, e, wait)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def _state_bytes(state: State) -> int:
    """Model and optimizer bytes held by this rank: what its checkpoint shard will hold."""
    total = 0
    for p in state.model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    for opt in state.optimizers:
        for per_param in opt.state.values():
            for v in per_param.values():
                if hasattr(v, "numel"):
                    local = v.to_local() if hasattr(v, "to_local") else v
                    total += local.numel() * local.element_size()
    return total if any(len(o.state) for o in state.optimizers) else total * 3


def _delete_checkpoint(folder: Path, name: str) -> None:
    """Delete a checkpoint file or sharded folder; its manifest goes last, so a crash part way
    leaves a checkpoint that fails verification (and is set aside), never one that passes."""
    path = folder / name
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        manifest_path(folder, name).unlink()
    log.info("removed old checkpoint %s (save_num_checkpoints_to_keep)", path)


def _drop_stale_manifests(folder: Path) -> None:
    """Manifests of checkpoints Composer rotated away describe nothing: remove them."""
    for m in folder.glob(f"*{MANIFEST_SUFFIX}"):
        if not (folder / m.name[: -len(MANIFEST_SUFFIX)]).exists():
            with contextlib.suppress(FileNotFoundError):
                m.unlink()


# -- resume -----------------------------------------------------------------------------------


def _checkpoints(folder: Path) -> list[tuple[int, str]]:
    """(batch, name) of every checkpoint file or sharded folder, newest first."""
    out = []
    for p in folder.iterdir():
        if p.name.startswith(".") or p.is_symlink() or p.name.endswith(MANIFEST_SUFFIX):
            continue
        m = _BATCH.search(p.name)
        if m and p.name.startswith("ep"):
            out.append((int(m.group(1)), p.name))
    return sorted(out, reverse=True)


def _quarantine(folder: Path, name: str, why: str) -> Path:
    dest_dir = folder / QUARANTINE
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / name
    if dest.exists():
        dest = dest_dir / f"{name}.{int(time.time())}"
    os.replace(folder / name, dest)
    m = manifest_path(folder, name)
    if m.exists():
        os.replace(m, dest_dir / f"{dest.name}{MANIFEST_SUFFIX}")
    log.warning("moved %s checkpoint %s to %s", why, folder / name, dest)
    return dest


def _point_latest(folder: Path, name: str | None) -> None:
    link = folder / LATEST_LINK
    if name is None:
        if link.is_symlink() or link.exists():
            link.unlink()
        return
    tmp = folder / f".{LATEST_LINK}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, link)


def _candidates(folder: Path) -> list[tuple[str, Manifest | CheckpointCorruptError]]:
    """Complete checkpoints (newest first) with their manifests; incomplete ones (no manifest:
    the save was cut short) are quarantined on the way. Rank 0 only."""
    out: list[tuple[str, Manifest | CheckpointCorruptError]] = []
    for _batch, name in _checkpoints(folder):
        mpath = manifest_path(folder, name)
        if not mpath.exists():
            _quarantine(folder, name, "incomplete (no manifest: the save was cut short)")
            continue
        try:
            out.append((name, read_manifest(mpath)))
        except CheckpointCorruptError as e:
            out.append((name, e))
    return out


def choose_local_checkpoint(folder: Path, on_corrupt: str, checksums: bool = True) -> str | None:
    """Quarantine incomplete (and, with ``fallback``, corrupt) checkpoints in ``folder``; point
    ``latest-rank0.pt`` at the newest verified one and return its name (None: start fresh).

    Collective: every rank calls it. Rank 0 lists and quarantines; each rank verifies the
    shards it wrote (:func:`~mpt_train.reliability.manifest.verify_manifest`), and every rank
    gets the same answer or the same error.

    Raises:
        CheckpointCorruptError: the newest complete checkpoint fails verification and
            ``on_corrupt`` is ``fail``; the message names the file.
    """
    rank, world = dist.get_global_rank(), dist.get_world_size()
    listing: list[Any] = [None]
    if rank == 0:
        try:
            listing[0] = _candidates(folder) if folder.is_dir() else []
        except OSError as e:  # every rank must hear of it, not wait on the broadcast
            listing[0] = f"cannot prepare the resume from {folder}: {type(e).__name__}: {e}"
    dist.broadcast_object_list(listing, src=0)
    if isinstance(listing[0], str):
        raise RunFailure(listing[0])
    chosen, corrupt = None, []
    for name, manifest in listing[0]:
        problem: tuple[str, str] | None = None
        if isinstance(manifest, CheckpointCorruptError):
            problem = (manifest.path, manifest.problem)
        else:
            try:
                verify_manifest(folder, manifest, checksums, rank=rank, world_size=world)
            except CheckpointCorruptError as e:
                problem = (e.path, e.problem)
            except OSError as e:  # unreadable here: reported like corruption, never a hang
                problem = (e.filename or str(folder / name), f"unreadable ({e.strerror or e})")
        found = [p for p in dist.all_gather_object(problem) if p is not None]
        if not found:
            chosen = name
            break
        path, why = min(found)  # the same file named on every rank
        if on_corrupt != "fallback":
            raise CheckpointCorruptError(
                path,
                f"{why}. Set reliability.on_corrupt_checkpoint=fallback to resume "
                "from the previous good checkpoint",
            )
        if rank == 0:
            log.error(
                "corrupt checkpoint %s: %s; falling back to the previous checkpoint", path, why
            )
        corrupt.append(name)
    if chosen is None and corrupt:
        # Starting over would silently throw away the whole run: that is a human's decision.
        raise CheckpointCorruptError(
            path,
            f"{why}; and no checkpoint in {folder} is intact ({', '.join(corrupt)} failed "
            "verification), so there is nothing to fall back to. Keep more than one "
            "(save_num_checkpoints_to_keep), or move the folder aside to start the run over",
        )
    # Rank 0 moves and points; every rank waits for its outcome and shares its failure, so none
    # lets Composer look for `latest` before it points at `chosen`, and none waits forever.
    outcome: list[str | None] = [None]
    if rank == 0:
        try:
            for name in corrupt:
                _quarantine(folder, name, "corrupt")
            if folder.is_dir():
                _point_latest(folder, chosen)
        except OSError as e:
            outcome[0] = f"cannot prepare the resume from {folder}: {type(e).__name__}: {e}"
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunFailure(outcome[0])
    if chosen is not None and rank == 0:
        log.info("resuming from verified checkpoint %s", folder / chosen)
    return chosen


def prepare_resume(save_folder: str, run_name: str, on_corrupt: str) -> str | None:
    """Make Composer's autoresume pick the newest complete, intact checkpoint (collective).

    Returns the chosen checkpoint's name, or None when the run starts fresh. Remote folders
    are left to Composer: its ``latest`` pointer only ever follows finished uploads.
    """
    folder = format_name_with_dist(save_folder, run_name)
    if "://" in folder:
        return None
    return choose_local_checkpoint(Path(folder), on_corrupt)


def check_resume_layout(save_folder: str | None, run_name: str, sharded: bool) -> None:
    """Refuse, naming the checkpoint, to resume a one-file checkpoint into a sharded run or a
    sharded folder into an unsharded one (e.g. the same run name on 1 GPU, then on 2):
    Composer would fail inside ``Trainer`` with a traceback after the model was built."""
    if not save_folder:
        return
    folder = format_name_with_dist(save_folder, run_name)
    if "://" in folder:
        return
    latest = Path(folder) / LATEST_LINK
    if not (latest.exists() and (latest.is_symlink() or latest.is_dir())):
        return
    target = latest.resolve()
    if target.is_dir() == sharded:
        return
    written = "a sharded folder (several ranks)" if target.is_dir() else "one file (one rank)"
    wanted = "sharded (fsdp.state_dict_type: sharded" if sharded else "one file (unsharded"
    raise CheckpointLayoutError(
        f"cannot resume from {target}: it was written as {written}, but this run saves and "
        f"loads checkpoints as {wanted} on {dist.get_world_size()} rank(s)); resume it with the "
        "world size and fsdp settings that wrote it, or give this run another run_name or "
        "save_folder"
    )
