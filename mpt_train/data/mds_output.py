"""The on-storage shape of a conversion: per-part shard writers, done-markers, publication.

A conversion is written in parts (units of resumable work). Each split of a part gets its own
MDSWriter folder (``train/part-00000/``); a part is finished when its done-marker
(``_parts/part-00000.json``) exists, holding the part's shard entries, counts and the tokens
carried over to the next part. Publication merges the markers into one MDS ``index.json`` per
split (shard basenames prefixed with the part folder, as ``streaming``'s ``merge_index`` does)
and then ``stats.json``: a split becomes readable only once every part is done.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mpt_train.data.storage import OutputDir

__all__ = [
    "INDEX_FILE",
    "PARTS_DIR",
    "STATS_FILE",
    "ConvertStats",
    "PartWriter",
    "SplitStats",
    "load_markers",
    "marker_path",
    "part_name",
    "publish",
]

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
INDEX_FILE = "index.json"
PARTS_DIR = "_parts"


def part_name(part: int) -> str:
    """Folder name of a part inside a split (``part-00003``)."""
    return f"part-{part:05d}"


def marker_path(part: int) -> str:
    """Relative path of a part's done-marker."""
    return f"{PARTS_DIR}/{part_name(part)}.json"


@dataclass
class SplitStats:
    """Counts for one split; ``tokens`` are stored tokens (``samples * concat_tokens``)."""

    documents: int = 0
    input_tokens: int = 0  # tokens of the documents plus separators
    tokens: int = 0
    samples: int = 0
    shards: int = 0
    bytes: int = 0  # bytes of the stored (compressed) shard files
    dropped_tokens: int = 0  # the final remainder shorter than one sample


@dataclass
class ConvertStats:
    """What ``stats.json`` holds."""

    splits: dict[str, SplitStats]
    records_read: int
    skipped_records: int
    empty_documents: int
    parts: int
    concat_tokens: int
    tokenizer: str
    vocab_size: int
    token_dtype: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ConvertStats:
        data = json.loads(text)
        data["splits"] = {k: SplitStats(**v) for k, v in data["splits"].items()}
        return cls(**data)


class PartWriter:
    """Lazily opened MDSWriter for one split of one part (no shards when nothing is written)."""

    def __init__(
        self, out: OutputDir, relpath: str, columns: dict[str, str], **writer_kwargs: Any
    ) -> None:
        self.out, self.relpath, self.columns = out, relpath, columns
        self.writer_kwargs = writer_kwargs  # compression, hashes, size_limit
        self._writer: Any = None
        self.samples = 0

    def write(self, tokens: np.ndarray) -> None:
        if self._writer is None:
            from streaming import MDSWriter

            if self.out.remote:
                target: Any = (
                    tempfile.mkdtemp(prefix="mpt-train-shards-"),
                    self.out.join(self.relpath),
                )
            else:
                self.out.remove_local_tree(self.relpath)  # leftovers of an interrupted run
                target = self.out.join(self.relpath)
            self._writer = MDSWriter(out=target, columns=self.columns, **self.writer_kwargs)
        self._writer.write({"tokens": tokens})
        self.samples += 1

    def finish(self) -> list[dict[str, Any]]:
        """Flush, upload, and return the shard entries of this part's index."""
        if self._writer is None:
            self.out.remove_local_tree(self.relpath)  # leftovers of an interrupted run
            return []
        self._writer.finish()
        return list(self._writer.shards)


def load_markers(out: OutputDir) -> list[dict[str, Any]]:
    """Done-markers of finished parts, in order (stops at the first missing one)."""
    markers = []
    while (raw := out.read_bytes(f"{marker_path(len(markers))}")) is not None:
        markers.append(json.loads(raw))
    return markers


def _shard_bytes(shard: dict[str, Any]) -> int:
    return int((shard.get("zip_data") or shard["raw_data"])["bytes"])


def publish(
    out: OutputDir, splits: list[str], markers: list[dict[str, Any]], meta: dict[str, Any]
) -> ConvertStats:
    """Write each split's merged index (the point where a split becomes readable), then stats."""
    concat_tokens = int(meta["concat_tokens"])
    per_split = {s: SplitStats() for s in splits}
    for split, stats in per_split.items():
        shards: list[dict[str, Any]] = []
        for m in markers:
            entry = m["splits"][split]
            for shard in entry["shards"]:
                shard = json.loads(json.dumps(shard))  # deep copy
                for key in ("raw_data", "zip_data"):
                    if shard.get(key):
                        shard[key]["basename"] = f"{part_name(m['part'])}/{shard[key]['basename']}"
                shards.append(shard)
            stats.documents += entry["documents"]
            stats.input_tokens += entry["input_tokens"]
            stats.samples += entry["samples"]
        stats.tokens = stats.samples * concat_tokens
        stats.shards = len(shards)
        stats.bytes = sum(_shard_bytes(s) for s in shards)
        stats.dropped_tokens = len(markers[-1]["splits"][split]["carry"]) if markers else 0
        if not shards:
            log.warning("split %s received no complete sample", split)
        index = json.dumps({"version": 2, "shards": shards}, sort_keys=True)
        out.write_bytes(f"{split}/{INDEX_FILE}", index.encode())
    result = ConvertStats(
        splits=per_split,
        records_read=sum(m["records"] for m in markers),
        skipped_records=sum(m["skipped_records"] for m in markers),
        empty_documents=sum(m["empty_documents"] for m in markers),
        parts=len(markers),
        **meta,
    )
    out.write_bytes(STATS_FILE, result.to_json().encode())
    return result
