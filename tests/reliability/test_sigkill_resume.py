"""A rank SIGKILLed mid-step in a 2-process FSDP run that saves to a bucket: the same command,
run from a fresh working folder (nothing local survives), resumes from the newest complete
checkpoint in the bucket; every sample is trained on exactly once and the final weights are
those of an uninterrupted run.

The kill comes in the step right after a save, before any later batch end: the bucket's
``latest`` pointer must have moved with the save itself, or the relaunch would start over."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.train.conftest import composer_cmd, run, tiny_spec, write_spec

STEPS, SAVE_EVERY, KILL_AFTER, WORLD = 8, 2, 4, 2


def ledger(prefix: Path) -> dict[tuple[int, int], list[str]]:
    """{(rank, step): sample hashes}; a step recorded twice would be a sample seen twice."""
    out: dict[tuple[int, int], list[str]] = {}
    for rank in range(WORLD):
        for line in Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            key = (row["rank"], row["step"])
            assert key not in out, f"step {key} recorded twice in {prefix}"
            out[key] = row["samples"]
    return out


@pytest.mark.slow
def test_rank_killed_mid_step_resumes_exactly_from_the_bucket(
    mds_dir: Path, tmp_path: Path, s3_server
) -> None:
    spec = tiny_spec(
        mds_dir,
        max_duration=f"{STEPS}ba",
        save_interval=f"{SAVE_EVERY}ba",
        fsdp={"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    )
    ref = write_spec(tmp_path / "ref.yaml", {**spec, "run_name": "ref"})
    folder = s3_server.url("killed", "{run_name}")
    cut = write_spec(tmp_path / "cut.yaml", {**spec, "run_name": "cut", "save_folder": folder})
    script = str(REPO / "tests/reliability/fault_run.py")
    launch = [*composer_cmd(WORLD), script]
    env = s3_server.env
    run([*launch, "--ledger", str(tmp_path / "ref"), str(ref)], cwd=tmp_path, env=env)

    killed = run(
        [*launch, "--kill-at", str(KILL_AFTER), "1", "--ledger", str(tmp_path / "cut1"), str(cut)],
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert killed.returncode != 0, "the launcher must stop the run when a rank dies"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([*launch, "--ledger", str(tmp_path / "cut2"), str(cut)], cwd=elsewhere, env=env)

    expected = ledger(tmp_path / "ref")
    first, second = ledger(tmp_path / "cut1"), ledger(tmp_path / "cut2")
    last_ckpt = KILL_AFTER // SAVE_EVERY * SAVE_EVERY
    assert {s for _, s in first} == set(range(1, KILL_AFTER + 1))
    assert {s for _, s in second} == set(range(last_ckpt + 1, STEPS + 1)), "resumed elsewhere"
    committed = {k: v for k, v in first.items() if k[1] <= last_ckpt} | second
    assert committed == expected, "a rank trained on different samples than the reference"
    seen = Counter(h for v in committed.values() for h in v)
    assert seen == Counter(h for v in expected.values() for h in v)
    assert sum(seen.values()) == STEPS * 4

    want = torch.load(tmp_path / "ref.weights.pt")
    got = torch.load(tmp_path / "cut2.weights.pt")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # The checkpoint every rank resumed from was complete: its manifest was uploaded last.
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="killed/cut/")
    names = {o["Key"] for o in listed.get("Contents", [])}
    assert f"killed/cut/ep0-ba{last_ckpt}.manifest.json" in names
