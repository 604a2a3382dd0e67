"""Fixtures for the reliability tests: the training fixtures, and a real S3 server.

Outage tests stop and restart their server, so this folder has its own (another bucket) rather
than the session-wide ``s3_server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_server import S3Server, serving
from tests.train.conftest import mds_dir  # noqa: F401 - re-exported fixture


@pytest.fixture(scope="session")
def _reliability_s3_session() -> Iterator[S3Server]:
    with serving("reliability") as server:
        yield server


@pytest.fixture
def reliability_s3(_reliability_s3_session: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """A server of its own (outage tests stop and restart it); its environment is set for
    this test only."""
    for key, value in _reliability_s3_session.env.items():
        monkeypatch.setenv(key, value)
    return _reliability_s3_session


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
