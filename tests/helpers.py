"""Shared test helpers: the repo root and a small MDS dataset made from the shipped corpus."""

from __future__ import annotations

from pathlib import Path

from mpt_train.data.convert import ConvertOptions, convert_corpus
from mpt_train.data.tokenizer import SHIPPED_CORPUS

REPO = Path(__file__).resolve().parent.parent


def make_mds(out: Path, seq_len: int, max_docs: int = 400, val_fraction: float = 0.1) -> Path:
    """Tokenize the first ``max_docs`` documents of the shipped corpus into ``out/{train,val}``."""
    convert_corpus(
        ConvertOptions(
            inputs=[SHIPPED_CORPUS],
            out=str(out),
            concat_tokens=seq_len,
            val_fraction=val_fraction,
            max_docs=max_docs,
            workers=1,
            progress=False,
        )
    )
    return out
