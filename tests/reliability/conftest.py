"""Fixtures for the reliability tests: the training fixtures, and a real S3 server.

Outage tests stop and restart their server, so this folder has its own (another bucket) rather
than the session-wide ``s3_server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_server import S3Server, serving
from tests.training.conftest import mds_dir  # noqa: F401 - re-exported fixture


@pytest.fixture(scope="session")
def reliability_s3() -> Iterator[S3Server]:
    """A server of its own: outage tests stop and restart it."""
    with serving("reliability") as server:
        yield server


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
