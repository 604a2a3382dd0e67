"""A rank that stops making progress is named on rank 0, with where it is, while it stalls.

(A node lost mid-step: tests/train/test_multinode.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.nodes import run_nodes
from tests.train.conftest import tiny_spec, write_spec

pytestmark = pytest.mark.slow

FAULT_RUN = str(REPO / "tests/reliability/fault_run.py")


def test_a_stalled_rank_is_named_on_rank_0_while_it_stalls(mds_dir: Path, tmp_path: Path) -> None:
    spec = tiny_spec(
        mds_dir,
        run_name="stall",
        max_duration="4ba",
        fsdp={"sharding_strategy": "FULL_SHARD"},
        reliability={"straggler_timeout_s": 3},
    )
    path = str(write_spec(tmp_path / "stall.yaml", spec))
    console = run_nodes(1, 2, [FAULT_RUN, "--sleep-at", "2", "1", "12", path], cwd=tmp_path,
                        timeout=600)  # fmt: skip
    lines = console.splitlines()
    stalled = [
        i
        for i, line in enumerate(lines)
        if "[rank0]" in line
        and "rank 1 (node 0, local rank 1" in line
        and "no progress" in line
        and "faults.py" in line
        and "in before_forward" in line
    ]
    assert stalled, console[-6000:]
    assert "ranks [0] wait for it in a collective" in lines[stalled[0]]
    waited = int(re.search(r"no progress for (\d+) s", lines[stalled[0]]).group(1))
    assert 3 <= waited < 12, "not reported while the rank slept (12 s)"
