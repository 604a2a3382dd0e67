"""A StreamingDataset over tokenized MDS shards that yields fixed-length ``input_ids``.

Subclassing ``streaming.StreamingDataset`` (rather than wrapping it) keeps everything Composer
relies on: deterministic sharding across ranks and workers, ``state_dict(num_samples,
from_beginning)`` / ``load_state_dict`` for mid-epoch resumption, shuffling, mixtures of streams
and the local shard cache. What this class adds:

* samples become ``{"input_ids": LongTensor[max_seq_len]}``, truncating longer stored samples
  (a corpus converted at 2048 tokens trains at 1024) and refusing shorter ones;
* ``sequence_id`` for packed documents when asked, derived from EOS positions as llm-foundry's
  ``ConcatenatedSequenceCollatorWrapper`` does (the EOS belongs to the document it ends);
* shard hashes checked by default where the index records them (see
  :meth:`StreamingTextDataset._skip_unrecorded_hashes`), as streaming downloads or
  decompresses a shard: what is then read in place (uncompressed shards in a local-only
  folder, the decompressed copy kept beside a local ``.zstd`` shard) is not hashed again;
* token ids checked against the model's vocabulary (``vocab_size``), so that a corrupt shard
  is named instead of reaching the embedding;
* errors that say which file is at fault: streaming reports a failed shard download or a
  corrupt zstd frame from a background thread as "Background thread failed. Check other
  traceback.", and an unreachable index as a bare botocore error; here both name the shard or
  index path/URL (:class:`DataReadError`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState

from mpt_train.errors import RunFailure

__all__ = ["DataReadError", "StreamingTextDataset", "check_local_shards", "sequence_ids"]

log = logging.getLogger(__name__)


class DataReadError(RunFailure):
    """A shard or index could not be read; the message names its path or URL."""


def sequence_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the document each token belongs to, counting EOS as the end of its document.

    ``[a, b, EOS, c, EOS, d] -> [0, 0, 0, 1, 1, 2]``; works on ``[S]`` or ``[B, S]``.
    """
    is_eos = (input_ids == eos_token_id).to(torch.long)
    cumulative = torch.cumsum(is_eos, dim=-1)
    return cumulative - is_eos


def _file_location(remote: str | None, local: str | None, split: str | None, name: str) -> str:
    """URL of a dataset file when there is a remote, else its local path."""
    parts = [p for p in (split, name) if p]
    if remote:
        return "/".join([remote.rstrip("/"), *parts])
    return os.path.join(local or "", *parts)


def _local_folders(kwargs: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(local folder, split) of every stream that has its index on this machine."""
    streams = kwargs.get("streams") or []
    pairs = [(s.local, s.split or kwargs.get("split")) for s in streams] or [
        (kwargs.get("local"), kwargs.get("split"))
    ]
    return [
        (lo, sp)
        for lo, sp in pairs
        if lo and os.path.isfile(_file_location(None, lo, sp, "index.json"))
    ]


def _header_problem(path: str, samples: int, size: int) -> str | None:
    """Why an MDS shard file's header or size is not what its index says, or None.

    An MDS shard starts with its sample count and ``samples + 1`` sample offsets, the last of
    which is the file's size: reading them costs a few bytes and finds truncation and most
    header damage before a sample read fails with an index error.
    """
    actual = os.path.getsize(path)
    if actual != size:
        return f"{actual} bytes, its index says {size}"
    with open(path, "rb") as f:
        head = f.read(4 * (samples + 2))
    if len(head) < 4 * (samples + 2):
        return "shorter than its header"
    count = int.from_bytes(head[:4], "little")
    offsets = np.frombuffer(head[4:], np.uint32).astype(np.int64)
    # After the offsets comes the shard's JSON config, then the samples, to the end of the file.
    ordered = offsets[0] >= len(head) and bool((np.diff(offsets) >= 0).all())
    if count != samples or offsets[-1] != size or not ordered:
        return f"damaged header (sample count {count}, index says {samples})"
    return None


def check_local_shards(local: str, split: str | None) -> None:
    """Check the shard files present in a local dataset folder against its index.

    A damaged decompressed copy of a compressed shard is removed (streaming then rebuilds it
    from the compressed shard, whose hash it checks); a damaged shard with no compressed
    original is a :class:`DataReadError` naming the file.
    """
    index = _file_location(None, local, split, "index.json")
    try:
        shards = json.loads(Path(index).read_text(encoding="utf-8"))["shards"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataReadError(f"cannot read dataset index {index}: {exc}") from None
    for shard in shards:
        raw, zipped = shard.get("raw_data") or {}, shard.get("zip_data")
        path = _file_location(None, local, split, raw.get("basename", ""))
        if shard.get("format") != "mds" or not os.path.isfile(path):
            continue
        problem = _header_problem(path, int(shard["samples"]), int(raw["bytes"]))
        if problem is None:
            continue
        original = zipped and _file_location(None, local, split, zipped["basename"])
        if original and os.path.isfile(original):
            log.warning(
                "decompressed shard %s is damaged (%s); removed it: it is rebuilt from %s",
                path,
                problem,
                original,
            )
            os.remove(path)
            continue
        raise DataReadError(f"shard {path} is damaged: {problem}")


class StreamingTextDataset(StreamingDataset):
    """Token samples from MDS shards (column ``tokens``) as ``input_ids`` of ``max_seq_len``.

    Args:
        max_seq_len: Tokens per sample returned.
        emit_sequence_id: Also return ``sequence_id`` (needs ``eos_token_id``).
        eos_token_id: The document separator the shards were written with.
        token_column: MDS column holding the token ids.
        vocab_size: Token ids must be below it (``None``: not checked).
        **kwargs: ``streaming.StreamingDataset`` arguments (``streams``, ``remote``, ``local``,
            ``split``, ``shuffle``, ``batch_size``, ``epoch_size``, ...).

    Raises:
        DataReadError: an index cannot be read (names the index URL/path and the retries).
    """

    def __init__(
        self,
        *,
        max_seq_len: int,
        emit_sequence_id: bool = False,
        eos_token_id: int | None = None,
        token_column: str = "tokens",
        vocab_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if emit_sequence_id and eos_token_id is None:
            raise ValueError("emit_sequence_id needs eos_token_id")
        self.max_seq_len = max_seq_len
        self.emit_sequence_id = emit_sequence_id
        self.eos_token_id = eos_token_id
        self.token_column = token_column
        self.vocab_size = vocab_size
        self._shard_failure: DataReadError | None = None
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # before streaming lists the cache
            for local, split in _local_folders(kwargs):
                check_local_shards(local, split)
        try:
            super().__init__(**kwargs)
        except Exception as exc:
            raise self._index_error(kwargs, exc) from exc
        self._skip_unrecorded_hashes()

    def _skip_unrecorded_hashes(self) -> None:
        """Validate only streams whose index records the hash; warn for the others.

        zstd without a content checksum decompresses a corrupted shard into plausible garbage
        silently, so hashing (xxh3_64: GB/s, once per shard) is on by default; datasets
        written by other tools may lack the hash and streaming would then refuse them.
        """
        for stream_id, stream in enumerate(self.streams):
            algo = stream.validate_hash
            if not algo:
                continue
            for shard_id in np.flatnonzero(self.stream_per_shard == stream_id):
                raw, zipped = self.shards[shard_id].file_pairs[0]
                if algo not in (zipped or raw).hashes:
                    log.warning(
                        "stream %s records no %s hashes; its shards will not be validated",
                        stream.remote or stream.local,
                        algo,
                    )
                    stream.validate_hash = None
                    break

    @staticmethod
    def _index_error(kwargs: dict[str, Any], exc: Exception) -> Exception:
        """Name the first remote stream whose index did not arrive in its local cache."""
        if kwargs.get("streams"):
            triples = [
                (s.remote, s.local, s.split or kwargs.get("split")) for s in kwargs["streams"]
            ]
        else:
            triples = [(kwargs.get("remote"), kwargs.get("local"), kwargs.get("split"))]
        retries = kwargs.get("download_retry", 3) - 1  # streaming's count is of attempts
        for remote, local, split in triples:
            if not remote:
                continue
            if local and os.path.exists(_file_location(None, local, split, "index.json")):
                continue
            return DataReadError(
                f"cannot read dataset index {_file_location(remote, None, split, 'index.json')} "
                f"(gave up after {retries} retries): {type(exc).__name__}: {exc}"
            )
        return exc

    def _shard_location(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw, zipped = self.shards[shard_id].file_pairs[0]
        name = (zipped or raw).basename
        local = _file_location(None, stream.local, stream.split, name)
        if stream.remote:
            return f"{_file_location(stream.remote, None, stream.split, name)} (cached at {local})"
        return local

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's shard download/decompression, re-raised with the shard's path or URL."""
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as exc:
            # Streaming leaves a failed shard in PREPARING, so a sample read waiting on it
            # (blocking=True) would wait forever; REMOTE makes the waiter retry and fail too.
            self._shard_states[shard_id] = _ShardState.REMOTE
            err = DataReadError(
                f"cannot read shard {self._shard_location(shard_id)}: {type(exc).__name__}: {exc}"
            )
            self._shard_failure = err
            raise err from exc

    def on_exception(self, future: Future) -> None:
        """Streaming's hook for a failed background thread, without its re-raise.

        Raising inside a future's callback reaches no caller: ``concurrent.futures`` only logs
        it as an ERROR with two tracebacks, printed before the one-line error that
        :meth:`__iter__` raises for the same shard. A shard failure is left to that error;
        anything else is logged here once, with its traceback.
        """
        if future.cancelled() or (exc := future.exception()) is None:
            return
        self._event.set()  # as streaming: the other threads and the sample loop stop
        if isinstance(exc, DataReadError) and self._shard_failure is not None:
            log.debug("background shard preparation stopped: %s", exc)
        else:
            log.error("a background shard thread failed", exc_info=exc)

    def _prepare_thread(self, it: Any) -> None:
        """Streaming's download thread, counted as exited even when a shard fails.

        Streaming 0.13 only marks the thread exited at the end of its loop; an exception skips
        that, and the next ``exit()`` (a new epoch, or closing the failed one) waits forever.
        """
        try:
            super()._prepare_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def _ready_thread(self, it: Any) -> None:
        """As :meth:`_prepare_thread`, for the thread that waits for shards to be ready."""
        try:
            super()._ready_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Streaming's iteration, but a failed background download is an error, not an end.

        When the download thread fails, streaming 0.13 sets an event that makes the sample
        loop stop early: the epoch ends silently short. Here the shard's error is raised.
        """
        try:
            yield from super().__iter__()
        except RuntimeError as exc:
            if self._shard_failure is not None and not isinstance(exc, DataReadError):
                raise self._shard_failure from exc
            raise
        if self._shard_failure is not None:
            raise self._shard_failure
        event = getattr(self, "_event", None)
        if event is not None and event.is_set():
            raise DataReadError("a background shard download failed; see the log above")

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        try:
            sample = super().__getitem__(idx)
        except (IndexError, ValueError, OSError, struct.error) as exc:
            shard_id, _ = self.spanner[idx]
            raise DataReadError(
                f"cannot read sample {idx} from shard {self._shard_location(shard_id)}: damaged "
                f"shard ({type(exc).__name__}: {exc})"
            ) from None
        tokens = sample[self.token_column]
        if not isinstance(tokens, np.ndarray):
            raise DataReadError(
                f"sample {idx}: column {self.token_column!r} is {type(tokens).__name__}, "
                "expected an ndarray of token ids (convert with mpt-convert)"
            )
        if tokens.size < self.max_seq_len:
            raise ValueError(
                f"sample {idx} has {tokens.size} tokens, fewer than max_seq_len="
                f"{self.max_seq_len}; convert with --concat-tokens >= max_seq_len"
            )
        tokens = tokens[: self.max_seq_len]
        if self.vocab_size is not None and int(tokens.max()) >= self.vocab_size:
            shard_id, _ = self.spanner[idx]
            raise DataReadError(
                f"sample {idx} of shard {self._shard_location(shard_id)} holds token id "
                f"{int(tokens.max())}, past the model's vocab_size {self.vocab_size}: a corrupt "
                "shard, or data tokenized for another vocabulary"
            )
        input_ids = torch.from_numpy(tokens.astype(np.int64))
        item = {"input_ids": input_ids}
        if self.emit_sequence_id:
            assert self.eos_token_id is not None
            item["sequence_id"] = sequence_ids(input_ids, self.eos_token_id)
        return item
