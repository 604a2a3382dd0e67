"""Convert a text corpus into tokenized, fixed-length MDS shards (``mpt-convert``).

Pretraining reads samples of exactly ``max_seq_len`` tokens, so the corpus is tokenized once,
documents are concatenated with separators and cut into ``--concat-tokens`` chunks
(:mod:`mpt_train.data.packing`), and the chunks are written with streaming's ``MDSWriter``
(column ``tokens``, narrowest unsigned dtype, zstd) into ``OUT/train/`` and ``OUT/val/``,
locally or straight to an object store.

Output layout (``OUT`` is a folder or a URL such as ``s3://bucket/corpus``)::

    convert_settings.json        written first (also the probe that OUT is writable)
    _parts/part-00000.json       done-marker of a unit of work: shards and carried-over tokens
    train/part-00000/shard.*     shards of that unit (its own MDS index too)
    train/index.json             merged index over all parts, published only when all are done
    val/...                      same, when --val-fraction > 0
    stats.json                   documents, tokens, samples, shards, bytes per split; last

Why this shape: a unit of work (``--docs-per-part`` input records) is the granularity of
resumption. Re-running the same command skips units that have a marker and redoes the one
that was cut short; ``train/index.json`` does not exist until everything is done, so a
half-written dataset can never be mistaken for a complete one. Results are consumed in input
order, so shards are byte-identical for any ``--workers``. Documents go to ``val`` when a hash
of their text falls below ``--val-fraction``: stable under reordering and duplicates never
straddle the split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from mpt_train.data.mds_output import (
    INDEX_FILE,
    STATS_FILE,
    ConvertStats,
    PartWriter,
    SplitStats,
    load_markers,
    marker_path,
    part_name,
    publish,
)
from mpt_train.data.packing import TokenPacker
from mpt_train.data.parallel_encode import ParallelEncoder, default_workers
from mpt_train.data.sources import (
    BadRecordError,
    InputSource,
    iter_documents,
    resolve_inputs,
)
from mpt_train.data.storage import OutputDir, OutputNotWritableError
from mpt_train.data.tokenizer import (
    SHIPPED_TOKENIZER_NAME,
    load_tokenizer,
    separator_ids,
    token_dtype,
)

__all__ = [
    "INDEX_FILE",
    "SETTINGS_FILE",
    "STATS_FILE",
    "ConvertError",
    "ConvertOptions",
    "ConvertStats",
    "SplitStats",
    "convert_corpus",
    "split_of",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SETTINGS_FILE = "convert_settings.json"


class ConvertError(RuntimeError):
    """The conversion cannot proceed (e.g. OUT holds a conversion with other settings)."""


@dataclass
class ConvertOptions:
    """Everything that determines a conversion (see ``--help`` of :func:`main`).

    ``workers``, ``progress`` and ``batch_docs`` change speed only, never the output bytes.
    """

    inputs: list[str]
    out: str
    tokenizer: str = SHIPPED_TOKENIZER_NAME
    concat_tokens: int = 2048
    text_field: str = "text"
    val_fraction: float = 0.0
    workers: int = 0  # 0: all cores
    compression: str | None = "zstd"
    hashes: list[str] = field(default_factory=lambda: ["xxh3_64"])
    shard_size_limit: int = 1 << 26
    docs_per_part: int = 100_000
    batch_docs: int = 64
    skip_bad_records: bool = False
    max_docs: int | None = None
    hf_split: str = "train"
    hf_config: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one input")
        if self.concat_tokens < 1:
            raise ValueError(f"concat_tokens must be >= 1, got {self.concat_tokens}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.docs_per_part < 1 or self.batch_docs < 1:
            raise ValueError("docs_per_part and batch_docs must be >= 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs must be >= 1, got {self.max_docs}")

    def settings(self) -> dict[str, Any]:
        """The options that decide the output bytes (compared when resuming)."""
        skip = {"out", "workers", "progress", "batch_docs"}
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        return {"format_version": FORMAT_VERSION, **data}

    @property
    def splits(self) -> list[str]:
        """Output splits: ``train``, plus ``val`` when a validation fraction is asked for."""
        return ["train", "val"] if self.val_fraction > 0 else ["train"]


def split_of(text: str, val_fraction: float) -> str:
    """``"val"`` when the text's hash falls in the first ``val_fraction`` of the hash space."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


@dataclass
class _Batch:
    """A batch of texts of one part, with the records of that part that produced no text."""

    part: int
    splits: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    records: int = 0
    skipped: int = 0
    empty: int = 0


@dataclass
class _Failure:
    """An input error, passed along in order: the parts before ``part`` are complete."""

    part: int
    error: Exception
    texts: list[str] = field(default_factory=list)


def _batches(
    opts: ConvertOptions, sources: list[InputSource], first_part: int
) -> Iterator[_Batch | _Failure]:
    """Group records into batches that never straddle a part; skip parts already done.

    Every part yields at least one batch (possibly without texts) so every part gets a marker.
    A bad record (unless skipped) or an unreadable input ends the stream with a
    :class:`_Failure` rather than an exception here: the batches before it, some still being
    tokenized, are written and their finished parts committed before it is raised.
    """
    batch: _Batch | None = None
    failure: _Failure | None = None
    index = -1
    try:
        for index, item in enumerate(
            iter_documents(sources, opts.text_field, opts.hf_split, opts.hf_config)
        ):
            if opts.max_docs is not None and index >= opts.max_docs:
                break
            part = index // opts.docs_per_part
            if part < first_part:
                continue
            if batch is not None and (batch.part != part or len(batch.texts) >= opts.batch_docs):
                yield batch
                batch = None
            if batch is None:
                batch = _Batch(part)
            batch.records += 1
            if isinstance(item, BadRecordError):
                if not opts.skip_bad_records:
                    failure = _Failure(part, item)
                    break
                log.warning("skipping bad record %s", item)
                batch.skipped += 1
            elif not item.text:
                batch.empty += 1
            else:
                batch.splits.append(split_of(item.text, opts.val_fraction))
                batch.texts.append(item.text)
    except Exception as err:  # reading the input failed before record index + 1
        failure = _Failure((index + 1) // opts.docs_per_part, err)
    if batch is not None:
        yield batch
    if failure is not None:
        yield failure


def _check_settings(out: OutputDir, opts: ConvertOptions) -> None:
    """Refuse to mix conversions; write the settings file, which is also the write probe."""
    settings = opts.settings()
    try:
        previous = out.read_bytes(SETTINGS_FILE)
    except Exception as exc:
        raise OutputNotWritableError(
            f"cannot access output {out.root!r} ({type(exc).__name__}: {exc})"
        ) from exc
    if previous is None and out.is_nonempty():
        raise ConvertError(
            f"output {out.root} is not empty and holds no {SETTINGS_FILE} (not a conversion "
            "of mpt-train's); use another --out or empty it"
        )
    if previous is not None:
        old = json.loads(previous)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ConvertError(
                f"{out.root} holds a conversion with other settings {diff} (old, new); "
                "use another --out or delete it"
            )
    out.probe(SETTINGS_FILE, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())


def convert_corpus(opts: ConvertOptions) -> ConvertStats:
    """Run (or resume, or recognise as finished) a conversion; return its statistics.

    Raises:
        FileNotFoundError: an input does not exist.
        BadRecordError: a malformed record, or a JSONL line that is not UTF-8 (message
            ``file:line: reason``), unless ``skip_bad_records``.
        InputReadError: a compressed input is truncated or corrupt (names the file; not
            skippable). On either error the parts finished before it keep their markers:
            re-running once the input is fixed resumes there.
        OutputNotWritableError: ``opts.out`` cannot be written (checked before tokenizing).
        ConvertError: ``opts.out`` holds something else.
    """
    sources = resolve_inputs(opts.inputs)
    out = OutputDir(opts.out)
    try:
        _check_settings(out, opts)
        if (done := out.read_bytes(STATS_FILE)) is not None:
            log.info("%s is already complete; nothing to do", opts.out)
            return ConvertStats.from_json(done.decode())
        tokenizer = load_tokenizer(opts.tokenizer)
        dtype = token_dtype(len(tokenizer))
        meta = {
            "concat_tokens": opts.concat_tokens,
            "tokenizer": opts.tokenizer,
            "vocab_size": len(tokenizer),
            "token_dtype": dtype.name,
        }
        markers = load_markers(out)
        if markers:
            log.info("resuming %s: %d finished part(s) skipped", opts.out, len(markers))
        carry = markers[-1]["splits"] if markers else {}
        packers = {
            s: TokenPacker(
                opts.concat_tokens,
                separator_ids(tokenizer),
                dtype,
                carry=carry.get(s, {}).get("carry", ()),
            )
            for s in opts.splits
        }
        columns = {"tokens": f"ndarray:{dtype.name}:{opts.concat_tokens}"}
        workers = opts.workers or default_workers()
        markers += _run_parts(out, opts, sources, packers, columns, workers, len(markers))
        _check_not_empty(opts, markers)
        result = publish(out, opts.splits, markers, meta)
    finally:
        out.close()
    log.info(
        "wrote %s: %s",
        opts.out,
        ", ".join(
            f"{s}: {v.samples} samples / {v.tokens} tokens" for s, v in result.splits.items()
        ),
    )
    return result


def _check_not_empty(opts: ConvertOptions, markers: list[dict[str, Any]]) -> None:
    """A conversion that yields no document, or a split with no sample, is a failure: training
    on it could only fail later, far from the cause."""
    inputs = ", ".join(opts.inputs)
    records = sum(m["records"] for m in markers)
    empty = sum(m["empty_documents"] for m in markers)
    skipped = sum(m["skipped_records"] for m in markers)
    docs = {s: sum(m["splits"][s]["documents"] for m in markers) for s in opts.splits}
    if not sum(docs.values()):
        raise ConvertError(
            f"no document in {inputs}: {records} record(s) read, {empty} with empty text, "
            f"{skipped} skipped as malformed (is --text-field {opts.text_field!r} right?)"
        )
    for split in opts.splits:
        samples = sum(m["splits"][split].get("samples", 0) for m in markers)
        if samples == 0:
            tokens = sum(m["splits"][split]["input_tokens"] for m in markers)
            raise ConvertError(
                f"no sample for split {split!r} from {inputs}: {docs[split]} document(s), "
                f"{tokens} token(s), fewer than one sample of --concat-tokens "
                f"{opts.concat_tokens}; give more text or a lower --concat-tokens"
            )


def _run_parts(
    out: OutputDir,
    opts: ConvertOptions,
    sources: list[InputSource],
    packers: dict[str, TokenPacker],
    columns: dict[str, str],
    workers: int,
    first_part: int,
) -> list[dict[str, Any]]:
    """Tokenize and write every remaining part, committing a marker after each one."""
    new_markers: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    writers: dict[str, PartWriter] = {}
    writer_kwargs = {
        "compression": opts.compression,
        "hashes": sorted(opts.hashes),
        "size_limit": opts.shard_size_limit,
    }
    start, docs, tokens = time.perf_counter(), 0, 0

    def commit() -> None:
        assert current is not None
        for split, writer in writers.items():
            entry = current["splits"][split]
            entry["shards"] = writer.finish()
            entry["samples"] = writer.samples
            entry["carry"] = packers[split].carry.tolist()
        name = marker_path(current["part"])
        out.write_bytes(name, json.dumps(current, sort_keys=True).encode())
        new_markers.append(current)
        log.debug("committed part %d", current["part"])

    bar = tqdm(desc="tokenizing", unit=" docs", disable=not opts.progress, dynamic_ncols=True)
    with bar, ParallelEncoder(opts.tokenizer, workers) as encoder:
        batches = _batches(opts, sources, first_part)
        for batch, arrays in encoder.map((b, b.texts) for b in batches):
            if isinstance(batch, _Failure):
                if current is not None and current["part"] < batch.part:
                    commit()  # every record of it was read before the failure
                raise batch.error
            if current is None or batch.part != current["part"]:
                if current is not None:
                    commit()
                current = {
                    "part": batch.part,
                    "records": 0,
                    "skipped_records": 0,
                    "empty_documents": 0,
                    "splits": {s: {"documents": 0, "input_tokens": 0} for s in opts.splits},
                }
                writers = {
                    s: PartWriter(out, f"{s}/{part_name(batch.part)}", columns, **writer_kwargs)
                    for s in opts.splits
                }
            current["records"] += batch.records
            current["skipped_records"] += batch.skipped
            current["empty_documents"] += batch.empty
            for split, arr in zip(batch.splits, arrays):
                packer, entry = packers[split], current["splits"][split]
                before = packer.input_tokens
                for sample in packer.add(arr):
                    writers[split].write(sample)
                entry["documents"] += 1
                entry["input_tokens"] += packer.input_tokens - before
                tokens += packer.input_tokens - before
            docs += len(batch.texts)
            bar.update(len(batch.texts))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)
        if current is not None:
            commit()
    elapsed = time.perf_counter() - start
    log.info(
        "tokenized %d documents, %d tokens in %.1fs (%.0f tok/s, %d workers)",
        docs,
        tokens,
        elapsed,
        tokens / max(elapsed, 1e-9),
        workers,
    )
    return new_markers
