"""Tokenizer loading and the token facts the data pipeline needs (separators, storage dtype).

Conversion and training must agree on the tokenizer, its document separators and the width of
the stored token ids, so those facts are computed here once: :func:`separator_ids` decides what
goes between concatenated documents (EOS, plus BOS when the tokenizer has a distinct one, as
MPT/llm-foundry do) and :func:`token_dtype` picks the narrowest unsigned integer type that holds
every id (uint16 for GPT-NeoX's 50k vocabulary halves the bytes of int32 shards).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mpt_train.errors import ConfigError
from mpt_train.hub import check_hub_name

__all__ = [
    "SHIPPED_CORPUS",
    "SHIPPED_TOKENIZER",
    "SHIPPED_TOKENIZER_NAME",
    "Separators",
    "disable_tokenizer_threads",
    "load_tokenizer",
    "separator_ids",
    "token_dtype",
]

log = logging.getLogger(__name__)

_ASSETS = Path(__file__).resolve().parent.parent / "assets"

#: Local path of the shipped byte-level BPE (8192 ids, ``<|endoftext|>`` = 0 is BOS/EOS/UNK).
SHIPPED_TOKENIZER: str = str(_ASSETS / "tiny-bpe")
#: Name that resolves to :data:`SHIPPED_TOKENIZER` wherever a tokenizer name is accepted.
SHIPPED_TOKENIZER_NAME = "mpt-train/tiny-bpe"
#: Shipped English corpus (CPython docstrings and reference topics, PSF License) as JSONL.gz.
SHIPPED_CORPUS: str = str(_ASSETS / "corpus" / "stdlib_docs.jsonl.gz")


def load_tokenizer(name_or_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer by hub name or local path.

    ``"mpt-train/tiny-bpe"`` (or :data:`SHIPPED_TOKENIZER`) gives the shipped tokenizer without
    any network access; anything else goes to ``AutoTokenizer.from_pretrained`` (for example
    ``"EleutherAI/gpt-neox-20b"``, the MPT default). ``model_max_length`` is lifted so that
    tokenizing long documents for concatenation does not warn: chunking happens afterwards.
    ``kwargs`` (the spec's ``tokenizer.kwargs``) go to ``from_pretrained``.

    Raises:
        ConfigError: on ``name`` when it cannot be loaded (offline without a cached copy, a
            wrong name or path), in one line instead of Hugging Face's traceback.
        ValueError: if the tokenizer has no EOS token (documents could not be separated).
    """
    path = SHIPPED_TOKENIZER if name_or_path == SHIPPED_TOKENIZER_NAME else name_or_path
    check_hub_name(path, "name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            "name",
            f"cannot load tokenizer {name_or_path!r}: {reason} (a Hugging Face hub name needs "
            "the network or a cached copy under HF_HOME; or give a local folder)",
        ) from err
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no EOS token; documents cannot be separated"
        )
    tokenizer.model_max_length = int(1e30)
    return tokenizer


@dataclass(frozen=True)
class Separators:
    """Token ids placed around every document when documents are concatenated.

    Attributes:
        bos: Ids put before each document (empty unless the tokenizer has a BOS distinct
            from its EOS, e.g. Llama; GPT-NeoX and the shipped tokenizer have BOS == EOS).
        eos: Ids put after each document (the EOS id).
    """

    bos: tuple[int, ...]
    eos: tuple[int, ...]


def separator_ids(tokenizer: PreTrainedTokenizerBase) -> Separators:
    """EOS after every document, BOS before it only where BOS is a different token.

    A tokenizer whose BOS equals its EOS (GPT-NeoX) would otherwise put two identical
    separators between documents; MPT's data used a single ``<|endoftext|>``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token")
    bos = tokenizer.bos_token_id
    bos_ids = (int(bos),) if bos is not None and bos != eos else ()
    return Separators(bos=bos_ids, eos=(int(eos),))


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest of uint16/uint32/uint64 that holds ids ``0 .. vocab_size - 1``.

    uint8 is not offered: no real tokenizer fits it and one dtype for small vocabularies keeps
    shards of the shipped tokenizer and GPT-NeoX alike.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for dtype in (np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def disable_tokenizer_threads() -> None:
    """Stop the Rust tokenizer from spawning its own thread pool (we parallelise by process)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
