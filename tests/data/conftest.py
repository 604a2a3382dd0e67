"""Fixtures for the data tests: a real S3 server, small corpora, token read-back helpers.

The session ``s3_server`` comes from ``tests/conftest.py``.
Streaming keeps shared memory keyed by local paths, so every test starts by cleaning stale
blocks and uses its own cache folders (``tmp_path``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from mpt_train.data.tokenizer import load_tokenizer
from tests.data.data_helpers import shipped_texts, write_jsonl
from tests.s3_server import S3Server
from tests.train.conftest import mds_dir  # noqa: F401 - re-exported fixture

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    """A fresh ``s3://mpt-train/<uuid>`` prefix per test."""
    return s3_server.url(uuid.uuid4().hex[:12])


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("mpt-train/tiny-bpe")


@pytest.fixture
def small_corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """200 shipped documents as one JSONL file."""
    texts = shipped_texts(200)
    return write_jsonl(tmp_path / "in" / "docs.jsonl", texts), texts
