"""Throughput options keep the numbers: each is compared with the plain path on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpt_train.composer_model import ComposerMPT, shift_labels
from mpt_train.config import load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.model import MPTConfig, build_model
from mpt_train.model.loss import lm_loss
from mpt_train.trainer import train
from tests.training.conftest import tiny_spec


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        MPTConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=32, vocab_size=96, **kw)
    )


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("logit_scale", [None, 0.5])
def test_chunked_loss_equals_full_logits_loss_and_gradients(
    chunk: int, logit_scale: float | None
) -> None:
    ref, chunked = _model(logit_scale=logit_scale), _model(logit_scale=logit_scale)
    ids = torch.randint(0, 96, (2, 32))
    batch = {"input_ids": ids, "labels": torch.where(torch.rand(2, 32) < 0.3, -100, ids)}
    plain = ComposerMPT(ref)
    fused = ComposerMPT(chunked, loss_chunk_tokens=chunk)
    loss_a = plain.loss(ref(ids), batch)  # full logits, then cross-entropy
    loss_b = fused.loss(fused(batch), batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(ref.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(
            pb.grad, pa.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_lm_loss_ignores_masked_targets_only() -> None:
    x = torch.randn(1, 4, 8)
    w = torch.randn(10, 8)
    t = torch.tensor([[3, -100, 5, -100]])
    expected = torch.nn.functional.cross_entropy((x[0, [0, 2]] @ w.T), torch.tensor([3, 5]))
    torch.testing.assert_close(lm_loss(x, w, t, chunk_tokens=1), expected)
    assert shift_labels({"input_ids": torch.tensor([[1, 2, 3]])}).tolist() == [[2, 3, -100]]


def test_train_metrics_option_matches_loss_path(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked loss without train metrics trains to the same losses as the plain path."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for name, loss in (("plain", {"train_metrics": True}), ("chunked", {"chunk_tokens": 24})):
        spec = tiny_spec(mds_dir, run_name=name, max_duration="4ba", loss=loss)
        train(load_config_dict(spec))
        rows = read_metrics(tmp_path / f"runs/{name}/metrics.jsonl")
        runs[name] = [r["loss/train/total"] for r in rows]
        has_train_metric = any("metrics/train/LanguageCrossEntropy" in r for r in rows)
        assert has_train_metric == (name == "plain")
    assert runs["plain"] == pytest.approx(runs["chunked"], rel=1e-5)


def test_per_block_compile_keeps_losses(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compile path (per-block torch.compile) through the trainer gives the eager losses.

    ``aot_eager`` traces and partitions like inductor but runs eager kernels: inductor's C++
    codegen for CPU is not what GPU runs use, and needs a compiler toolchain tuned per machine.
    """
    monkeypatch.chdir(tmp_path)
    runs = {}
    for name, compile_cfg in (
        ("eager", {"enabled": False}),
        ("compiled", {"enabled": True, "backend": "aot_eager"}),
    ):
        spec = tiny_spec(mds_dir, run_name=name, max_duration="3ba", compile=compile_cfg)
        train(load_config_dict(spec))
        runs[name] = [
            r["loss/train/total"] for r in read_metrics(tmp_path / f"runs/{name}/metrics.jsonl")
        ]
    assert runs["eager"] == pytest.approx(runs["compiled"], rel=1e-5)


def test_activation_checkpointing_applies_on_one_rank_and_keeps_losses(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    monkeypatch.chdir(tmp_path)
    runs, wrapped = {}, {}
    for name, ac in (("plain", False), ("ac", True)):
        spec = tiny_spec(mds_dir, run_name=name, max_duration="3ba",
                         fsdp={"activation_checkpointing": ac})  # fmt: skip
        trainer = train(load_config_dict(spec))
        wrapped[name] = sum(isinstance(m, CheckpointWrapper) for m in trainer.state.model.modules())
        runs[name] = [
            r["loss/train/total"] for r in read_metrics(tmp_path / f"runs/{name}/metrics.jsonl")
        ]
    assert wrapped == {"plain": 0, "ac": 2}  # both blocks of the tiny model
    assert runs["plain"] == pytest.approx(runs["ac"], rel=1e-6)
