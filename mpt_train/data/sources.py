"""Read documents from the inputs the converter accepts, in a fixed order, with locations.

Inputs are JSONL files (``.jsonl``, ``.jsonl.gz``, ``.ndjson``), plain-text files (``.txt``,
``.txt.gz``, ``.md``; one file is one document), folders of those (walked recursively in sorted
order), Hugging Face ``datasets`` saved with ``save_to_disk`` (a folder holding
``dataset_info.json``), local ``.parquet``/``.csv``/``.arrow`` files read through ``datasets``,
and hub datasets written ``hf:NAME`` or ``hf:NAME:CONFIG`` (streamed; needs network).

Every document carries its location (``path:line`` or ``hf:NAME[split]#row``) so that a bad
record can be reported precisely, and the order is the same on every run: it decides the
byte content of the shards and the units of resumable work.

JSONL lines are decoded one at a time, so a line that is not UTF-8 is one bad record (skippable
like malformed JSON). A compressed input that ends early or is corrupt is not a record: it
stops the conversion with :class:`InputReadError`, naming the file and the last line read.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpt_train.errors import RunFailure

__all__ = [
    "JSONL_SUFFIXES",
    "TEXT_SUFFIXES",
    "BadRecordError",
    "Document",
    "InputReadError",
    "InputSource",
    "iter_documents",
    "resolve_inputs",
]

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md")
_DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
HF_PREFIX = "hf:"


class BadRecordError(ValueError):
    """A record that cannot be read as a document; the message starts with its location."""

    def __init__(self, location: str, reason: str) -> None:
        self.location = location
        self.reason = reason
        super().__init__(f"{location}: {reason}")


class InputReadError(RunFailure):
    """An input file cannot be read to its end (truncated or corrupt compressed data).

    Not a bad record: the rest of the file is unreadable, so skipping would silently drop it.
    The message names the file and the last line read.
    """


#: What :mod:`gzip` raises for a truncated stream, a non-gzip file or corrupt deflate data.
_ARCHIVE_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _archive_error(path: str, err: BaseException, lines_read: int | None) -> InputReadError:
    where = ""
    if lines_read is not None:
        where = f" after line {lines_read}" if lines_read else " before the first line"
    kind = "zlib.error" if isinstance(err, zlib.error) else type(err).__name__
    return InputReadError(f"{path}: truncated or corrupt compressed data{where} ({kind}: {err})")


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (``file:line`` or ``hf:name[split]#row``)."""

    text: str
    location: str


@dataclass(frozen=True)
class InputSource:
    """A resolved input: ``kind`` is ``jsonl``, ``text``, ``hf_disk``, ``hf_file`` or ``hf_hub``."""

    kind: str
    path: str
    builder: str | None = None  # datasets builder for hf_file ("parquet", ...)


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if path.suffix.lower() in _DATASETS_SUFFIXES:
        return "hf_file"
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def resolve_inputs(inputs: Iterable[str]) -> list[InputSource]:
    """Expand folders and validate paths, before any output is written.

    Raises:
        FileNotFoundError: an input path does not exist.
        ValueError: a file has an unsupported extension, or nothing readable was found.
    """
    sources: list[InputSource] = []
    for raw in inputs:
        if raw.startswith(HF_PREFIX):
            sources.append(InputSource("hf_hub", raw[len(HF_PREFIX) :]))
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input not found: {raw}")
        if path.is_dir():
            if _is_saved_dataset(path):
                sources.append(InputSource("hf_disk", str(path)))
                continue
            found = 0
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    file = Path(dirpath) / name
                    kind = _suffix_kind(file)
                    if kind is None:
                        log.debug("skipping %s (unsupported extension)", file)
                        continue
                    found += 1
                    sources.append(_file_source(file, kind))
            if not found:
                raise ValueError(
                    f"input folder {raw} holds no {JSONL_SUFFIXES + TEXT_SUFFIXES} files"
                )
            continue
        kind = _suffix_kind(path)
        if kind is None:
            raise ValueError(
                f"input {raw}: unsupported extension; expected one of "
                f"{JSONL_SUFFIXES + TEXT_SUFFIXES + tuple(_DATASETS_SUFFIXES)}"
            )
        sources.append(_file_source(path, kind))
    if not sources:
        raise ValueError("no inputs given")
    return sources


def _file_source(path: Path, kind: str) -> InputSource:
    builder = _DATASETS_SUFFIXES.get(path.suffix.lower()) if kind == "hf_file" else None
    return InputSource(kind, str(path), builder)


def _open_binary(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _open_text(path: str) -> io.TextIOBase:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8")


def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of each line, decompressing ``.gz``.

    Raises:
        InputReadError: the compressed data ends early or is corrupt.
    """
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except _ARCHIVE_ERRORS as err:
        raise _archive_error(path, err, lineno) from err


def _text_of(record: Any, text_field: str, location: str) -> str:
    if not isinstance(record, dict):
        raise BadRecordError(location, f"expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise BadRecordError(location, f"missing text field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadRecordError(
            location, f"text field {text_field!r} is {type(text).__name__}, not a string"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\ud800" escapes: no tokenizer takes them
        raise BadRecordError(
            location,
            f"text field {text_field!r} holds a lone surrogate "
            f"(U+{ord(err.object[err.start]):04X} at character {err.start + 1})",
        ) from None
    return text


def _iter_jsonl(path: str, text_field: str) -> Iterator[Document | BadRecordError]:
    for lineno, raw in _raw_lines(path):
        location = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            byte = err.object[err.start]
            yield BadRecordError(
                location, f"not UTF-8 text (byte {byte:#04x} at column {err.start + 1})"
            )
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield BadRecordError(location, f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        try:
            yield Document(_text_of(record, text_field, location), location)
        except BadRecordError as err:
            yield err


def _iter_text_file(path: str) -> Iterator[Document | BadRecordError]:
    # Text mode: line endings are normalised to "\n", as in every earlier conversion.
    try:
        with _open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as err:
        yield BadRecordError(f"{path}:1", f"not UTF-8 text ({err.reason})")
        return
    except _ARCHIVE_ERRORS as err:
        raise _archive_error(path, err, None) from err
    yield Document(text, f"{path}:1")


def _iter_hf(
    source: InputSource, text_field: str, hf_split: str, hf_config: str | None
) -> Iterator[Document | BadRecordError]:
    import datasets

    if source.kind == "hf_disk":
        data = datasets.load_from_disk(source.path)
        label = source.path
        if isinstance(data, datasets.DatasetDict):
            if hf_split not in data:
                raise ValueError(f"{source.path}: no split {hf_split!r} (has {list(data)})")
            data, label = data[hf_split], f"{source.path}[{hf_split}]"
    elif source.kind == "hf_file":
        # streaming=True: read the file directly, no Arrow copy in ~/.cache.
        data = datasets.load_dataset(
            source.builder, data_files=source.path, split="train", streaming=True
        )
        label = source.path
    else:
        name, _, config = source.path.partition(":")
        data = datasets.load_dataset(name, config or hf_config, split=hf_split, streaming=True)
        label = f"hf:{source.path}[{hf_split}]"
    for row, record in enumerate(data):
        location = f"{label}#{row}"
        try:
            yield Document(_text_of(record, text_field, location), location)
        except BadRecordError as err:
            yield err


def iter_documents(
    sources: Iterable[InputSource],
    text_field: str = "text",
    hf_split: str = "train",
    hf_config: str | None = None,
) -> Iterator[Document | BadRecordError]:
    """Yield every document of every source in order; bad records are yielded, not raised.

    Yielding :class:`BadRecordError` lets the caller decide between failing (the default,
    naming file and line) and counting skipped records, without losing the position.

    Raises:
        InputReadError: a compressed input is truncated or corrupt (names the file).
    """
    for source in sources:
        if source.kind == "jsonl":
            yield from _iter_jsonl(source.path, text_field)
        elif source.kind == "text":
            yield from _iter_text_file(source.path)
        else:
            yield from _iter_hf(source, text_field, hf_split, hf_config)
