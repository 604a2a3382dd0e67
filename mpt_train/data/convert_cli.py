"""The ``mpt-convert`` / ``scripts/data_prep/convert.py`` command: flags -> :class:`ConvertOptions`
-> :func:`convert_corpus`.

Kept apart from the conversion logic so that :mod:`mpt_train.data.convert` stays importable
and testable as plain functions; this module maps flags onto options and ends the command.
"""

from __future__ import annotations

import argparse
import logging
import os

from mpt_train.data.convert import ConvertError, ConvertOptions, convert_corpus
from mpt_train.data.sources import BadRecordError
from mpt_train.data.storage import OutputNotWritableError
from mpt_train.data.tokenizer import SHIPPED_TOKENIZER_NAME
from mpt_train.errors import ConfigError, run_cli

__all__ = ["build_parser", "main", "parse_args"]

_EPILOG = """\
examples:
  # the shipped corpus and tokenizer, 2048-token samples, 1% validation
  mpt-convert mpt_train/assets/corpus/stdlib_docs.jsonl.gz --out data/stdlib \\
      --tokenizer mpt-train/tiny-bpe --concat-tokens 2048 --val-fraction 0.01

  # JSONL files with the text in "content", straight to S3 (S3_ENDPOINT_URL for non-AWS)
  mpt-convert corpus/*.jsonl --text-field content --out s3://bucket/corpus \\
      --tokenizer EleutherAI/gpt-neox-20b --concat-tokens 2048

  # a Hugging Face hub dataset (network needed), config and split
  mpt-convert hf:wikitext:wikitext-103-raw-v1 --hf-split train --out data/wikitext ...

Re-running the same command resumes an interrupted conversion; a finished one is left alone.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for ``--help`` tests and docs)."""
    p = argparse.ArgumentParser(
        prog="mpt-convert",
        description="Tokenize a corpus into fixed-length MDS shards for StreamingDataset.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="JSONL(.gz) / text files, folders of them, a datasets save_to_disk folder, "
        ".parquet/.csv/.arrow files, or hf:NAME[:CONFIG] hub datasets",
    )
    p.add_argument("--out", required=True, help="output folder or URL (s3://, gs://, oci://, ...)")
    p.add_argument(
        "--tokenizer",
        default=SHIPPED_TOKENIZER_NAME,
        help=f"HF tokenizer name or path (default {SHIPPED_TOKENIZER_NAME}; MPT used "
        "EleutherAI/gpt-neox-20b)",
    )
    p.add_argument(
        "--concat-tokens",
        type=int,
        required=True,
        metavar="N",
        help="tokens per sample (>= the training max_seq_len)",
    )
    p.add_argument("--text-field", default="text", help="JSON/datasets field holding the text")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of documents (by text hash) written to val/ (default 0)",
    )
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = all cores)")
    p.add_argument("--compression", default="zstd", help="shard compression, or 'none'")
    p.add_argument(
        "--hashes",
        default="xxh3_64",
        help="comma-separated shard hashes to record (for validate_hash), or 'none'",
    )
    p.add_argument(
        "--shard-size-limit",
        type=int,
        default=1 << 26,
        metavar="BYTES",
        help="uncompressed bytes per shard (default 64 MiB)",
    )
    p.add_argument(
        "--docs-per-part",
        type=int,
        default=100_000,
        metavar="N",
        help="input records per resumable unit of work",
    )
    p.add_argument(
        "--batch-docs",
        type=int,
        default=64,
        metavar="N",
        help="documents per tokenization task (speed only)",
    )
    p.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="count and skip malformed records instead of stopping at the first",
    )
    p.add_argument(
        "--max-docs", type=int, default=None, metavar="N", help="read at most N input records"
    )
    p.add_argument("--hf-split", default="train", help="split of datasets inputs")
    p.add_argument("--hf-config", default=None, help="config of hf: inputs without one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[ConvertOptions, int]:
    """Parse ``argv`` into options and a logging level."""
    args = build_parser().parse_args(argv)

    def none_if(value: str) -> str | None:
        return None if value.lower() in {"", "none"} else value

    hashes = none_if(args.hashes)
    try:
        opts = ConvertOptions(
            inputs=list(args.inputs),
            out=args.out,
            tokenizer=args.tokenizer,
            concat_tokens=args.concat_tokens,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            workers=args.workers,
            compression=none_if(args.compression),
            hashes=sorted(h.strip() for h in hashes.split(",")) if hashes else [],
            shard_size_limit=args.shard_size_limit,
            docs_per_part=args.docs_per_part,
            batch_docs=args.batch_docs,
            skip_bad_records=args.skip_bad_records,
            max_docs=args.max_docs,
            hf_split=args.hf_split,
            hf_config=args.hf_config,
            progress=not args.no_progress,
        )
    except ValueError as err:
        build_parser().error(str(err))
    return opts, logging.DEBUG if args.verbose else logging.INFO


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``mpt-convert``); see ``--help``. Returns the exit status:
    0, 1 with one line naming the record, file or folder that stopped the conversion, 2 for
    bad flags, 130 when interrupted."""
    opts, log_level = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def run() -> int:
        try:
            stats = convert_corpus(opts)
        except ConfigError as err:  # the tokenizer's: name the flag that holds it
            raise (ConfigError("--tokenizer", err.msg) if err.key == "name" else err) from None
        print(stats.to_json(), end="")
        return 0

    failures = (BadRecordError, ConvertError, OutputNotWritableError, FileNotFoundError)
    return run_cli(run, failures=failures, log_level=log_level)
