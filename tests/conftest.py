"""Fixtures shared by every test area: a real S3 server and clean streaming state.

Nothing here is a mock: ``s3_server`` is SeaweedFS on 127.0.0.1 (one per test session, ~1 s to
start), and it sets the environment that boto3, streaming and Composer read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.s3_server import S3Server

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_S3_ENV = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 with bucket ``mpt-train``; env points at it."""
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    server = S3Server(bucket="mpt-train")
    server.start()
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _clean_streaming_shm() -> Iterator[None]:
    """Streaming keys shared memory by local path; stale blocks from a killed run break reuse."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()
