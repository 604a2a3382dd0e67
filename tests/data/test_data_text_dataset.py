"""The streaming text dataset and dataloader: samples, sequence ids, resumption, mixtures, S3."""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mpt_train.data import (
    StreamConfig,
    TextDatasetConfig,
    TextLoaderConfig,
    build_text_dataloader,
)
from mpt_train.data.convert import ConvertOptions, convert_corpus
from mpt_train.data.text_dataset import sequence_ids
from mpt_train.errors import ConfigError

# Streaming runs background threads; a hang must fail the test, not the CI job.
pytestmark = pytest.mark.timeout(180)


def write_mds(root: Path, rows: list[np.ndarray]) -> Path:
    """A train split of fixed-length uint16 samples, written directly with MDSWriter."""
    from streaming import MDSWriter

    length = len(rows[0])
    with MDSWriter(
        out=str(root / "train"),
        columns={"tokens": f"ndarray:uint16:{length}"},
        compression="zstd",
        hashes=["xxh3_64"],
        size_limit=1 << 14,
    ) as writer:
        for row in rows:
            writer.write({"tokens": np.asarray(row, dtype=np.uint16)})
    return root


def numbered(n: int, length: int, marker: int) -> list[np.ndarray]:
    """Samples whose first token names the stream and second/third their index."""
    return [np.array([marker, i // 1000, i % 1000] + [7] * (length - 3)) for i in range(n)]


def loader_cfg(workers: int = 0, **dataset) -> TextLoaderConfig:
    return TextLoaderConfig(dataset=TextDatasetConfig(**dataset), num_workers=workers)


@pytest.fixture
def corpus_dataset(small_corpus, tmp_path: Path) -> Path:
    path, _ = small_corpus
    out = tmp_path / "ds"
    convert_corpus(
        ConvertOptions(
            inputs=[str(path)], out=str(out), concat_tokens=48, progress=False, workers=1
        )
    )
    return out


def test_samples_are_truncated_to_max_seq_len(corpus_dataset: Path, tmp_path: Path) -> None:
    from tests.data.data_helpers import read_split

    stored = read_split(str(corpus_dataset), "train", tmp_path / "ref")
    cfg = loader_cfg(
        remote=str(corpus_dataset), local=str(tmp_path / "c"), max_seq_len=32, shuffle=False
    )
    batch = next(iter(build_text_dataloader(cfg, None, 4)))
    assert set(batch) == {"input_ids"}
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].shape == (4, 32)
    assert batch["input_ids"].tolist() == stored[:4, :32].tolist()


def test_shorter_samples_than_max_seq_len_are_an_error(corpus_dataset: Path, tmp_path) -> None:
    cfg = loader_cfg(remote=str(corpus_dataset), local=str(tmp_path / "c"), max_seq_len=49)
    with pytest.raises(ValueError, match="48 tokens, fewer than max_seq_len=49"):
        next(iter(build_text_dataloader(cfg, None, 2)))


def test_sequence_id_follows_eos(corpus_dataset: Path, tmp_path: Path, tokenizer) -> None:
    assert sequence_ids(torch.tensor([5, 6, 0, 7, 0, 8]), 0).tolist() == [0, 0, 0, 1, 1, 2]
    cfg = loader_cfg(
        remote=str(corpus_dataset), local=str(tmp_path / "c"), max_seq_len=48, shuffle=False
    )
    batches = list(build_text_dataloader(cfg, tokenizer, 8, emit_sequence_id=True))
    ids = torch.cat([b["input_ids"] for b in batches])
    seq = torch.cat([b["sequence_id"] for b in batches])
    assert (ids == 0).any()
    for row_ids, row_seq in zip(ids, seq):
        eos_at = (row_ids == 0).nonzero().flatten().tolist()
        expected = [sum(1 for e in eos_at if e < j) for j in range(len(row_ids))]
        assert row_seq.tolist() == expected


def test_workers_do_not_change_the_sample_order(corpus_dataset: Path, tmp_path: Path) -> None:
    def epoch(workers: int) -> list[list[int]]:
        cfg = loader_cfg(
            workers,
            remote=str(corpus_dataset),
            local=str(tmp_path / f"c{workers}"),
            max_seq_len=16,
            shuffle=True,
            shuffle_seed=3,
        )
        cfg.prefetch_factor, cfg.persistent_workers = 2, True
        loader = build_text_dataloader(cfg, None, 4)
        rows = [row for b in loader for row in b["input_ids"].tolist()]
        del loader
        gc.collect()
        return rows

    zero, two = epoch(0), epoch(2)
    assert len(zero) >= 40
    assert zero == two


@pytest.mark.parametrize("workers", [0, 1])
def test_resumption_continues_with_the_next_batch(
    corpus_dataset: Path, tmp_path: Path, workers: int
) -> None:
    batch, k = 3, 4
    cfg = loader_cfg(
        workers,
        remote=str(corpus_dataset),
        local=str(tmp_path / "c"),
        max_seq_len=48,
        shuffle=True,
        shuffle_seed=11,
    )
    cfg.persistent_workers = False
    loader = build_text_dataloader(cfg, None, batch)
    full = [b["input_ids"] for b in loader]
    assert len(full) > k + 2
    # Composer saves dataset.state_dict(samples seen this epoch, from_beginning=True).
    state = loader.dataset.state_dict(num_samples=k * batch, from_beginning=True)
    del loader
    gc.collect()

    resumed_loader = build_text_dataloader(cfg, None, batch)
    resumed_loader.dataset.load_state_dict(state)
    resumed = [b["input_ids"] for b in resumed_loader]
    assert len(resumed) == len(full) - k
    for a, b in zip(resumed, full[k:]):
        assert torch.equal(a, b)


def test_mixture_proportions_within_two_percent(tmp_path: Path) -> None:
    a = write_mds(tmp_path / "a", numbered(600, 8, marker=1))
    b = write_mds(tmp_path / "b", numbered(300, 8, marker=2))
    streams = {
        "a": StreamConfig(local=str(a), proportion=0.7),
        "b": StreamConfig(local=str(b), proportion=0.3),
    }
    cfg = loader_cfg(streams=streams, max_seq_len=8, epoch_size=2000, shuffle=True)
    loader = build_text_dataloader(cfg, None, 10)
    counts = Counter(int(row[0]) for batch in loader for row in batch["input_ids"])
    total = sum(counts.values())
    assert total == 2000
    assert abs(counts[1] / total - 0.7) <= 0.02
    assert abs(counts[2] / total - 0.3) <= 0.02


def test_mixture_repeat_and_choose(tmp_path: Path) -> None:
    a = write_mds(tmp_path / "a", numbered(200, 8, marker=1))
    b = write_mds(tmp_path / "b", numbered(100, 8, marker=2))
    streams = {
        "a": StreamConfig(local=str(a), choose=50),
        "b": StreamConfig(local=str(b), repeat=2),
    }
    loader = build_text_dataloader(loader_cfg(streams=streams, max_seq_len=8), None, 10)
    rows = [tuple(r[:3]) for batch in loader for r in batch["input_ids"].tolist()]
    counts = Counter(r[0] for r in rows)
    assert counts == {1: 50, 2: 200}
    assert all(v == 2 for k, v in Counter(r for r in rows if r[0] == 2).items())


def test_reads_from_s3_like_from_local(
    small_corpus, corpus_dataset: Path, tmp_path: Path, s3_prefix: str
) -> None:
    path, _ = small_corpus
    convert_corpus(
        ConvertOptions(
            inputs=[str(path)], out=s3_prefix, concat_tokens=48, progress=False, workers=1
        )
    )

    def rows(remote: str, local: Path) -> list[list[int]]:
        cfg = loader_cfg(
            remote=remote,
            local=str(local),
            max_seq_len=48,
            shuffle_seed=5,
            cache_limit="10mb",
            predownload=8,
        )
        return [r for b in build_text_dataloader(cfg, None, 4) for r in b["input_ids"].tolist()]

    from_s3 = rows(s3_prefix, tmp_path / "s3cache")
    assert from_s3 == rows(str(corpus_dataset), tmp_path / "localcache")
    assert len(from_s3) > 100


def test_config_is_structured_and_validated() -> None:
    schema = OmegaConf.structured(TextLoaderConfig)
    merged = OmegaConf.merge(
        schema,
        {
            "num_workers": 0,
            "dataset": {
                "local": "/data",
                "max_seq_len": 128,
                "streams": None,
                "shuffle_block_size": 1000,
            },
        },
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, TextLoaderConfig) and cfg.dataset.max_seq_len == 128
    with pytest.raises(Exception, match=r"dataset\.max_seq_lenn"):
        OmegaConf.merge(schema, {"dataset": {"max_seq_lenn": 1}})
    with pytest.raises(ConfigError, match="shuffle_algo") as info:
        TextDatasetConfig(shuffle_algo="py9")
    assert info.value.key == "shuffle_algo"
    with pytest.raises(ConfigError) as info:
        TextDatasetConfig(streams={"a": StreamConfig(local="/x", proportion=0.5, repeat=2.0)})
    assert info.value.key == "streams.a.repeat"
    with pytest.raises(ConfigError) as info:
        build_text_dataloader(TextLoaderConfig(), None, 2)
    assert info.value.key == "dataset.local"


def test_num_workers_zero_drops_worker_only_options(corpus_dataset: Path) -> None:
    cfg = TextLoaderConfig(
        dataset=TextDatasetConfig(local=str(corpus_dataset), max_seq_len=8),
        num_workers=0,
        prefetch_factor=4,
        persistent_workers=True,
    )
    loader = build_text_dataloader(cfg, None, 2)
    assert loader.num_workers == 0
    assert loader.prefetch_factor is None
    assert loader.persistent_workers is False
    assert next(iter(loader))["input_ids"].shape == (2, 8)
