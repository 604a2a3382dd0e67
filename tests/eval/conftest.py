"""Fixtures for eval tests: one tiny trained checkpoint per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.tiny_run import tiny_mds, train_tiny


@pytest.fixture(scope="session")
def mds32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mds(tmp_path_factory, 32)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, mds32: Path) -> Path:
    return train_tiny(tmp_path_factory.mktemp("run"), mds32)
