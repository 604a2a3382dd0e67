"""Synthetic token batches: the exact shapes of a pretraining run with no data and no tokenizer.

``train_loader.name: synthetic`` trains on uniform random token ids of
``dataset.max_seq_len``. A dense model costs the same on random ids as on text, so this is
what throughput benchmarks and cluster smoke tests use: nothing to download, convert or cache,
and no data loader stall can hide in the figures. Samples are a pure function of
``(shuffle_seed, index)``, so a run resumed on the same number of ranks sees the batches it
would have seen. As an eval set it needs ``eval_subset_num_batches`` (it never ends).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mpt_train.data.config import TextLoaderConfig

__all__ = ["RankStride", "SyntheticTokens", "build_synthetic_dataloader"]

#: Samples per "epoch": large enough that no benchmark or smoke test reaches the end.
SYNTHETIC_SAMPLES = 2**31 - 1


class SyntheticTokens(Dataset):
    """``{"input_ids": LongTensor[seq_len]}`` of uniform ids in ``[0, vocab_size)``."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        seed: int,
        emit_sequence_id: bool = False,
        num_samples: int = SYNTHETIC_SAMPLES,
    ) -> None:
        if vocab_size < 1 or seq_len < 1 or num_samples < 1:
            raise ValueError(
                f"vocab_size, seq_len and num_samples must be >= 1, got "
                f"{vocab_size}, {seq_len}, {num_samples}"
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.emit_sequence_id = emit_sequence_id
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range [0, {self.num_samples})")
        gen = torch.Generator().manual_seed(self.seed * SYNTHETIC_SAMPLES + idx)
        ids = torch.randint(self.vocab_size, (self.seq_len,), generator=gen, dtype=torch.long)
        item = {"input_ids": ids}
        if self.emit_sequence_id:
            item["sequence_id"] = torch.zeros_like(ids)  # one document per sample
        return item


class RankStride(DistributedSampler):
    """Rank ``r`` of ``w`` reads samples ``r, r + w, r + 2w, ...``, lazily.

    A ``DistributedSampler`` (Composer requires one on several ranks, and saves its position)
    whose index list is a ``range``: the parent's would materialise two billion ints.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples * self.num_replicas, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def build_synthetic_dataloader(
    cfg: TextLoaderConfig,
    vocab_size: int,
    device_batch_size: int,
    emit_sequence_id: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`SyntheticTokens`, rank ``r`` of ``w`` reading every ``w``-th
    sample from ``r`` (so a resumed run repeats its batches at the same world size).

    ``dataset.max_seq_len``, ``dataset.shuffle_seed``, ``num_workers``, ``prefetch_factor``,
    ``persistent_workers``, ``timeout`` and ``pin_memory`` apply; the data sources and the
    shuffle knobs are not read, and every batch is full (``drop_last``).
    """
    from composer.utils import dist

    dataset = SyntheticTokens(
        vocab_size, cfg.dataset.max_seq_len, cfg.dataset.shuffle_seed, emit_sequence_id
    )
    sampler = RankStride(dataset, dist.get_global_rank(), dist.get_world_size())
    extra = {}
    if cfg.num_workers > 0:  # torch rejects these without workers
        extra = {
            "prefetch_factor": cfg.prefetch_factor,
            "persistent_workers": cfg.persistent_workers,
            "timeout": cfg.timeout,
        }
    return DataLoader(
        dataset,
        batch_size=device_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        **extra,
    )
