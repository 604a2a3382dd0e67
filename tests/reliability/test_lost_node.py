"""A node lost in the middle of a step, and a rank that stops making progress.

Two simulated nodes of two CPU ranks (HYBRID_SHARD), launched as a cluster would. Killing every
process of node 1 mid-step must end node 0 within ``reliability.collective_timeout_s`` with the
lost ranks named; the same command then resumes from the last complete checkpoint, every
sample trained on exactly once. A rank that sleeps inside a step is named on rank 0, with
where it is, while it sleeps.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.nodes import launch_nodes, run_nodes
from tests.train.conftest import tiny_spec, write_spec

pytestmark = pytest.mark.slow

FAULT_RUN = str(REPO / "tests/reliability/fault_run.py")
STEPS, SAVE_EVERY, KILL_AFTER, COLLECTIVE_TIMEOUT = 8, 2, 5, 60


def ledger(prefix: Path) -> dict[tuple[int, int], list[str]]:
    """{(rank, step): sample hashes} of every rank's ledger."""
    out: dict[tuple[int, int], list[str]] = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert (row["rank"], row["step"]) not in out, f"step recorded twice in {path}"
            out[row["rank"], row["step"]] = row["samples"]
    return out


def test_lost_node_ends_the_run_in_bounded_time_and_resumes_exactly(
    mds_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(
        mds_dir,
        run_name="lost",
        max_duration=f"{STEPS}ba",
        save_folder=str(tmp_path / "ckpt"),
        save_interval=f"{SAVE_EVERY}ba",
        fsdp={"sharding_strategy": "HYBRID_SHARD", "state_dict_type": "sharded"},
        reliability={"collective_timeout_s": COLLECTIVE_TIMEOUT, "straggler_timeout_s": 30},
    )
    path = str(write_spec(tmp_path / "lost.yaml", spec))
    stamp = tmp_path / "killed_at"
    kill = ["--kill-node-at", str(KILL_AFTER), "1", str(stamp)]
    run = launch_nodes(2, 2, [FAULT_RUN, *kill, "--ledger", str(tmp_path / "cut1"), path],
                       cwd=tmp_path)  # fmt: skip
    try:
        codes = run.wait(timeout=600)
        console = run.output()
    finally:
        run.close()
    (tmp_path / "console.txt").write_text(console)  # for a look after a failure
    assert codes[1] == -9, f"node 1 was not killed\n{console[-6000:]}"
    assert codes[0] not in (0, None), f"node 0 did not fail: {codes}\n{console[-6000:]}"
    kill_to_exit = run.nodes[0].exited_at - float(stamp.read_text())
    print(f"kill-to-exit: {kill_to_exit:.1f} s")
    assert kill_to_exit < COLLECTIVE_TIMEOUT, console[-6000:]
    # Whichever survivor fails first names the lost node's ranks before it exits.
    for rank in (2, 3):
        named = re.search(
            rf"\[rank[01]\] ERROR .*rank {rank} \(node 1, .*stopped answering", console
        )
        assert named, f"rank {rank} not named\n{console[-6000:]}"

    run_nodes(2, 2, [FAULT_RUN, "--ledger", str(tmp_path / "cut2"), path], cwd=tmp_path,
              timeout=600)  # fmt: skip
    first, second = ledger(tmp_path / "cut1"), ledger(tmp_path / "cut2")
    last_ckpt = KILL_AFTER // SAVE_EVERY * SAVE_EVERY
    assert {s for _, s in first} == set(range(1, KILL_AFTER + 1))
    assert {s for _, s in second} == set(range(last_ckpt + 1, STEPS + 1)), "resumed elsewhere"
    redone = [k for k in first if k[1] > last_ckpt]
    assert redone and all(first[k] == second[k] for k in redone), "lost steps got other data"
    committed = {k: v for k, v in first.items() if k[1] <= last_ckpt} | second
    seen = Counter(h for v in committed.values() for h in v)
    assert sum(seen.values()) == STEPS * spec["global_train_batch_size"]
    assert set(seen.values()) == {1}, "a sample was trained on twice"
    print(f"work lost: {len({s for _, s in redone})} completed step(s) and the step in flight")


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
