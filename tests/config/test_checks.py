"""A spec that training refuses for a reason in the spec alone is refused by ``--dry-run``
too, naming the same key, and training refuses it before any process group or model exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.distributed
import yaml

from mpt_train.cli import main

# (overrides on a small CPU spec, the key both refusals must name)
BAD_SPECS: list[tuple[list[str], str]] = [
    (["model.attn_config.impl=cudnn", "compile.enabled=true", "compile.mode=reduce-overhead",
      "device=auto"], "compile.mode"),
    (["model.attn_config.impl=flash", "precision=fp32", "device=auto"], "model.attn_config.impl"),
    (["model.attn_config.impl=cudnn", "precision=amp_bf16", "device=auto",
      "model.attn_config.alibi_bias_max=16"], "model.attn_config.alibi_bias_max"),
    (["model.attn_config.impl=flex", "model.attn_config.attn_pdrop=0.1"],
     "model.attn_config.attn_pdrop"),
    (["model.attn_config.impl=flash"], "model.attn_config.impl"),
    (["model.attn_config.impl=sdpa", "model.attn_config.sdpa_backends=[efficient]"],
     "model.attn_config.sdpa_backends"),
    (["precision=amp_bf16"], "precision"),
    (["model.attn_config.impl=flex", "compile.enabled=true"], "compile.enabled"),
    (["device_train_microbatch_size=auto"], "device_train_microbatch_size"),
    (["gradient_clipping.implementation=fused"], "gradient_clipping.implementation"),
    (["autoresume=true"], "autoresume"),
    (["device_train_microbatch_size=3"], "device_train_microbatch_size"),
    (["scheduler.t_warmup=10tok"], "scheduler.t_warmup"),
    (["scheduler.t_max=0.5dur"], "scheduler.t_max"),
    (["train_loader.dataset.max_seq_len=64"], "train_loader.dataset.max_seq_len"),
    (["train_loader.dataset.remote=ftp://host/corpus"], "train_loader.dataset.remote"),
    (["train_loader.dataset.local=null"], "train_loader.dataset"),
    (["eval_loader.name=synthetic", "eval_loader.dataset.max_seq_len=32"], "eval_loader.name"),
]  # fmt: skip


def _spec(tmp_path: Path) -> Path:
    """A CPU run whose data does not exist: the refusals must come before anyone looks."""
    spec: dict[str, Any] = {
        "run_name": "tiny",
        "device": "cpu",
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "max_seq_len": 32,
                  "vocab_size": 256, "attn_config": {"impl": "torch"}},
        "train_loader": {"dataset": {"local": str(tmp_path / "no-data"), "max_seq_len": 32}},
        "max_duration": "8ba",
        "global_train_batch_size": 4,
        "scheduler": {"t_warmup": "2ba"},
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    return line


def test_the_base_spec_passes_the_dry_run(tmp_path: Path) -> None:
    assert main([str(_spec(tmp_path)), "--dry-run"]) == 0


@pytest.mark.parametrize(("overrides", "key"), BAD_SPECS, ids=[k for _, k in BAD_SPECS])
def test_dry_run_and_training_refuse_a_bad_spec_alike_before_any_build(
    overrides: list[str],
    key: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the spec was refused")

    monkeypatch.setattr("mpt_train.train.builder.build_model", no_build)
    monkeypatch.chdir(tmp_path)
    path = str(_spec(tmp_path))
    had_group = torch.distributed.is_initialized()  # an earlier test may have left one
    named = f"error in run spec {path}: {key}: "
    dry = _refusal(capsys, [path, *overrides, "--dry-run"])
    assert dry.startswith(named), dry
    # The advice may differ (training knows the device an `auto` spec got), the key may not.
    trained = _refusal(capsys, [path, *overrides])
    assert trained.startswith(named), trained
    assert torch.distributed.is_initialized() == had_group  # no process group was started
    assert not (tmp_path / "runs").exists()
