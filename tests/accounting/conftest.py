"""Fixtures for the accounting tests: a small MDS dataset for sweep runs on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_mds

SEQ = 32


@pytest.fixture(scope="session")
def sweep_mds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenized MDS shards (train/ and val/) from a slice of the shipped corpus."""
    return make_mds(tmp_path_factory.mktemp("sweep-mds"), seq_len=SEQ, max_docs=200)
