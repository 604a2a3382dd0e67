"""Small files (settings, done-markers, merged indexes, stats) in a local folder or object store.

The converter's shards go through streaming's ``MDSWriter``; everything else it writes is a
small JSON object that decides resumption (what is finished) and publication (the split index
appears last). :class:`OutputDir` gives those files one interface whatever the output is, using
streaming's own uploaders and downloaders so every scheme streaming supports (``s3://``,
``gs://``, ``oci://``, ``azure://``, ...) works here too. Local writes are atomic (temp file and
rename) so a crash never leaves a half-written marker that looks valid.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

__all__ = ["OutputDir", "OutputNotWritableError", "is_not_found", "is_remote"]

log = logging.getLogger(__name__)


class OutputNotWritableError(OSError):
    """The output location refused a probe write; raised before any tokenizing starts."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is an object-store URL (has a scheme other than ``file``)."""
    scheme = urllib.parse.urlparse(path).scheme
    return bool(scheme) and scheme != "file" and len(scheme) > 1  # 1 char: Windows drive


def is_not_found(exc: BaseException) -> bool:
    """Whether a downloader exception means "no such object" rather than a failure."""
    if isinstance(exc, FileNotFoundError):
        return True
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        return code in {"404", "NoSuchKey", "NotFound"}
    return False


class OutputDir:
    """Read and write small files under a local folder or a remote prefix.

    Args:
        root: Local folder or URL such as ``s3://bucket/prefix``.
        download_timeout: Seconds allowed to fetch one small file.
    """

    def __init__(self, root: str, download_timeout: float = 60.0) -> None:
        self.root = root.rstrip("/")
        self.remote = is_remote(root)
        self.download_timeout = download_timeout
        self._uploader: Any = None
        self._stage: str | None = None

    def join(self, *parts: str) -> str:
        """Location of ``parts`` under the root (a URL for remote outputs, else a path)."""
        if self.remote:
            return "/".join([self.root, *(p.strip("/") for p in parts)])
        return os.path.join(self.root, *parts)

    def _get_uploader(self) -> Any:
        if self._uploader is None:
            from streaming.base.storage import CloudUploader

            stage = tempfile.mkdtemp(prefix="mpt-train-upload-")
            try:
                self._uploader = CloudUploader.get(out=(stage, self.root), keep_local=False)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)  # each failed attempt made its own
                raise
            self._stage = stage
        return self._uploader

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write (atomically, for local roots) or upload ``data`` to ``relpath``."""
        if not self.remote:
            path = Path(self.join(relpath))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        uploader = self._get_uploader()
        assert self._stage is not None
        staged = Path(self._stage, relpath)
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(data)
        uploader.upload_file(relpath)

    def read_bytes(self, relpath: str) -> bytes | None:
        """Content of ``relpath``, or ``None`` when it does not exist (other errors raise)."""
        if not self.remote:
            path = Path(self.join(relpath))
            return path.read_bytes() if path.is_file() else None
        from streaming.base.storage import CloudDownloader

        with tempfile.TemporaryDirectory(prefix="mpt-train-fetch-") as tmp:
            local = os.path.join(tmp, "file")
            downloader = CloudDownloader.get(self.root)
            try:
                downloader.download(self.join(relpath), local, self.download_timeout)
            except Exception as exc:
                if is_not_found(exc):
                    return None
                raise
            finally:
                downloader.clean_up()
            return Path(local).read_bytes()

    def remove_local_tree(self, relpath: str) -> None:
        """Delete a local sub-folder (remote objects are overwritten in place instead)."""
        if not self.remote:
            shutil.rmtree(self.join(relpath), ignore_errors=True)

    def is_nonempty(self) -> bool:
        """Whether the root already holds anything: entries of a local folder, or objects under
        a remote prefix (``s3://b/data`` looks under ``data/``, not at ``data-old/``). Folder
        markers (keys ending in ``/``, which bucket consoles create) do not count.

        Streaming lists ``s3://``, ``gs://`` and ``oci://`` prefixes. Elsewhere (Azure, DBFS,
        the Hugging Face hub) or when listing fails, this answers False with a warning.
        """
        if not self.remote:
            return os.path.isdir(self.root) and bool(os.listdir(self.root))
        try:
            keys = self._get_uploader().list_objects() or []
            return any(not key.endswith("/") for key in keys)
        except Exception as exc:  # not being able to look is not an error here
            log.warning(
                "cannot list %s to check that it is empty (%s: %s); writing into it",
                self.root, type(exc).__name__, exc,
            )  # fmt: skip
            return False

    def probe(self, relpath: str, data: bytes) -> None:
        """Write ``data`` to ``relpath`` or raise :class:`OutputNotWritableError` naming the root.

        Done before tokenizing so an unwritable bucket or a typo in the URL costs seconds,
        not the time to tokenize a corpus.
        """
        try:
            self.write_bytes(relpath, data)
        except Exception as exc:
            raise OutputNotWritableError(
                f"cannot write to output {self.root!r} ({type(exc).__name__}: {exc})"
            ) from exc

    def close(self) -> None:
        """Remove the local staging folder of remote uploads."""
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None
        self._uploader = None
