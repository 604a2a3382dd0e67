"""Tokenize batches of documents on all cores while keeping the input order.

Shards must be byte-identical whatever the worker count, so results are consumed strictly in
submission order (a deque of pending results, oldest first), never as they complete. The
number of batches in flight is bounded, so reading a corpus larger than memory stays bounded
too (``Pool.imap`` would read the whole input ahead). Each worker loads its own tokenizer
after the fork: a Rust tokenizer that was used before ``fork`` can deadlock in the child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.pool import AsyncResult, Pool
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from mpt_train.data.tokenizer import disable_tokenizer_threads, load_tokenizer

__all__ = ["ParallelEncoder", "default_workers", "encode_batch"]

log = logging.getLogger(__name__)

Tag = TypeVar("Tag")

_worker_tokenizer: PreTrainedTokenizerBase | None = None


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text without special tokens (separators are added by the packer).

    Fast tokenizers are called through their Rust backend directly: the same call
    ``tokenizer(texts, add_special_tokens=False)`` makes, minus the Python dict building.
    """
    if tokenizer.is_fast:
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(x, dtype=np.uint32) for x in ids]


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    disable_tokenizer_threads()
    _worker_tokenizer = load_tokenizer(tokenizer_name)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None, "worker not initialised"
    return encode_batch(_worker_tokenizer, texts)


def _mp_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class ParallelEncoder:
    """Ordered, bounded multi-process tokenization (in-process when ``workers <= 1``).

    Args:
        tokenizer_name: Name or path given to :func:`load_tokenizer` in each worker.
        workers: Worker processes; ``<= 1`` tokenizes in the calling process.
        max_inflight: Batches submitted but not yet consumed (default ``4 * workers``).
    """

    def __init__(self, tokenizer_name: str, workers: int, max_inflight: int | None = None) -> None:
        self.tokenizer_name = tokenizer_name
        self.workers = max(1, workers)
        self.max_inflight = max_inflight or 4 * self.workers
        self._pool: Pool | None = None
        self._local: PreTrainedTokenizerBase | None = None

    def __enter__(self) -> ParallelEncoder:
        if self.workers > 1:
            self._pool = _mp_context().Pool(
                self.workers, initializer=_init_worker, initargs=(self.tokenizer_name,)
            )
        else:
            self._local = load_tokenizer(self.tokenizer_name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(
        self, batches: Iterable[tuple[Tag, list[str]]]
    ) -> Iterator[tuple[Tag, list[np.ndarray]]]:
        """Yield ``(tag, token arrays)`` for each ``(tag, texts)`` batch, in input order."""
        if self._pool is None:
            if self._local is None:
                raise RuntimeError("use ParallelEncoder as a context manager")
            for tag, texts in batches:
                yield tag, encode_batch(self._local, texts)
            return
        pending: deque[tuple[Any, AsyncResult[list[np.ndarray]]]] = deque()
        for tag, texts in batches:
            pending.append((tag, self._pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= self.max_inflight:
                done_tag, result = pending.popleft()
                yield done_tag, result.get()
        while pending:
            done_tag, result = pending.popleft()
            yield done_tag, result.get()


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
