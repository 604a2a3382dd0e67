"""Concatenate-and-chunk: turn a stream of tokenized documents into fixed-length samples.

MPT was pretrained on samples of exactly ``max_seq_len`` tokens cut from the concatenation of
documents, each followed by EOS (and preceded by BOS for tokenizers that have a distinct one),
so no compute is spent on padding. Every token is kept: a document that straddles a chunk
boundary continues in the next sample, and the carry-over survives resumable work units (it is
saved in each unit's done-marker). Only the final remainder, shorter than one sample, is
dropped, and its size is reported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mpt_train.data.tokenizer import Separators

__all__ = ["TokenPacker"]


class TokenPacker:
    """Accumulate documents' tokens and emit ``chunk_len``-token samples in order.

    Args:
        chunk_len: Tokens per emitted sample (``--concat-tokens``).
        separators: Token ids placed around each document.
        dtype: Storage dtype of the emitted samples (see ``token_dtype``).
        carry: Tokens left over from a previous unit of work (resumption).
    """

    def __init__(
        self,
        chunk_len: int,
        separators: Separators,
        dtype: np.dtype,
        carry: Sequence[int] = (),
    ) -> None:
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        self.chunk_len = chunk_len
        self.dtype = np.dtype(dtype)
        self._bos = np.asarray(separators.bos, dtype=self.dtype)
        self._eos = np.asarray(separators.eos, dtype=self.dtype)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.documents = 0
        self.input_tokens = 0  # tokens pushed, separators included (carry excluded)
        if len(carry):
            self._push(np.asarray(carry, dtype=self.dtype))

    def _push(self, arr: np.ndarray) -> None:
        if arr.size:
            self._pending.append(arr)
            self._pending_len += arr.size

    def add(self, tokens: np.ndarray | Sequence[int]) -> Iterator[np.ndarray]:
        """Add one document (without separators) and yield every sample it completes."""
        arr = np.asarray(tokens)
        if arr.size and int(arr.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(arr.max())} does not fit {self.dtype}")
        self.documents += 1
        for part in (self._bos, arr.astype(self.dtype, copy=False), self._eos):
            self._push(part)
            self.input_tokens += part.size
        if self._pending_len < self.chunk_len:
            return
        flat = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n_full = flat.size // self.chunk_len
        for i in range(n_full):
            yield flat[i * self.chunk_len : (i + 1) * self.chunk_len]
        rest = flat[n_full * self.chunk_len :]
        self._pending = [rest.copy()] if rest.size else []
        self._pending_len = rest.size

    @property
    def carry(self) -> np.ndarray:
        """Tokens not yet emitted (fewer than ``chunk_len``)."""
        if not self._pending:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate(self._pending)
