"""Two real ranks (spawned processes, gloo): disjoint samples that cover the epoch, and
mid-epoch resumption from the state Composer saves on rank 0."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from tests.s3_server import find_free_port

# Streaming runs background threads; a hang must fail the test, not the CI job.
pytestmark = pytest.mark.timeout(180)

WORLD = 2
BATCH = 4
RESUME_AFTER = 3  # batches per rank before the simulated interruption


def _rank_main(rank: int, port: int, data: str, out_dir: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import torch.distributed as dist

    from mpt_train.data import TextDatasetConfig, TextLoaderConfig, build_text_dataloader

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = TextLoaderConfig(
        dataset=TextDatasetConfig(local=data, max_seq_len=8, shuffle=True, shuffle_seed=17),
        num_workers=0,
    )

    def rows(loader) -> list[list[int]]:
        return [r[:3] for b in loader for r in b["input_ids"].tolist()]

    loader = build_text_dataloader(cfg, None, BATCH)
    epoch = rows(loader)
    state = loader.dataset.state_dict(num_samples=RESUME_AFTER * BATCH * WORLD, from_beginning=True)
    del loader
    gc.collect()
    dist.barrier()

    resumed_loader = build_text_dataloader(cfg, None, BATCH)
    resumed_loader.dataset.load_state_dict(state)  # Composer loads rank 0's state everywhere
    resumed = rows(resumed_loader)
    del resumed_loader
    gc.collect()
    dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"epoch": epoch, "resumed": resumed}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_disjoint_cover_and_resume(tmp_path: Path) -> None:
    from tests.data.test_data_text_dataset import numbered, write_mds

    n = 160
    data = write_mds(tmp_path / "data", numbered(n, 8, marker=1))
    mp.spawn(_rank_main, args=(find_free_port(), str(data), str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    per_rank = [{tuple(r) for r in res["epoch"]} for res in results]
    assert all(len(res["epoch"]) == n // WORLD for res in results)
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {(1, i // 1000, i % 1000) for i in range(n)}

    for res in results:
        assert res["resumed"] == res["epoch"][RESUME_AFTER * BATCH :]
    assert np.asarray(results[0]["epoch"]).shape == (n // WORLD, 3)
