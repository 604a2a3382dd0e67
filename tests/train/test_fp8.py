"""FP8 linears (torchao float8) on CPU through torchao's emulation: conversion, numerics against
the unconverted model, FSDP2 float8 all-gather with precomputed scales, plain checkpoints that
resume exactly and export, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchao
from torch import nn

from mpt_train.config import ConfigError, load_config_dict
from mpt_train.config.fp8 import Fp8Config
from mpt_train.model import MPTConfig, build_model
from mpt_train.train.builder import build_trainer
from mpt_train.train.fp8 import (
    Float8ScalePrecompute,
    check_fp8_replication,
    convert_blocks,
    float8_linear_config,
)
from tests.helpers import REPO
from tests.train.conftest import SEQ, composer_cmd, run, tiny_spec, write_spec
from tests.train.test_train import losses, refused_before_training

#: torchao may live outside the repository's environment: subprocesses get its folder too.
_PYTHONPATH = os.pathsep.join([str(REPO), str(Path(torchao.__file__).parents[1])])

#: Emulated FP8 against fp32 over 24 steps of real text: measured within 0.25% per step.
LOSS_RTOL = 0.01


def _converted(cfg: MPTConfig, recipe: str = "tensorwise") -> nn.Module:
    model = build_model(cfg)
    fp8 = Fp8Config(enabled=True, recipe=recipe)
    config = float8_linear_config(fp8, emulate=True, all_gather=False, recompute_weight=False)
    assert convert_blocks(model.blocks, config) == 4 * cfg.n_layers
    return model


def _model_cfg(**kw) -> MPTConfig:
    base = {"d_model": 64, "n_heads": 2, "n_layers": 2, "max_seq_len": SEQ, "vocab_size": 8192}
    return MPTConfig(**{**base, "attn_config": {"impl": "torch"}, **kw})


def test_block_linears_convert_and_the_state_dict_stays_plain() -> None:
    from torchao.float8.float8_linear import Float8Linear

    cfg = _model_cfg()
    plain, fp8 = build_model(cfg), _converted(cfg)
    kinds = {name: type(m) for name, m in fp8.named_modules()}
    assert kinds["blocks.0.attn.Wqkv"] is Float8Linear
    assert kinds["blocks.1.ffn.down_proj"] is Float8Linear
    assert kinds["wte"] is nn.Embedding  # the tied embedding / LM head stays high precision
    want = {k: (v.dtype, v.shape, type(v)) for k, v in plain.state_dict().items()}
    got = {k: (v.dtype, v.shape, type(v)) for k, v in fp8.state_dict().items()}
    assert got == want
    plain.load_state_dict(fp8.state_dict())  # and each loads into the other
    fp8.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("recipe", ["tensorwise", pytest.param("rowwise", marks=pytest.mark.slow)])
def test_emulated_fp8_losses_track_the_unconverted_model(recipe: str, mds_dir: Path) -> None:
    """24 AdamW steps on the shipped corpus from the same weights: every step's loss within
    LOSS_RTOL of the unconverted model's, and not bit-identical (the casts really happen)."""
    from streaming import StreamingDataset

    cfg = _model_cfg()
    torch.manual_seed(0)
    plain = build_model(cfg)
    fp8 = _converted(cfg, recipe)
    fp8.load_state_dict(plain.state_dict())
    data = StreamingDataset(local=str(mds_dir), split="train", shuffle=False, batch_size=4)
    ids = torch.stack([torch.from_numpy(data[i]["tokens"].astype("int64")) for i in range(96)])
    runs = {}
    for name, model in (("plain", plain), ("fp8", fp8)):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        runs[name] = []
        for step in range(24):
            batch = ids[4 * step : 4 * step + 4]
            loss = model(batch, targets=torch.cat([batch[:, 1:], batch[:, :1] * 0 - 100], 1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            runs[name].append(loss.item())
    ref, got = torch.tensor(runs["plain"]), torch.tensor(runs["fp8"])
    assert ref[-5:].mean() < ref[:5].mean() - 0.5  # it trains
    rel = ((got - ref) / ref).abs()
    assert rel.max() < LOSS_RTOL, rel
    assert not torch.equal(got, ref)


def test_one_rank_has_no_float8_all_gather_and_no_precompute(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchao.float8.float8_linear import Float8Linear

    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_config_dict(tiny_spec(mds_dir, fp8={"enabled": True})))
    try:
        linears = [m for m in trainer.state.model.modules() if isinstance(m, Float8Linear)]
        assert len(linears) == 8
        assert all(type(m.weight) is nn.Parameter for m in linears)  # nothing to all-gather
        assert not any(isinstance(c, Float8ScalePrecompute) for c in trainer.state.callbacks)
    finally:
        trainer.close()


@pytest.mark.parametrize(
    ("fp8", "top", "key"),
    [
        ({"recipe": "rowwise", "all_gather": True}, {}, "fp8.all_gather"),
        ({"recipe": "blockwise"}, {}, "fp8.recipe"),
        ({"emulate": "yes"}, {}, "fp8.emulate"),
        ({"enabled": True}, {"precision": "amp_fp8"}, "precision"),
        ({"enabled": True}, {"model": {"d_model": 40}}, "model.d_model"),
        (
            {"enabled": True},
            {"model": {"d_model": 64, "n_heads": 16, "attn_config": {"kv_n_heads": 1}}},
            "model.attn_config.kv_n_heads",
        ),
        ({"enabled": True}, {"model": {"d_model": 64, "n_heads": 16}}, None),
    ],
)
def test_fp8_spec_refusals_name_the_key(
    fp8: dict, top: dict, key: str | None, tmp_path: Path
) -> None:
    spec = tiny_spec(tmp_path, fp8=fp8)
    for section, values in top.items():
        spec[section] = {**spec[section], **values} if isinstance(values, dict) else values
    if key is None:  # a head dim of 4 is fine: only the linears' shapes matter
        assert load_config_dict(spec).fp8.enabled
        return
    with pytest.raises(ConfigError) as e:
        load_config_dict(spec)
    assert e.value.key == key, e.value


def test_compiled_fp8_under_ddp_is_refused_and_sharded_or_one_rank_is_not() -> None:
    on = Fp8Config(enabled=True)
    with pytest.raises(ConfigError) as e:
        check_fp8_replication(on, compiled=True, sharded=False, world=2)
    assert e.value.key == "fsdp.sharding_strategy"
    check_fp8_replication(on, compiled=True, sharded=True, world=2)
    check_fp8_replication(on, compiled=True, sharded=False, world=1)
    check_fp8_replication(on, compiled=False, sharded=False, world=2)
    check_fp8_replication(Fp8Config(), compiled=True, sharded=False, world=2)


def test_sequence_length_off_the_fp8_grid_is_refused_by_dry_run(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, fp8={"enabled": True})
    spec["train_loader"]["dataset"]["max_seq_len"] = 24
    path = write_spec(tmp_path / "spec.yaml", spec)
    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), str(path), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": _PYTHONPATH},
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train_loader.dataset.max_seq_len: 24 is not a multiple of 16" in out.stderr
    assert "Traceback" not in out.stderr


def test_fp8_without_emulation_on_cpu_is_refused_before_the_model(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, fp8={"enabled": True, "emulate": False})
    refused_before_training(spec, "fp8.emulate", "FP8 tensor cores", tmp_path)


@pytest.mark.slow
def test_two_rank_fp8_all_gather_precomputes_scales_resumes_bitwise_and_exports(
    mds_dir: Path, tmp_path: Path
) -> None:
    """FSDP2 on two ranks with float8 weight all-gather: before every batch each sharded weight
    carries the scale of its current values; a run resumed from its step-2 checkpoint repeats
    steps 3-4 bit for bit; the checkpoint holds the plain fp32 weights under the keys of an
    unconverted model and exports to transformers' MPT."""
    import torch.distributed.checkpoint as dcp
    from transformers import MptForCausalLM

    from mpt_train.export import export_hf, read_checkpoint

    spec = tiny_spec(
        mds_dir,
        max_duration="4ba",
        save_interval="2ba",
        fp8={"enabled": True},
        fsdp={"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    )
    env = {"PYTHONPATH": _PYTHONPATH}
    script = str(REPO / "tests/train/fp8_run.py")
    ref = write_spec(tmp_path / "ref.yaml", {**spec, "save_folder": str(tmp_path / "ckpt")})
    run([*composer_cmd(2), script, str(tmp_path / "ref.json"), str(ref)], tmp_path, env, 900)
    probe = json.loads((tmp_path / "ref.json").read_text())
    assert probe == [{"linears": 8, "wrapped": 8, "fresh_scales": 8}] * 4

    resumed = write_spec(
        tmp_path / "resumed.yaml",
        {
            **spec,
            "run_name": "resumed",
            "load_path": str(tmp_path / "ckpt" / "ep0-ba2"),
            "reliability": {"trust_checkpoint": True},  # written by the run above
        },
    )
    run(
        [*composer_cmd(2), script, str(tmp_path / "resumed.json"), str(resumed)], tmp_path, env, 900
    )
    want, got = (
        losses(tmp_path / "runs/tiny/metrics.jsonl"),
        losses(tmp_path / "runs/resumed/metrics.jsonl"),
    )
    assert sorted(got) == [3, 4]
    assert all(got[s] == want[s] for s in got), (got, want)

    folder = tmp_path / "ckpt" / "ep0-ba4"
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    saved = {
        k[len("state.model.model.") :]: m.properties.dtype
        for k, m in meta.items()
        if k.startswith("state.model.")
    }
    plain = build_model(MPTConfig(**spec["model"])).state_dict()
    assert saved == {k: v.dtype for k, v in plain.items()}
    weights = read_checkpoint(folder).model_state
    hf = MptForCausalLM.from_pretrained(export_hf(folder, tmp_path / "hf"))
    torch.testing.assert_close(
        hf.transformer.blocks[0].attn.Wqkv.weight, weights["blocks.0.attn.Wqkv.weight"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 tensor cores need a GPU of compute capability 8.9+",
)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_kernels_give_the_emulated_loss_and_gradients(recipe: str) -> None:
    """torch._scaled_mm on the GPU against torchao's emulation of the same casts, under bf16."""
    cfg = _model_cfg(d_model=256, n_heads=4, max_seq_len=128)
    models = []
    for emulate in (True, False):
        model = build_model(cfg, device="cuda")
        fp8 = Fp8Config(enabled=True, recipe=recipe)
        config = float8_linear_config(
            fp8, emulate=emulate, all_gather=False, recompute_weight=False
        )
        convert_blocks(model.blocks, config)
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, cfg.vocab_size, (4, 128), device="cuda")
    out = []
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=ids.roll(-1, 1))
        loss.backward()
        out.append((loss.item(), model.blocks[0].ffn.up_proj.weight.grad.float()))
    (emu_loss, emu_grad), (gpu_loss, gpu_grad) = out
    assert gpu_loss == pytest.approx(emu_loss, rel=1e-2)
    torch.testing.assert_close(gpu_grad, emu_grad, rtol=0.1, atol=0.1 * emu_grad.abs().max().item())
