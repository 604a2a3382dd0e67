"""Helpers shared by the data tests (small corpora, reading shards back, comparing trees)."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import numpy as np

from mpt_train.data.tokenizer import SHIPPED_CORPUS

__all__ = ["expected_stream", "read_split", "shipped_texts", "tree_bytes", "write_jsonl"]


def shipped_texts(n: int, offset: int = 0) -> list[str]:
    """The first ``n`` documents of the shipped corpus (after ``offset``)."""
    out = []
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= offset:
                out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text, "meta": 1}) + "\n")
    return path


def read_split(location: str, split: str, cache: Path) -> np.ndarray:
    """Every stored sample of a split, in stored order, as an [N, L] array.

    Reads through streaming with the output as ``remote`` (a local folder works as one), so the
    output folder itself is not modified (a local-only dataset decompresses in place).
    """
    from streaming import StreamingDataset

    ds = StreamingDataset(
        remote=location,
        local=str(cache / uuid.uuid4().hex),
        split=split,
        shuffle=False,
        batch_size=1,
    )
    rows = [ds[i]["tokens"] for i in range(ds.num_samples)]
    del ds
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.uint16)


def expected_stream(tokenizer, texts: list[str]) -> list[int]:
    """Reference concatenation: each document tokenized alone, followed by EOS."""
    out: list[int] = []
    for text in texts:
        out += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
