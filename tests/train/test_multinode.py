"""HYBRID_SHARD across two simulated nodes of two CPU ranks each, launched as a cluster would.

Shards within a node, replicas across nodes, the replicas' gradients averaged over gloo (which
has no AVG): the per-step losses are FULL_SHARD's, and the sharded checkpoint resumes on the
same world size bit for bit (after a node is lost mid-step, the relaunch ends with the
uninterrupted run's weights) and across node counts (2x2 -> 1x2 -> 2x2) with the same samples
in the same steps. All runs read the data with ``num_canonical_nodes: 2``, streaming's setting
for a sample order that does not depend on the node count.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from mpt_train.loggers.jsonl import read_metrics
from tests.helpers import REPO
from tests.nodes import launch_nodes, run_nodes
from tests.train.conftest import tiny_spec, write_spec

pytestmark = pytest.mark.slow

STEPS = 8
SAVE_EVERY, KILL_AFTER, COLLECTIVE_TIMEOUT = 2, 5, 60
FAULT_RUN = str(REPO / "tests/reliability/fault_run.py")


def grad_norms(prefix: Path) -> dict[int, float]:
    """{step: norm of the averaged gradient before clipping}, from rank 0's ledger."""
    rows = (json.loads(line) for line in Path(f"{prefix}.rank0.jsonl").read_text().splitlines())
    return {row["step"]: row["grad_norm"] for row in rows}


def steps_seen(prefix: Path) -> dict[int, Counter]:
    """{step: samples of the global batch}, from every rank's ledger."""
    out: dict[int, Counter] = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], Counter()).update(row["samples"])
    return out


def losses(root: Path, run_name: str) -> dict[int, float]:
    rows = read_metrics(root / f"runs/{run_name}/metrics.jsonl")
    return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


def spec_for(data: Path, name: str, strategy: str, **top: Any) -> dict[str, Any]:
    spec = tiny_spec(
        data,
        run_name=name,
        max_duration=f"{STEPS}ba",
        fsdp={"sharding_strategy": strategy, "state_dict_type": "sharded"},
        **top,
    )
    spec["train_loader"]["dataset"]["num_canonical_nodes"] = 2
    return spec


def train_on(nodes: int, ranks: int, root: Path, spec: dict[str, Any]) -> None:
    path = write_spec(root / f"{spec['run_name']}.yaml", spec)
    ledger = str(root / spec["run_name"])
    run_nodes(nodes, ranks, [FAULT_RUN, "--ledger", ledger, str(path)], cwd=root, timeout=900)


@pytest.fixture(scope="module")
def hybrid(mds_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2 x 2 HYBRID_SHARD run (checkpoint at step 4), a 1 x 2 FULL_SHARD run
    and one rank (no collective: the reference gradient)."""
    root = tmp_path_factory.mktemp("multinode")
    train_on(1, 1, root, spec_for(mds_dir, "single", "FULL_SHARD"))
    train_on(1, 2, root, spec_for(mds_dir, "full", "FULL_SHARD"))
    hsdp = spec_for(mds_dir, "hsdp", "HYBRID_SHARD", save_folder="ckpt/hsdp", save_interval="4ba")
    train_on(2, 2, root, hsdp)
    return root


def test_two_nodes_of_hybrid_shard_train_like_full_shard(hybrid: Path) -> None:
    full, hsdp = losses(hybrid, "full"), losses(hybrid, "hsdp")
    assert sorted(hsdp) == list(range(1, STEPS + 1))
    assert hsdp == pytest.approx(full, rel=1e-5)
    assert steps_seen(hybrid / "hsdp") == steps_seen(hybrid / "full")
    # Adam and norm clipping hide a gradient's scale from the losses; the norm does not: gloo
    # summing instead of averaging would make it 2x (FULL_SHARD) or 4x (2 x 2) the one rank's.
    single = grad_norms(hybrid / "single")
    assert grad_norms(hybrid / "full") == pytest.approx(single, rel=1e-5)
    assert grad_norms(hybrid / "hsdp") == pytest.approx(single, rel=1e-5)
    assert (hybrid / "ckpt/hsdp/ep0-ba4").is_dir(), "no sharded checkpoint at step 4"


def test_hybrid_shard_resumes_on_one_node_and_back_on_two(hybrid: Path, mds_dir: Path) -> None:
    """2 x 2 -> 1 x 2 from step 4, then 1 x 2 -> 2 x 2 from step 6: each leg trains on the
    samples of the uninterrupted run's steps, and its losses."""
    one = spec_for(mds_dir, "one-node", "HYBRID_SHARD", save_folder="ckpt/one",
                   save_interval="2ba", load_path=str(hybrid / "ckpt/hsdp/ep0-ba4"),
                   reliability={"trust_checkpoint": True})  # fmt: skip
    train_on(1, 2, hybrid, one)
    two = spec_for(mds_dir, "two-nodes", "HYBRID_SHARD", save_folder="ckpt/two",
                   load_path=str(hybrid / "ckpt/one/ep0-ba6"),
                   reliability={"trust_checkpoint": True})  # fmt: skip
    train_on(2, 2, hybrid, two)

    want, ref_steps = losses(hybrid, "hsdp"), steps_seen(hybrid / "hsdp")
    got_one, got_two = losses(hybrid, "one-node"), losses(hybrid, "two-nodes")
    assert got_one == pytest.approx({s: want[s] for s in range(5, STEPS + 1)}, rel=1e-5)
    assert got_two == pytest.approx({s: want[s] for s in (7, 8)}, rel=1e-5)
    assert steps_seen(hybrid / "one-node") == {s: ref_steps[s] for s in range(5, STEPS + 1)}
    assert steps_seen(hybrid / "two-nodes") == {s: ref_steps[s] for s in (7, 8)}


def ledger(prefix: Path) -> dict[tuple[int, int], list[str]]:
    """{(rank, step): sample hashes} of every rank's ledger."""
    out: dict[tuple[int, int], list[str]] = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert (row["rank"], row["step"]) not in out, f"step recorded twice in {path}"
            out[row["rank"], row["step"]] = row["samples"]
    return out


def test_lost_node_ends_the_run_in_bounded_time_and_resumes_bitwise(
    hybrid: Path, mds_dir: Path, tmp_path: Path
) -> None:
    """Every process of node 1 SIGKILLed in step 5 (checkpoints every 2 steps): node 0 ends
    within ``reliability.collective_timeout_s``, naming the lost ranks; the same command on both
    nodes resumes from step 4 with every sample trained on exactly once, and ends with the
    uninterrupted 2 x 2 run's losses and weights, bit for bit."""
    spec = spec_for(
        mds_dir,
        "lost",
        "HYBRID_SHARD",
        save_folder=str(tmp_path / "ckpt"),
        save_interval=f"{SAVE_EVERY}ba",
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
    assert losses(tmp_path, "lost") == losses(hybrid, "hsdp")  # one row per step, bitwise
    ref = torch.load(hybrid / "hsdp.weights.pt")
    resumed = torch.load(tmp_path / "cut2.weights.pt")
    assert ref.keys() == resumed.keys()
    for name in ref:
        assert torch.equal(ref[name], resumed[name]), name
