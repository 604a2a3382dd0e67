"""Checkpoint integrity: a manifest after every save, and a verified choice at every resume
(the resume half is :mod:`mpt_train.reliability.resume`).

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
    describe_files,
    files_written_by,
    manifest_path,
    new_manifest,
    read_manifest,
    write_manifest,
)
from mpt_train.reliability.resume import (
    LATEST_LINK,
    QUARANTINE,
    CheckpointLayoutError,
    check_resume_layout,
    choose_local_checkpoint,
    list_checkpoints,
    prepare_resume,
)
from mpt_train.reliability.resume_spec import refused_changes

__all__ = [
    "LATEST_LINK",
    "QUARANTINE",
    "CheckpointIntegrity",
    "CheckpointLayoutError",
    "CheckpointSaveError",
    "CheckpointUploadError",
    "check_resume_layout",
    "choose_local_checkpoint",
    "prepare_resume",
]

log = logging.getLogger(__name__)


#: How often the remote ``latest`` pointer's precondition (all objects uploaded) is re-checked.
SYMLINK_POLL_SECONDS = 1.0


class CheckpointSaveError(RunFailure):
    """A checkpoint could not be written; the message names the path and why."""


class CheckpointUploadError(RunFailure):
    """A checkpoint upload failed after retries; the message names the URL."""


class CheckpointIntegrity(Callback):
    """Guard every save of the Trainer's ``CheckpointSaver`` (see the module docstring).

    Args:
        save_folder: The run's ``save_folder`` (``{run_name}`` allowed), local or a URL.
        min_free_space_factor: Free space required before a local save, as a multiple of the
            previous checkpoint's size on this rank (or of the model and optimizer state).
        spec: The run's resolved spec, recorded in every manifest: a resume compares it with
            its own, and rotation never removes a checkpoint another spec wrote.
    """

    def __init__(
        self,
        save_folder: str,
        min_free_space_factor: float = 1.1,
        spec: dict[str, Any] | None = None,
    ) -> None:
        self.save_folder = save_folder
        self.min_free_space_factor = min_free_space_factor
        self.spec = spec
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
            # the same folder, an overwritten run) are not older, checkpoints another spec wrote
            # are another run's, and never the one just saved.
            now = int(state.timestamp.batch)
            older = [
                n
                for b, n in list_checkpoints(folder)
                if b <= now and n != saved and self._same_run(folder, n)
            ]
            for name in older[self._keep - 1 :]:
                _delete_checkpoint(folder, name)
            _drop_stale_manifests(folder)

    def _same_run(self, folder: Path, name: str) -> bool:
        """Whether checkpoint ``name`` is complete and was written by this run's spec (a
        manifest that records no spec predates spec records and counts as this run's)."""
        path = manifest_path(folder, name)
        if not path.exists():
            return False
        try:
            saved = read_manifest(path).spec
        except CheckpointCorruptError:
            return True
        return saved is None or self.spec is None or not refused_changes(saved, self.spec)

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
                new_manifest(name, int(state.timestamp.batch), state.run_name, merged, self.spec),
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
            batch = int(state.timestamp.batch)
            manifest = new_manifest(name, batch, state.run_name, files, self.spec)
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "m.json"
                local.write_text(manifest.to_json())
                _retry(
                    lambda: store.upload_object(f"{remote}{MANIFEST_SUFFIX}", str(local)),
                    f"uploading manifest {url}{MANIFEST_SUFFIX}",
                )
            self._point_remote_latest(store, url)
            log.info("checkpoint %s uploaded (%d objects, manifest written)", url, len(files))
        dist.barrier()

    def _point_remote_latest(self, store: Any, url: str) -> None:
        """Move the bucket's ``latest`` pointer to the checkpoint just completed, now.

        Composer moves it in the background at a later batch end, once it has polled the
        bucket; a node lost before then leaves the pointer one checkpoint behind, and the
        relaunch restarts from the older one and fails re-uploading the newer one's objects.
        The pointer file is Composer's own (its content and name are unchanged); its pending
        background upload is dropped, since it could only point at this or an older save.
        """
        assert self._saver is not None
        tasks = self._saver.symlink_upload_tasks
        if not tasks:
            return
        _, local_file, remote_name = tasks[-1]
        _retry(
            lambda: store.upload_object(remote_name, local_file),
            f"uploading the latest-checkpoint pointer for {url}",
        )
        tasks.clear()


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
