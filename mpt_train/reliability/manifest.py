"""Checkpoint manifests: the completion marker and checksums of one checkpoint.

Composer writes a checkpoint file (or, sharded, a folder of ``__{rank}_0.distcp`` files and a
``.metadata``) and then moves its ``latest-rank0.pt`` symlink, with nothing that tells a
finished checkpoint from one cut short by a crash, and nothing that notices a truncated or
bit-rotted file until unpickling fails (or, worse, succeeds with garbage). A manifest is written
next to the checkpoint, atomically (temporary file, fsync, rename), only after every rank has
finished writing: its presence means "complete", its sizes and xxh3-128 checksums mean "intact".
xxh3 runs at memory bandwidth, so hashing costs far less than writing; it guards against
accidents, not against an attacker who can rewrite both files (see ``trust.py`` for that).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from mpt_train.errors import RunFailure

__all__ = [
    "MANIFEST_SUFFIX",
    "CheckpointCorruptError",
    "Manifest",
    "damage_of",
    "file_digest",
    "manifest_path",
    "owner_of",
    "read_manifest",
    "verify_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 << 20
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")


class CheckpointCorruptError(RunFailure):
    """A checkpoint does not match its manifest; the message names the file and the mismatch."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"corrupt checkpoint {self.path}: {problem}")


@dataclass
class Manifest:
    """What was written: ``files`` maps paths relative to the save folder to size and hash."""

    checkpoint: str
    batch: int
    run_name: str
    files: dict[str, dict[str, Any]]
    written_at: float
    version: int = FORMAT_VERSION
    #: The resolved, redacted run spec that wrote the checkpoint (None: written before specs
    #: were recorded), so a resume can compare specs without unpickling the checkpoint.
    spec: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)


def manifest_path(folder: str | os.PathLike, checkpoint: str) -> Path:
    """``<folder>/<checkpoint>.manifest.json``: a sidecar, so rotation and listing stay simple."""
    return Path(folder) / f"{checkpoint}{MANIFEST_SUFFIX}"


def file_digest(path: str | os.PathLike) -> str:
    """xxh3-128 of a file's bytes, hex."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_written_by(unit: Path, rank: int) -> list[Path]:
    """The files of one checkpoint ``unit`` (a file, or a sharded folder) this rank wrote.

    Each rank hashes its own shards, so hashing a 100 GB sharded checkpoint is spread over all
    ranks instead of serialising on rank 0; rank 0 also takes the shared ``.metadata``.
    """
    if unit.is_file():
        return [unit] if rank == 0 else []
    out = []
    for p in sorted(unit.rglob("*")):
        if not p.is_file():
            continue
        m = _SHARD.match(p.name)
        owner = int(m.group(1)) if m else 0
        if owner == rank:
            out.append(p)
    return out


def describe_files(paths: list[Path], folder: Path, checksums: bool = True) -> dict[str, Any]:
    """``{relative path: {"size": n, "xxh3_128": hex}}`` for files under ``folder``."""
    out: dict[str, Any] = {}
    for p in paths:
        entry: dict[str, Any] = {"size": p.stat().st_size}
        if checksums:
            entry["xxh3_128"] = file_digest(p)
        out[p.relative_to(folder).as_posix()] = entry
    return out


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write atomically: a crash leaves either no manifest or a whole one, never half of one."""
    final = manifest_path(folder, manifest.checkpoint)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def new_manifest(
    checkpoint: str,
    batch: int,
    run_name: str,
    files: dict[str, Any],
    spec: dict[str, Any] | None = None,
) -> Manifest:
    return Manifest(
        checkpoint=checkpoint,
        batch=batch,
        run_name=run_name,
        files=files,
        written_at=time.time(),
        spec=spec,
    )


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse a manifest; an unreadable one is reported as corruption of that path."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return Manifest(**data)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointCorruptError(path, f"unreadable manifest ({e})") from None


def owner_of(rel: str, world_size: int) -> int:
    """The rank that verifies a manifest entry: a shard's writer (modulo the world size, for a
    resume on fewer ranks), rank 0 for everything else."""
    m = _SHARD.match(Path(rel).name)
    return int(m.group(1)) % world_size if m else 0


def verify_manifest(
    folder: str | os.PathLike,
    manifest: Manifest,
    checksums: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Raise :class:`CheckpointCorruptError` naming the first file that is missing, has the
    wrong size or the wrong checksum; sizes first, so truncation is found without hashing.

    With ``world_size`` > 1 only this ``rank``'s share is checked (:func:`owner_of`): every
    rank hashes the shards it wrote, so verifying a 1 TB sharded checkpoint takes as long as
    one rank's part, not the whole on rank 0 while the others wait on a collective's timeout.
    """
    root = Path(folder)
    files = {rel: want for rel, want in manifest.files.items() if owner_of(rel, world_size) == rank}
    for rel, want in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            raise CheckpointCorruptError(p, "missing (listed in its manifest)")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointCorruptError(p, f"size {size} bytes, manifest says {want['size']}")
    if not checksums:
        return
    for rel, want in sorted(files.items()):
        if "xxh3_128" not in want:
            continue
        got = file_digest(root / rel)
        if got != want["xxh3_128"]:
            raise CheckpointCorruptError(
                root / rel, f"xxh3_128 {got} does not match the manifest's {want['xxh3_128']}"
            )


def damage_of(path: str | os.PathLike) -> str | None:
    """Why a one-file checkpoint is not one (empty, truncated, not a torch archive), naming what
    its manifest expected where one sits beside it; None when it looks like a checkpoint.

    Composer writes torch's zip format, whose directory is at the end of the file: a file cut
    short or overwritten has none (a bare pickle, torch's legacy format, is left to the loaders
    and their trust checks). Checked before unpickling, so a damaged file is reported as
    damaged, not as untrusted code or a pickle error.
    """
    import zipfile

    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        what = "an empty file (0 bytes)"
    elif zipfile.is_zipfile(p):
        return None
    else:
        with open(p, "rb") as f:
            if f.read(1) == b"\x80":  # a bare pickle (torch's legacy format): the loaders judge
                return None
        what = f"not a checkpoint ({size} bytes, no PyTorch archive: cut short or overwritten)"
    m = manifest_path(p.parent, p.name)
    if m.is_file():
        try:
            entry = read_manifest(m).files.get(p.name) or {}
        except CheckpointCorruptError:
            entry = {}
        if "size" in entry:
            what += f"; its manifest {m.name} expects {entry['size']} bytes"
            if "xxh3_128" in entry:
                what += f" with xxh3_128 {entry['xxh3_128']}"
    return what


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("fsync of directory %s not supported", path)
    finally:
        os.close(fd)
