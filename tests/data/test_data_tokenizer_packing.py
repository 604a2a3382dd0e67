"""Shipped assets, tokenizer facts (separators, dtype), the packer, and the S3 test server."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpt_train.data import SHIPPED_CORPUS, SHIPPED_TOKENIZER, load_tokenizer
from mpt_train.data.packing import TokenPacker
from mpt_train.data.tokenizer import Separators, separator_ids, token_dtype

# Streaming runs background threads; a hang must fail the test, not the CI job.
pytestmark = pytest.mark.timeout(180)

ASSETS = Path(SHIPPED_TOKENIZER).parent


def test_shipped_tokenizer_by_name_and_path(tokenizer) -> None:
    by_path = load_tokenizer(SHIPPED_TOKENIZER)
    assert len(tokenizer) == len(by_path) == 8192
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    text = "Return the number of items in a container."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == by_path(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 3  # a real BPE, not bytes


def test_shipped_corpus_is_small_prose_with_a_licence_note() -> None:
    assert os.path.getsize(SHIPPED_CORPUS) <= 3 * 2**20
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) > 2000
    text = " ".join(r["text"] for r in records)
    assert len(text) > 1_500_000
    assert text.count(" the ") > 10_000  # English prose
    readme = (ASSETS / "README.md").read_text()
    assert "PSF" in readme and "build_shipped_assets.py" in readme


def test_separators_follow_mpt() -> None:
    class Tok:
        def __init__(self, bos, eos):
            self.bos_token_id, self.eos_token_id = bos, eos

    assert separator_ids(Tok(0, 0)) == Separators(bos=(), eos=(0,))  # GPT-NeoX: EOS only
    assert separator_ids(Tok(None, 2)) == Separators(bos=(), eos=(2,))
    assert separator_ids(Tok(1, 2)) == Separators(bos=(1,), eos=(2,))  # Llama-like


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [
        (8192, np.uint16),
        (50_432, np.uint16),
        (65_536, np.uint16),
        (65_537, np.uint32),
        (128_256, np.uint32),
    ],
)
def test_token_dtype_is_the_narrowest(vocab: int, dtype) -> None:
    assert token_dtype(vocab) == np.dtype(dtype)


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(2, 60_000), max_size=40), max_size=30),
    chunk=st.integers(1, 50),
    cut=st.integers(0, 30),
    bos=st.booleans(),
)
def test_packer_keeps_every_token_in_order(docs, chunk, cut, bos) -> None:
    seps = Separators(bos=(1,) if bos else (), eos=(0,))
    stream = [t for d in docs for t in ([1] if bos else []) + d + [0]]
    # One packer over everything ...
    packer = TokenPacker(chunk, seps, np.dtype(np.uint16))
    chunks = [c.tolist() for d in docs for c in packer.add(d)]
    flat = [t for c in chunks for t in c]
    assert all(len(c) == chunk for c in chunks)
    assert flat == stream[: len(flat)]
    assert packer.carry.tolist() == stream[len(flat) :]
    assert len(packer.carry) < chunk
    # ... equals two packers joined by the carry (a resumed unit of work).
    cut = min(cut, len(docs))
    first = TokenPacker(chunk, seps, np.dtype(np.uint16))
    resumed_chunks = [c.tolist() for d in docs[:cut] for c in first.add(d)]
    second = TokenPacker(chunk, seps, np.dtype(np.uint16), carry=first.carry.tolist())
    resumed_chunks += [c.tolist() for d in docs[cut:] for c in second.add(d)]
    assert resumed_chunks == chunks


def test_packer_rejects_ids_beyond_the_dtype() -> None:
    packer = TokenPacker(4, Separators((), (0,)), np.dtype(np.uint16))
    with pytest.raises(ValueError, match="70000"):
        list(packer.add([70_000]))


def test_s3_server_survives_restart(s3_server) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="restart/probe", Body=b"kept")
    with s3_server.outage():
        assert not s3_server.running
        with pytest.raises(Exception):  # noqa: B017 - any connection error
            s3_server.client().head_bucket(Bucket=s3_server.bucket)
    assert s3_server.running
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key="restart/probe")["Body"]
    assert body.read() == b"kept"
    assert {
        "S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    } <= set(s3_server.env)
    assert os.environ["S3_ENDPOINT_URL"] == s3_server.endpoint_url
