"""Fine-tuning row order: shuffled after packing, a new order per epoch, reproducible on resume.

First-fit-decreasing packing emits rows longest-first; without a shuffle after it every epoch
would be the same long-to-short curriculum.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from composer import Callback, Logger, State
from torch.utils.data import DataLoader, DistributedSampler

from mpt_train.config import load_config_dict
from mpt_train.data import load_tokenizer
from mpt_train.data.finetune import (
    FinetuneDataset,
    FinetuneDatasetConfig,
    FinetuneLoaderConfig,
    build_finetune_dataloader,
    tokenize_example,
)
from mpt_train.train.builder import build_trainer
from tests.train.conftest import tiny_spec

SEQ = 64
WORDS = ["json", "os", "sys", "re", "math", "time", "io", "csv", "zlib", "gzip", "heapq"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mpt-train/tiny-bpe")


@pytest.fixture
def records() -> list[dict[str, str]]:
    """60 distinct examples of random lengths (2 to ~50 tokens)."""
    rng = random.Random(0)
    return [
        {
            "prompt": f"Task {i}: list modules.",
            "response": " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 30))),
        }
        for i in range(60)
    ]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _examples(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The token ids of every example packed into a batch, row by row."""
    out = []
    for ids, seq in zip(batch["input_ids"], batch["sequence_id"]):
        for doc in range(int(seq.max()) + 1):
            out.append(tuple(ids[seq == doc].tolist()))
    return out


def _epoch(loader: DataLoader, epoch: int) -> list[tuple[int, ...]]:
    """Examples in the order one epoch trains on them, with the epoch set as Composer does."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    return [ex for batch in loader for ex in _examples(batch)]


def test_packed_rows_are_not_ordered_by_length(tok, records, tmp_path: Path) -> None:
    """Rows do not run from the longest example down to the shortest."""
    path = _jsonl(tmp_path / "d.jsonl", records)
    ds = FinetuneDataset(FinetuneDatasetConfig(path=str(path), max_seq_len=SEQ), tok)
    longest = [int(torch.bincount(r["sequence_id"]).max()) for r in ds.rows]
    assert len(longest) > 10
    assert longest != sorted(longest, reverse=True)
    lengths = [len(r["input_ids"]) for r in ds.rows]
    assert lengths != sorted(lengths, reverse=True)
    # The same seed packs and orders the rows identically.
    again = FinetuneDataset(FinetuneDatasetConfig(path=str(path), max_seq_len=SEQ), tok)
    assert [r["input_ids"].tolist() for r in again.rows] == [
        r["input_ids"].tolist() for r in ds.rows
    ]


def test_each_epoch_has_its_own_order_and_every_example_once(tok, records, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", records)
    cfg = FinetuneLoaderConfig(
        dataset=FinetuneDatasetConfig(path=str(path), max_seq_len=SEQ), drop_last=False
    )
    loader = build_finetune_dataloader(cfg, tok, 4)
    expected = Counter(
        tuple(tokenize_example([(r["prompt"], False), (r["response"], True)], tok, add_eos=True)[0])
        for r in records
    )
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    assert Counter(first) == Counter(second) == expected
    assert first != second
    # The order is a function of seed and epoch: a new loader (a resumed run) repeats it.
    fresh = build_finetune_dataloader(cfg, tok, 4)
    assert _epoch(fresh, 1) == second and _epoch(fresh, 0) == first
    other_seed = FinetuneLoaderConfig(
        dataset=FinetuneDatasetConfig(path=str(path), max_seq_len=SEQ, shuffle_seed=5),
        drop_last=False,
    )
    assert _epoch(build_finetune_dataloader(other_seed, tok, 4), 0) != first
    # shuffle=false keeps one fixed order.
    fixed = FinetuneLoaderConfig(
        dataset=FinetuneDatasetConfig(path=str(path), max_seq_len=SEQ, shuffle=False),
        drop_last=False,
    )
    unshuffled = build_finetune_dataloader(fixed, tok, 4)
    assert _epoch(unshuffled, 0) == _epoch(unshuffled, 1)


class _RecordBatches(Callback):
    """Remembers the input ids of every training batch, by batch number."""

    def __init__(self) -> None:
        self.batches: dict[int, list[list[int]]] = {}

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.batches[int(state.timestamp.batch) + 1] = state.batch["input_ids"].tolist()


def _spec(data: Path, tmp_path: Path, **top) -> dict:
    spec = tiny_spec("unused", run_name="order", max_duration="2ep", **top)
    del spec["train_loader"]
    spec["model"]["attn_config"]["attn_uses_sequence_id"] = True
    spec["finetune_loader"] = {
        "dataset": {"path": str(data), "max_seq_len": 32},
        "drop_last": True,
    }
    spec["save_folder"] = str(tmp_path / "ckpt")
    spec["save_interval"] = "3ba"
    return spec


def test_trainer_reshuffles_per_epoch_and_resumes_on_the_same_batches(
    records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Composer sets the sampler's epoch; a run resumed mid-epoch sees the batches it would have."""
    data = _jsonl(tmp_path / "d.jsonl", records[:24])
    monkeypatch.chdir(tmp_path)
    full = _RecordBatches()
    trainer = build_trainer(load_config_dict(_spec(data, tmp_path)), extra_callbacks=[full])
    trainer.fit()
    trainer.close()
    per_epoch = len(full.batches) // 2
    assert per_epoch >= 4 and len(full.batches) == 2 * per_epoch
    epoch0 = [full.batches[b] for b in range(1, per_epoch + 1)]
    epoch1 = [full.batches[b] for b in range(per_epoch + 1, 2 * per_epoch + 1)]
    assert epoch0 != epoch1
    rows = {tuple(r) for b in epoch0 + epoch1 for r in b}
    for epoch in (epoch0, epoch1):  # no row twice (drop_last may leave out a few)
        assert len({tuple(r) for b in epoch for r in b}) == 4 * per_epoch < len(rows) + 4

    # Resume from a checkpoint inside the second epoch.
    step = next(b for b in range(3, 2 * per_epoch, 3) if b > per_epoch)
    resumed = _RecordBatches()
    spec = _spec(
        data,
        tmp_path,
        load_path=str(tmp_path / "ckpt" / f"ep1-ba{step}-rank0.pt"),
        reliability={"trust_checkpoint": True},
    )
    spec["run_name"], spec["save_folder"] = "order-resumed", str(tmp_path / "ckpt2")
    trainer = build_trainer(load_config_dict(spec), extra_callbacks=[resumed])
    trainer.fit()
    trainer.close()
    assert sorted(resumed.batches) == list(range(step + 1, 2 * per_epoch + 1))
    assert all(resumed.batches[b] == full.batches[b] for b in resumed.batches)
