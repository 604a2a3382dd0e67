"""Throughput options keep the numbers: each is compared with the plain path on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpt_train.compat import flex_attention_trains_on_cpu
from mpt_train.config import load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.model import MPTConfig, build_model
from mpt_train.model.loss import lm_loss
from mpt_train.train.builder import train
from mpt_train.train.composer_model import ComposerMPT, shift_labels
from tests.train.conftest import tiny_spec


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = {"d_model": 32, "n_heads": 2, "n_layers": 2, "max_seq_len": 32, "vocab_size": 96}
    return build_model(MPTConfig(**{**shape, **kw}))


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


@pytest.mark.parametrize("chunk", [0, 24])
def test_compiled_loss_head_traces_once_and_matches_eager(chunk: int) -> None:
    """``compile.loss``: the head matmul + cross-entropy compiled (as the trainer does, under
    bf16 autocast, plain or per checkpointed chunk): one graph per chunk shape, no graph break,
    and the eager loss and gradients. ``aot_eager`` traces as inductor does, without codegen."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager, compiled = _model(), _model()
    torch._dynamo.reset()
    counters.clear()
    compiled.loss_head.compile(backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 96, (2, 32))
    targets = torch.where(torch.rand(2, 32) < 0.3, -100, shift_labels({"input_ids": ids}))
    losses = []
    for m in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(ids, targets=targets, loss_chunk_tokens=chunk)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (name, pa), pb in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)
    assert compiled.loss_head._compiled_call_impl is not None
    assert not counters["graph_break"]
    # 64 tokens: one shape unchunked; chunks of 24, 24 and 16 tokens: two shapes.
    assert counters["stats"]["unique_graphs"] == (1 if chunk == 0 else 2)
    torch._dynamo.reset()


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
        trainer = train(load_config_dict(spec))
        compiled = [b._compiled_call_impl is not None for b in trainer.state.model.model.blocks]
        assert all(compiled) == (name == "compiled") and any(compiled) == all(compiled)
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


def test_pretraining_token_counts_come_from_shapes_and_equal_the_counted_ones(
    mds_dir: Path,
) -> None:
    """Composer asks for token counts before every microbatch: for text batches they must
    not read device memory (a device-to-host copy stalls the GPU), yet equal the real counts."""
    from mpt_train.data import TextLoaderConfig, build_text_dataloader
    from mpt_train.train.data import pretrain_token_counts, token_counts

    loader = TextLoaderConfig(num_workers=0)
    loader.dataset.local, loader.dataset.max_seq_len = str(mds_dir), 32
    dl = build_text_dataloader(loader, None, 3, emit_sequence_id=False)
    loader.dataset.eos_token_id = 0
    dl_seq = build_text_dataloader(loader, None, 3, emit_sequence_id=True)
    for batch in (next(iter(dl)), next(iter(dl_seq))):
        assert pretrain_token_counts(batch) == token_counts(batch) == {
            "total": 96, "loss_generating": 93,
        }  # fmt: skip
        meta = {k: torch.empty_like(v, device="meta") for k, v in batch.items()}
        assert pretrain_token_counts(meta) == token_counts(batch)  # shapes only
        with pytest.raises((RuntimeError, NotImplementedError)):
            token_counts(meta)  # the counting path does read the data


def test_flops_per_batch_is_the_same_on_every_call() -> None:
    model = _model()
    first = model.flops_per_batch(2, 32)
    assert model.flops_per_batch(2, 32) == first
    n = sum(p.numel() for p in model.parameters())
    assert first == 6 * n * 64 + 12 * 2 * 32 * 32 * 64


@pytest.mark.parametrize(
    "impl, documents, seq_len, dynamic",
    [
        ("flex", False, 32, False),
        ("flex", True, 32, False),
        ("flex", True, 256, False),
        ("sdpa", False, 32, False),  # ALiBi folded into the heads
        ("sdpa", True, 32, False),
        ("sdpa", False, 40, True),  # symbolic lengths (40, then 48): no recompile
    ],
)
def test_compiled_blocks_trace_whole_once_for_all_layers(
    impl: str, documents: bool, seq_len: int, dynamic: bool
) -> None:
    """The GPU fast path (FlexAttention, or SDPA with folded ALiBi, inside per-block
    torch.compile) must trace each block as one graph (a graph break splits the fused
    kernels), compile once for every layer (past dynamo's recompile limit of 8 the remaining
    layers would silently run eagerly), not recompile for new data, and train like the eager
    model. ``aot_eager`` traces exactly as inductor does, without the code generation that
    needs a GPU. At 256 tokens the document block mask is the one classified from block id
    ranges."""
    if impl == "flex" and not flex_attention_trains_on_cpu():
        pytest.skip("this torch's FlexAttention has no CPU backward (GPU only)")
    import torch._dynamo
    from torch._dynamo.utils import counters

    def model() -> torch.nn.Module:
        return _model(n_layers=10 if not documents else 3, max_seq_len=seq_len + 8,
                      attn_config={"impl": impl, "attn_uses_sequence_id": documents})  # fmt: skip

    eager, compiled = model(), model()
    torch._dynamo.reset()
    counters.clear()
    for block in compiled.blocks:
        block.compile(backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for step in range(2):  # new ids (and documents) on the second step
        length = seq_len + 8 * step if dynamic else seq_len
        ids = torch.randint(0, 96, (2, length))
        seq_id = torch.cumsum(torch.rand(2, length) < 0.1, dim=1) if documents else None
        for m in (eager, compiled):
            m.zero_grad()
            m(ids, sequence_id=seq_id, targets=shift_labels({"input_ids": ids})).backward()
        for (name, pa), pb in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=name)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == graphs <= 2  # one block graph (+ the mask's)
    torch._dynamo.reset()


def test_all_throughput_options_together_train_like_the_plain_path(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path of the pretraining specs (FlexAttention inside compiled blocks, a compiled
    chunked loss, foreach decoupled AdamW, no train metrics, activation checkpointing) against the
    plainest one (reference attention, eager, Composer's AdamW loop, full logits + metrics)."""
    monkeypatch.chdir(tmp_path)
    plain = {
        "model": {"attn_config": {"impl": "torch"}},
        "optimizer": {"implementation": "composer"},
        "loss": {"train_metrics": True},
    }
    fast = {
        # FlexAttention where this torch trains it on CPU, else SDPA with ALiBi folded in.
        "model": {"attn_config": {"impl": "flex" if flex_attention_trains_on_cpu() else "sdpa"}},
        "compile": {"enabled": True, "backend": "aot_eager", "fullgraph": True},
        "optimizer": {"implementation": "foreach"},
        "loss": {"chunk_tokens": 40},
        "fsdp": {"activation_checkpointing": True},
    }
    losses = {}
    for name, options in (("plain", plain), ("fast", fast)):
        spec = tiny_spec(mds_dir, run_name=name, max_duration="5ba")
        model = {**spec["model"], **options.pop("model")}
        spec.update(model=model, **options)
        trainer = train(load_config_dict(spec))
        loss_head = trainer.state.model.model.loss_head  # compile.loss defaults to true
        assert (loss_head._compiled_call_impl is not None) == (name == "fast")
        rows = read_metrics(tmp_path / f"runs/{name}/metrics.jsonl")
        losses[name] = [r["loss/train/total"] for r in rows]
    assert len(losses["fast"]) == 5
    assert losses["fast"] == pytest.approx(losses["plain"], rel=1e-4)


@pytest.mark.slow
def test_fast_path_under_two_rank_fsdp_trains_like_the_plain_path(
    mds_dir: Path, tmp_path: Path
) -> None:
    """FlexAttention in compiled blocks, sharded by FSDP2 over two real processes (gloo), with
    the chunked loss reading the gathered tied head: the losses of the plain sharded run."""
    from tests.helpers import REPO
    from tests.train.conftest import composer_cmd, run, write_spec

    base = tiny_spec(mds_dir, max_duration="4ba", fsdp={"sharding_strategy": "FULL_SHARD"})
    fast = {
        **base,
        "run_name": "fast",
        "model": {**base["model"], "attn_config": {"impl": "flex"}},
        "compile": {"enabled": True, "backend": "aot_eager", "fullgraph": True},
        "loss": {"chunk_tokens": 40},
    }
    specs = ({**base, "run_name": "plain"}, fast)
    paths = [str(write_spec(tmp_path / f"{s['run_name']}.yaml", s)) for s in specs]
    run([*composer_cmd(2), str(REPO / "tests/train/train_many.py"), *paths], cwd=tmp_path)
    losses = {}
    for spec in specs:
        rows = read_metrics(tmp_path / f"runs/{spec['run_name']}/metrics.jsonl")
        losses[spec["run_name"]] = [r["loss/train/total"] for r in rows]
    assert len(losses["fast"]) == 4
    assert losses["fast"] == pytest.approx(losses["plain"], rel=1e-5)


def test_flex_inside_a_compiled_block_is_left_to_that_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU ``flex_attend`` uses its own compiled FlexAttention; inside a compiled block that
    would break the block's graph (and fail under ``fullgraph``): the outer compile must get
    the plain op and fuse it itself."""
    import torch._dynamo

    import mpt_train.model.flex as flex
    from mpt_train.model.alibi import alibi_slopes

    def separately_compiled() -> None:
        raise AssertionError("separately compiled FlexAttention used inside a compiled region")

    monkeypatch.setattr(flex, "_compiled_flex", separately_compiled)
    q = torch.randn(1, 2, 128, 16)
    slopes = alibi_slopes(2)

    def attend(x: torch.Tensor) -> torch.Tensor:  # compiled=True: what CUDA inputs choose
        return flex.flex_attend(x, x, x, slopes_H=slopes, softmax_scale=0.25, compiled=True)

    torch._dynamo.reset()
    out = torch.compile(attend, backend="aot_eager", fullgraph=True)(q)
    ref = flex.flex_attend(q, q, q, slopes_H=slopes, softmax_scale=0.25, compiled=False)
    torch.testing.assert_close(out, ref)
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", ["flex", "sdpa"])
def test_compiled_blocks_under_bf16_autocast_trace_whole_and_match_eager(impl: str) -> None:
    """GPU runs compile blocks under bf16 autocast with the low-precision LayerNorm (its own
    autocast switch) and a mask built in the autocast dtype: still one graph per block."""
    if impl == "flex" and not flex_attention_trains_on_cpu():
        pytest.skip("this torch's FlexAttention has no CPU backward (GPU only)")
    import torch._dynamo
    from torch._dynamo.utils import counters

    def model() -> torch.nn.Module:
        return _model(n_layers=3, max_seq_len=128, norm_type="low_precision_layernorm",
                      attn_config={"impl": impl})  # fmt: skip

    eager, compiled = model(), model()
    torch._dynamo.reset()
    counters.clear()
    for block in compiled.blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 96, (2, 128))
    losses = []
    for m in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(ids, targets=shift_labels({"input_ids": ids}))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (name, pa), pb in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)
    assert not counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="materialising on a GPU needs CUDA")
def test_one_gpu_meta_model_trains(mds_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """On one GPU nothing shards a meta model: the trainer materialises it on the GPU (no
    host build and copy), and it trains."""
    import mpt_train.train.builder as trainer

    built_on = []
    real = trainer.build_model
    monkeypatch.setattr(
        trainer,
        "build_model",
        lambda cfg, device="cpu": built_on.append(str(device)) or real(cfg, device),
    )
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, max_duration="2ba", device="gpu")
    spec["model"]["init_device"] = "meta"
    t = train(load_config_dict(spec))
    assert built_on == ["cuda:0"] and all(p.is_cuda for p in t.state.model.parameters())
    assert len(read_metrics(tmp_path / "runs/tiny/metrics.jsonl")) == 2
