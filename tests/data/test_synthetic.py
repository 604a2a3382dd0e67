"""Synthetic batches: real shapes with no data and no tokenizer (benchmarks, smoke tests)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mpt_train.config import ConfigError, load_config_dict
from mpt_train.data.config import TextLoaderConfig
from mpt_train.data.synthetic import RankStride, SyntheticTokens, build_synthetic_dataloader
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.train.builder import train


def test_samples_are_a_function_of_seed_and_index() -> None:
    ds = SyntheticTokens(vocab_size=50, seq_len=64, seed=3, emit_sequence_id=True)
    a, b = ds[5], SyntheticTokens(50, 64, seed=3)[5]
    assert a["input_ids"].shape == (64,) and a["input_ids"].dtype == torch.long
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], ds[6]["input_ids"])
    assert not torch.equal(a["input_ids"], SyntheticTokens(50, 64, seed=4)[5]["input_ids"])
    ids = torch.stack([ds[i]["input_ids"] for i in range(200)])
    assert ids.min() == 0 and ids.max() == 49  # the whole vocabulary, nothing past it
    assert torch.equal(a["sequence_id"], torch.zeros(64, dtype=torch.long))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_ranks_read_disjoint_samples_without_an_index_list() -> None:
    from torch.utils.data import DistributedSampler

    small = SyntheticTokens(8, 4, seed=0, num_samples=10)
    per_rank = [list(RankStride(small, rank, 3)) for rank in range(3)]
    assert per_rank == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    huge = RankStride(SyntheticTokens(8, 4, seed=0), 1, 8)  # lazy: no 2-billion-entry list
    assert len(huge) == (2**31 - 1) // 8 and next(iter(huge)) == 1
    assert isinstance(huge, DistributedSampler)  # what Composer requires on several ranks


def test_dataloader_yields_batches_of_the_section_shape() -> None:
    loader = TextLoaderConfig(name="synthetic", num_workers=0)
    loader.dataset.max_seq_len = 16
    batch = next(iter(build_synthetic_dataloader(loader, vocab_size=100, device_batch_size=4)))
    assert batch["input_ids"].shape == (4, 16) and set(batch) == {"input_ids"}


def test_unknown_loader_kind_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"name: got 'random'.*text, synthetic"):
        TextLoaderConfig(name="random")


def _spec(**top) -> dict:
    spec = {
        "run_name": "synthetic",
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 2, "max_seq_len": 32,
                  "vocab_size": 64, "attn_config": {"impl": "sdpa"}},
        "tokenizer": {"name": "no-such-org/no-such-tokenizer"},
        "train_loader": {"name": "synthetic", "num_workers": 0,
                         "dataset": {"remote": "s3://not-read/mds", "max_seq_len": 32}},
        "max_duration": "4ba",
        "global_train_batch_size": 4,
        "optimizer": {"lr": 1e-2},
        "scheduler": {"t_warmup": "0ba"},
    }  # fmt: skip
    return {**spec, **top}


def test_a_resumed_synthetic_run_sees_the_batches_it_would_have_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpt_train.train.builder import build_trainer
    from tests.reliability.faults import StopAfter

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train(load_config_dict(_spec(run_name="whole", max_duration="6ba")))
    whole = [r["loss/train/total"] for r in read_metrics(tmp_path / "runs/whole/metrics.jsonl")]
    cut = _spec(run_name="cut", max_duration="6ba", save_folder="ckpt", save_interval="3ba")
    trainer = build_trainer(load_config_dict(cut), extra_callbacks=[StopAfter(3)])
    trainer.fit()
    trainer.close()
    train(load_config_dict(cut))  # autoresume from batch 3
    rows = read_metrics(tmp_path / "runs/cut/metrics.jsonl")
    assert [r["loss/train/total"] for r in rows if r["step"] > 3] == whole[3:]


def test_trains_with_no_data_and_no_reachable_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synthetic run never opens a dataset or loads the tokenizer (a cluster smoke test)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = _spec()
    train(load_config_dict(spec))
    losses = [
        r["loss/train/total"] for r in read_metrics(tmp_path / "runs/synthetic/metrics.jsonl")
    ]
    assert len(losses) == 4
    # Uniform noise cannot be predicted: no batch's loss goes far below its entropy, ln(64).
    assert all(math.isfinite(x) and x > math.log(64) - 0.3 for x in losses), losses


def test_a_synthetic_eval_set_needs_a_batch_limit() -> None:
    from mpt_train.config.checks import check_spec

    spec = {
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "max_seq_len": 32,
                  "vocab_size": 64, "attn_config": {"impl": "sdpa"}},
        "train_loader": {"name": "synthetic", "dataset": {"max_seq_len": 32}},
        "eval_loader": {"name": "synthetic", "dataset": {"max_seq_len": 32}},
        "max_duration": "4ba",
        "global_train_batch_size": 4,
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"eval_loader\.name: a synthetic eval set never ends"):
        check_spec(load_config_dict(spec))
    check_spec(load_config_dict({**spec, "eval_subset_num_batches": 2}))
