"""Fixtures shared by every test area: a real S3 server and clean streaming state.

Nothing here is a mock: ``s3_server`` is SeaweedFS on 127.0.0.1 (one per test session, ~1 s to
start), and it sets the environment that boto3, streaming and Composer read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.export.tiny_run import tiny_mds, train_tiny
from tests.helpers import make_mds
from tests.s3_server import S3Server, serving

SWEEP_SEQ = 32  # sequence length of the sweep_mds shards

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_session() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 with bucket ``mpt-train``, for the whole session."""
    with serving("mpt-train") as server:
        yield server


@pytest.fixture
def s3_server(s3_session: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's server, with the environment boto3 and streaming read pointed at it for
    this test only (other tests, and other servers' tests, see their own)."""
    for key, value in s3_session.env.items():
        monkeypatch.setenv(key, value)
    return s3_session


@pytest.fixture(scope="session")
def mds32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MDS dataset (32-token samples) of the shipped corpus."""
    return tiny_mds(tmp_path_factory, 32)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, mds32: Path) -> Path:
    """One tiny trained checkpoint, shared by the export, eval and fine-tuning tests."""
    return train_tiny(tmp_path_factory.mktemp("run"), mds32)


@pytest.fixture(autouse=True)
def _clean_streaming_shm() -> Iterator[None]:
    """Streaming keys shared memory by local path; stale blocks from a killed run break reuse."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Entry points called in-process (``main([...])``) configure root logging with the stream
    pytest captured for that test; once that stream is closed, a later test's log line would
    fail with "--- Logging error ---". Each test gets the root logger back as it found it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def sweep_mds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenized MDS shards (train/ and val/) from a slice of the shipped corpus."""
    return make_mds(tmp_path_factory.mktemp("sweep-mds"), seq_len=SWEEP_SEQ, max_docs=200)
