"""Checkpoints are pickles; secrets stay out of everything a run writes."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from mpt_train.config import ConfigError, load_config_dict
from mpt_train.reliability import UntrustedCheckpointError, load_weights_safely
from mpt_train.train.builder import build_trainer
from tests.helpers import REPO
from tests.train.conftest import run, tiny_spec, write_spec


class _Payload:
    """Unpickling this creates a marker file: proof that the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"state": {"model": {"w": _Payload(marker)}}}, f)
    return path


def test_safe_weight_loading_never_runs_the_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(UntrustedCheckpointError, match=str(bad)):
        load_weights_safely(bad)
    assert not marker.exists()
    # The control: a plain unpickle does run it, so the test above can fail.
    with open(bad, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_safe_weight_loading_reads_plain_weights(tmp_path: Path) -> None:
    w = {"model.w": torch.arange(6.0)}
    torch.save({"state": {"model": w}}, tmp_path / "ok.pt")
    assert torch.equal(load_weights_safely(tmp_path / "ok.pt")["model.w"], w["model.w"])
    from safetensors.torch import save_file

    save_file(w, str(tmp_path / "ok.safetensors"))
    assert torch.equal(load_weights_safely(tmp_path / "ok.safetensors")["model.w"], w["model.w"])


def test_resume_from_foreign_checkpoint_needs_trust(mds_dir: Path, in_tmp: Path) -> None:
    marker = in_tmp / "pwned"
    bad = malicious_checkpoint(in_tmp / "downloaded.pt", marker)
    spec = tiny_spec(mds_dir, load_path=str(bad), save_folder="ckpt")
    with pytest.raises(
        ConfigError, match=r"load_path: .*downloaded\.pt is not in this run's save_folder"
    ):
        build_trainer(load_config_dict(spec))
    assert not marker.exists()
    # Inside save_folder it is the run's own checkpoint: no trust needed (and no error here).
    from mpt_train.reliability.trust import check_load_path_trusted

    check_load_path_trusted(str(in_tmp / "ckpt/ep0-ba2-rank0.pt"), "ckpt", "tiny", trust=False)


SECRETS = {
    "WANDB_API_KEY": "wandb-planted-0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "aws-planted-secret-9876543210",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED12345678",
    "HF_TOKEN": "hf_planted_token_abcdefgh",
    "MY_SERVICE_SECRET": "svc-planted-secret-424242",
}


@pytest.mark.slow
def test_planted_secrets_appear_nowhere(mds_dir: Path, tmp_path: Path) -> None:
    """A real run with secrets in its environment and interpolated into its spec, logging at
    DEBUG: stdout/stderr, config.yaml, metrics, checkpoints and manifests hold none of them."""
    spec = tiny_spec(
        mds_dir,
        max_duration="4ba",
        save_folder="ckpt",
        save_interval="2ba",
        variables={
            "api_key": "${oc.env:WANDB_API_KEY}",
            "note": "token ${oc.env:HF_TOKEN} and ${oc.env:MY_SERVICE_SECRET}",
        },
    )
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    proc = run(
        [sys.executable, str(REPO / "train.py"), str(spec_file)],
        cwd=tmp_path,
        env={**SECRETS, "MPT_LOG_LEVEL": "DEBUG"},
    )
    assert "resolved spec" in proc.stderr, "the spec must have been logged for this to test it"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != spec_file]
    assert any(p.name == "config.yaml" for p in written)
    assert any(p.suffix == ".pt" for p in written) and any(
        p.name == "metrics.jsonl" for p in written
    )
    blobs = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    blobs.update({str(p): p.read_bytes() for p in written})
    for name, value in SECRETS.items():
        for where, data in blobs.items():
            assert value.encode() not in data, f"{name} leaked into {where}"
