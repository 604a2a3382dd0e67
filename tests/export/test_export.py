"""Checkpoint -> HF folder -> transformers' own MPT gives the training model's logits, and back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpt_train.config import load_config_dict
from mpt_train.export import CheckpointError, export_hf, import_hf, load_model, read_checkpoint
from mpt_train.model import MPTConfig, MPTModel, build_model
from mpt_train.train.composer_model import ComposerMPT
from tests.helpers import REPO
from tests.train.conftest import tiny_spec


def _trained_net(ckpt: Path) -> MPTModel:
    """The network exactly as training left it, read the way Composer stores it (trusted)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]
    spec = state["callbacks"]["RunSpecRecorder"]["spec"]
    net = MPTModel(MPTConfig(**spec["model"]))
    net.load_state_dict({k[len("model.") :]: v for k, v in state["model"].items()})
    return net.eval()


def test_export_loads_as_native_mpt_with_same_logits(tiny_ckpt: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, MptForCausalLM

    out = export_hf(tiny_ckpt, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mpt" and "auto_map" not in config  # no remote code

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf) is MptForCausalLM
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The json module encodes Python objects")["input_ids"]])
    with torch.no_grad():
        ref = _trained_net(tiny_ckpt)(ids)
        got = hf(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # The weights are the trained ones, not an initialisation.
    fresh = build_model(MPTConfig(**{**_trained_net(tiny_ckpt).cfg.__dict__}))
    assert not torch.equal(fresh.wte.weight, hf.transformer.wte.weight)
    assert hf.generation_config.eos_token_id == tok.eos_token_id


def test_reads_checkpoint_without_unpickling_code(tiny_ckpt: Path) -> None:
    ckpt = read_checkpoint(tiny_ckpt)  # weights_only=True with a small allow-list
    assert "wte.weight" in ckpt.model_state and ckpt.spec["model"]["d_model"] == 32
    evil = tiny_ckpt.parent / "evil.pt"
    torch.save({"state": {"model": {}}, "x": os.system}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*trust"):
        read_checkpoint(evil)


def test_sharded_checkpoint_folder_exports(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A torch.distributed.checkpoint folder in Composer's key layout, read without a group."""
    import torch.distributed.checkpoint as dcp

    state = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    folder = tmp_path / "ep0-ba3"
    dcp.save({"state": state["state"]}, checkpoint_id=str(folder))
    assert (folder / ".metadata").is_file()
    model, tok = load_model(folder)
    ids = torch.randint(0, 8192, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _trained_net(tiny_ckpt)(ids))
    assert tok == "mpt-train/tiny-bpe"
    assert (export_hf(folder, tmp_path / "hf") / "model.safetensors").is_file()


def test_s3_checkpoint_exports(tiny_ckpt: Path, tmp_path: Path) -> None:
    from tests.s3_server import S3Server

    with S3Server(bucket="export") as s3:
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        try:
            s3.client().upload_file(str(tiny_ckpt), "export", "ckpts/ep0-ba3-rank0.pt")
            out = export_hf(s3.url("ckpts", "ep0-ba3-rank0.pt"), tmp_path / "hf")
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (out / "model.safetensors").is_file()


def test_unrepresentable_config_is_refused_and_nothing_written(tmp_path: Path) -> None:
    cfg = MPTConfig(
        d_model=32,
        n_heads=4,
        n_layers=1,
        vocab_size=64,
        max_seq_len=16,
        attn_config={"impl": "torch", "kv_n_heads": 1},
    )
    net = build_model(cfg)
    ckpt = tmp_path / "gqa.pt"
    spec = {
        "model": {
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 1,
            "vocab_size": 64,
            "max_seq_len": 16,
            "attn_config": {"impl": "torch", "kv_n_heads": 1},
        }
    }
    weights = {"model." + k: v for k, v in net.state_dict().items()}
    torch.save(
        {"state": {"model": weights, "callbacks": {"RunSpecRecorder": {"spec": spec}}}}, ckpt
    )
    with pytest.raises(ValueError, match="kv_n_heads"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert_to_hf.py"), str(ckpt), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "kv_n_heads must equal n_heads" in proc.stderr


def test_convert_from_hf_starts_a_finetune(
    tiny_ckpt: Path, mds32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF folder -> weights file -> load_path + load_weights_only restores exactly those weights.
    The file holds only tensors (it unpickles with torch's weights-only loader), so it needs
    no ``trust_checkpoint``, unlike a Composer checkpoint from elsewhere."""
    hf_dir = export_hf(tiny_ckpt, tmp_path / "hf")
    weights = import_hf(hf_dir, tmp_path / "start.pt")
    assert Path(str(weights) + ".model.yaml").is_file()
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds32, run_name="ft", load_path=str(weights), load_weights_only=True)
    from mpt_train.train.builder import build_trainer

    trainer = build_trainer(load_config_dict(spec))
    try:
        model = trainer.state.model
        assert isinstance(model, ComposerMPT)
        ref = _trained_net(tiny_ckpt).state_dict()
        for name, value in model.model.state_dict().items():
            torch.testing.assert_close(value, ref[name], atol=0, rtol=0)
        assert int(trainer.state.timestamp.batch) == 0  # weights only: a fresh run
    finally:
        trainer.close()
    # A Composer checkpoint (pickled objects beyond tensors) from elsewhere still needs trust.
    from mpt_train.config import ConfigError

    composer_ckpt = tiny_ckpt if tiny_ckpt.is_file() else sorted(tiny_ckpt.rglob("*.pt"))[0]
    spec["load_path"] = str(composer_ckpt)
    with pytest.raises(ConfigError, match="trust_checkpoint"):
        build_trainer(load_config_dict(spec))


@pytest.mark.slow
def test_two_rank_sharded_checkpoint_exports_the_trained_weights(
    mds32: Path, tmp_path: Path
) -> None:
    """A checkpoint written by two FSDP ranks (each saving its own shards) exports to a
    transformers MPT whose weights are the full weights the run ended with."""
    from transformers import MptForCausalLM

    from mpt_train.model.hf import to_hf
    from tests.train.conftest import composer_cmd, run, write_spec

    spec = tiny_spec(
        mds32, max_duration="4ba", save_folder=str(tmp_path / "ckpt"), save_interval="2ba",
        fsdp={"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    )  # fmt: skip
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    script = str(REPO / "tests/reliability/fault_run.py")
    run([*composer_cmd(2), script, "--ledger", str(tmp_path / "run"), str(spec_file)], cwd=tmp_path)
    folder = tmp_path / "ckpt" / "ep0-ba4"
    assert {p.name for p in folder.glob("__*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    hf = MptForCausalLM.from_pretrained(export_hf(folder, tmp_path / "hf"))
    trained = torch.load(tmp_path / "run.weights.pt")
    net = build_model(MPTConfig(**spec["model"]))
    net.load_state_dict({k[len("model.") :]: v for k, v in trained.items()})
    want = to_hf(net).state_dict()
    got = hf.state_dict()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
