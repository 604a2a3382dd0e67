"""A rank SIGKILLed mid-step in a 2-process FSDP run: the same command resumes from the newest
complete checkpoint; every sample is trained on exactly once and the final weights are those of
an uninterrupted run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.train.conftest import composer_cmd, run, tiny_spec, write_spec

STEPS, SAVE_EVERY, KILL_AFTER, WORLD = 8, 2, 5, 2


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
def test_rank_killed_mid_step_resumes_exactly(mds_dir: Path, tmp_path: Path) -> None:
    spec = tiny_spec(
        mds_dir,
        max_duration=f"{STEPS}ba",
        save_interval=f"{SAVE_EVERY}ba",
        fsdp={"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    )
    ref = write_spec(tmp_path / "ref.yaml", {**spec, "run_name": "ref"})
    cut = write_spec(
        tmp_path / "cut.yaml",
        {**spec, "run_name": "cut", "save_folder": str(tmp_path / "ckpt")},
    )
    script = str(REPO / "tests/reliability/fault_run.py")
    launch = [*composer_cmd(WORLD), script]
    run([*launch, "--ledger", str(tmp_path / "ref"), str(ref)], cwd=tmp_path)

    killed = run(
        [*launch, "--kill-at", str(KILL_AFTER), "1", "--ledger", str(tmp_path / "cut1"), str(cut)],
        cwd=tmp_path,
        check=False,
    )
    assert killed.returncode != 0, "the launcher must stop the run when a rank dies"
    run([*launch, "--ledger", str(tmp_path / "cut2"), str(cut)], cwd=tmp_path)

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
    # The checkpoint every rank resumed from was verified complete.
    assert (tmp_path / "ckpt" / f"ep0-ba{last_ckpt}.manifest.json").is_file()
