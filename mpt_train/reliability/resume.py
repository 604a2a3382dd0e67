"""Resuming from a verified checkpoint: what :func:`prepare_resume` does before Composer's
autoresume looks at ``save_folder``.

It moves checkpoints without a manifest (cut short by a crash) to ``.quarantine/``, verifies
the newest complete one against its manifest, falls back past corrupt ones when told to
(quarantining them too; nothing is deleted), and points ``latest-rank0.pt`` at the checkpoint
it chose, so Composer resumes from exactly that one. Composer skips hidden folders, so
quarantined files never collide with new saves. The manifests are written by
:class:`mpt_train.reliability.checkpoints.CheckpointIntegrity` after every save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from composer.utils import dist, format_name_with_dist

from mpt_train.errors import RunFailure
from mpt_train.reliability.manifest import (
    MANIFEST_SUFFIX,
    CheckpointCorruptError,
    Manifest,
    manifest_path,
    read_manifest,
    verify_manifest,
)

__all__ = [
    "LATEST_LINK",
    "QUARANTINE",
    "CheckpointLayoutError",
    "check_resume_layout",
    "checkpoint_batch",
    "choose_local_checkpoint",
    "list_checkpoints",
    "prepare_resume",
]

log = logging.getLogger(__name__)

LATEST_LINK = "latest-rank0.pt"  # Composer's save_latest_filename for rank 0
QUARANTINE = ".quarantine"
_BATCH = re.compile(r"ba(\d+)")


class CheckpointLayoutError(RunFailure):
    """A checkpoint was written in the other layout (one file vs a sharded folder)."""


def checkpoint_batch(name: str) -> int | None:
    """The batch a checkpoint's name (``ep0-ba20-rank0.pt``, ``ep0-ba20``) was saved at."""
    m = _BATCH.search(name)
    return int(m.group(1)) if m and name.startswith("ep") else None


def list_checkpoints(folder: Path) -> list[tuple[int, str]]:
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
    for _batch, name in list_checkpoints(folder):
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
