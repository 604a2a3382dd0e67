"""Fixtures for the reliability tests: the training fixtures, and a real S3 server.

The session ``s3_server`` lives in tests/data/conftest.py until the lead hoists it; this
folder starts its own (same class, another bucket) so it does not depend on that move.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_server import S3Server
from tests.training.conftest import mds_dir  # noqa: F401 - re-exported fixture


@pytest.fixture(scope="session")
def reliability_s3() -> Iterator[S3Server]:
    saved = {
        k: os.environ.get(k)
        for k in (
            "S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    server = S3Server(bucket="reliability")
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
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
