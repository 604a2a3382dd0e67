"""Data-path throughput, side by side: conversion and dataloading against what a GPU consumes.

A data pipeline is fast enough when it outruns the accelerator by a wide margin: one H100
training MPT-1B at ~50% MFU consumes about 55k tokens/s. This script measures, in one run and on
this machine:

* conversion throughput (tokens/s, tokenizing on all cores, writing zstd MDS shards), to a local
  folder and to S3: your bucket with ``--s3-url``, else a local SeaweedFS server (as in the tests);
* dataloader throughput (tokens/s delivered as ``input_ids`` batches) from the local MDS folder
  and from the S3 server with a cold cache;

and prints them next to the 55k tokens/s reference. The corpus is the shipped one repeated
``--copies`` times with the shipped tokenizer (no network here; GPT-NeoX's tokenizer is slower
per token, so conversion figures are an upper bound for it).

Usage::

    python scripts/bench_data.py [--copies 20] [--seq-len 2048] [--batch-size 8] [--loader-workers 2]
    python scripts/bench_data.py --s3-url s3://my-bucket/scratch   # against a real bucket
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpt_train.data import (  # noqa: E402
    SHIPPED_CORPUS,
    ConvertOptions,
    TextDatasetConfig,
    TextLoaderConfig,
    build_text_dataloader,
    convert_corpus,
)
from mpt_train.data.parallel_encode import default_workers  # noqa: E402

H100_MPT1B_TOKENS_PER_S = 55_000


def _corpus(tmp: Path, copies: int) -> Path:
    data = gzip.decompress(Path(SHIPPED_CORPUS).read_bytes())
    path = tmp / "bench.jsonl"
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return path


def _convert(corpus: Path, out: str, seq_len: int) -> tuple[float, int]:
    start = time.perf_counter()
    stats = convert_corpus(
        ConvertOptions(
            inputs=[str(corpus)],
            out=out,
            concat_tokens=seq_len,
            workers=0,
            progress=False,
            docs_per_part=20_000,
        )
    )
    seconds = time.perf_counter() - start
    return seconds, stats.splits["train"].input_tokens


def _load(
    remote: str | None, local: str, seq_len: int, batch: int, workers: int
) -> tuple[float, int, float]:
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    cfg = TextLoaderConfig(
        dataset=TextDatasetConfig(remote=remote, local=local, max_seq_len=seq_len, shuffle=True),
        num_workers=workers,
        persistent_workers=False,
    )
    start = time.perf_counter()
    loader = build_text_dataloader(cfg, None, batch)
    tokens, first = 0, None
    for b in loader:
        if first is None:
            first = time.perf_counter() - start
        tokens += b["input_ids"].numel()
    seconds = time.perf_counter() - start
    del loader
    gc.collect()
    return seconds, tokens, first or 0.0


@contextlib.contextmanager
def _s3_target(url: str | None, tmp: Path) -> Iterator[tuple[str, str]]:
    """(URL to write the dataset to, description): the user's bucket, or a local server."""
    if url is not None:
        yield url.rstrip("/") + f"/mpt-train-bench-{os.getpid()}", url.split("/")[2]
        return
    try:  # a checkout with the dev extras: the SeaweedFS server the tests use
        from tests.s3_server import S3Server
    except ImportError as err:
        raise SystemExit(f"no local S3 server ({err}); pass --s3-url or --no-s3") from None
    with S3Server(bucket="bench", data_dir=str(tmp / "s3")) as s3:
        os.environ.update(s3.env)
        yield s3.url("corpus"), "SeaweedFS, loopback"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="shipped corpus repetitions")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 rows")
    parser.add_argument(
        "--s3-url",
        default=None,
        help="measure against your bucket (s3://bucket/prefix, credentials and endpoint from "
        "the usual AWS_* variables; the prefix is written to and not cleaned up) instead of "
        "a local SeaweedFS server",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    tmp = Path(tempfile.mkdtemp(prefix="mpt-train-bench-"))
    rows: list[tuple[str, float, str]] = []
    try:
        corpus = _corpus(tmp, args.copies)
        secs, toks = _convert(corpus, str(tmp / "local"), args.seq_len)
        rows.append(
            (
                f"convert -> local MDS ({default_workers()} tokenizer procs)",
                toks / secs,
                f"{toks:,} tokens in {secs:.1f}s",
            )
        )
        secs, toks, first = _load(
            None, str(tmp / "local"), args.seq_len, args.batch_size, args.loader_workers
        )
        rows.append(
            (
                f"dataloader <- local MDS ({args.loader_workers} workers)",
                toks / secs,
                f"{toks:,} tokens in {secs:.1f}s, first batch {first:.2f}s",
            )
        )
        if not args.no_s3:
            with _s3_target(args.s3_url, tmp) as (url, where):
                secs, toks = _convert(corpus, url, args.seq_len)
                rows.append(
                    (f"convert -> S3 ({where})", toks / secs, f"{toks:,} tokens in {secs:.1f}s")
                )
                secs, toks, first = _load(
                    url, str(tmp / "cache"), args.seq_len, args.batch_size, args.loader_workers
                )
                rows.append(
                    (
                        f"dataloader <- S3, cold cache ({args.loader_workers} workers)",
                        toks / secs,
                        f"{toks:,} tokens in {secs:.1f}s, first batch {first:.2f}s",
                    )
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\ndata throughput on {os.cpu_count()} CPUs (seq_len {args.seq_len}, "
        f"batch {args.batch_size}, shipped tokenizer)"
    )
    print(f"{'':52s} {'tokens/s':>12s} {'x H100 MPT-1B':>14s}  detail")
    print(
        f"{'reference: one H100 training MPT-1B':52s} {H100_MPT1B_TOKENS_PER_S:>12,.0f} {1.0:>13.1f}x"
    )
    for name, rate, detail in rows:
        print(f"{name:52s} {rate:>12,.0f} {rate / H100_MPT1B_TOKENS_PER_S:>13.1f}x  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
