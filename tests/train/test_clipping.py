"""Norm clipping folded into torch's fused AdamW does what clip_grad_norm_ + the step does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer.algorithms import GradientClipping

from mpt_train.config import ConfigError, load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.train.builder import build_trainer, train
from mpt_train.train.clipping import FusedNormClipping, fold_norm_clip
from tests.helpers import REPO
from tests.train.conftest import composer_cmd, run, tiny_spec, write_spec

FUSED = {"name": "decoupled_adamw", "lr": 1e-3, "weight_decay": 1e-5, "implementation": "fused"}


def _adamw_runs(clip: str, max_norm: float = 0.5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(1)
    for scale in (3.0, 0.1, 10.0, 0.2, 1.0, 5.0):  # some steps clip, some do not
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=g)
        params[1].grad = None if scale == 0.2 else params[1].grad  # a param without gradient
        if clip == "torch":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif clip == "fold":
            norm = fold_norm_clip(params, [opt], max_norm)
            grads = [p.grad for p in params if p.grad is not None]
            torch.testing.assert_close(
                norm, torch.linalg.vector_norm(torch.cat([x.flatten() for x in grads]))
            )
        opt.step()
    return [p.detach().clone() for p in params]


def test_folded_clip_updates_like_clip_grad_norm_then_step() -> None:
    torch_clip, folded, unclipped = _adamw_runs("torch"), _adamw_runs("fold"), _adamw_runs("none")
    for a, b, c in zip(torch_clip, folded, unclipped):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        assert (c - a).abs().max() > 1e-3  # clipping changed the update: the test can tell


def test_folded_clip_leaves_the_update_alone_below_the_threshold() -> None:
    """Norm 0.2 under a threshold of 1: the step is exactly the unclipped one."""
    updated = []
    for fold in (True, False):
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 0.1)
        opt = torch.optim.AdamW([p], lr=0.5, fused=True)
        if fold:
            fold_norm_clip([p], [opt], max_norm=1.0)
            assert opt.grad_scale.item() == 1.0
        opt.step()
        updated.append(p.detach().clone())
    assert torch.equal(updated[0], updated[1]) and not torch.equal(updated[0], torch.ones(4))


def _losses(path: Path) -> list[float]:
    return [r["loss/train/total"] for r in read_metrics(path)]


def test_trainer_folds_clipping_into_fused_adamw_and_logs_the_norm(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    losses, norms, weights = {}, {}, {}
    for impl in ("auto", "composer", "none"):
        clip = {"clipping_threshold": 0.05, "implementation": impl}
        spec = tiny_spec(mds_dir, run_name=impl, max_duration="4ba", optimizer=FUSED,
                         gradient_clipping=None if impl == "none" else clip)  # fmt: skip
        trainer = train(load_config_dict(spec))
        folded = [c for c in trainer.state.callbacks if isinstance(c, FusedNormClipping)]
        composer_clip = [a for a in trainer.state.algorithms if isinstance(a, GradientClipping)]
        expected = {"auto": (1, 0), "composer": (0, 1), "none": (0, 0)}[impl]
        assert (len(folded), len(composer_clip)) == expected
        rows = read_metrics(tmp_path / f"runs/{impl}/metrics.jsonl")
        losses[impl] = [r["loss/train/total"] for r in rows]
        norms[impl] = [r.get("l2_norm/grad_preclip") for r in rows]
        weights[impl] = torch.cat([p.detach().flatten() for p in trainer.state.model.parameters()])
        if impl == "auto":  # the threshold is below the norm: every step was clipped
            assert trainer.state.optimizers[0].grad_scale.item() > 1.0
    assert losses["auto"] == pytest.approx(losses["composer"], rel=1e-5)
    torch.testing.assert_close(weights["auto"], weights["composer"], rtol=0, atol=1e-6)
    # Clipping moved the weights by far more than that tolerance: the comparison can tell.
    assert (weights["none"] - weights["composer"]).abs().max() > 1e-4
    assert len(norms["auto"]) == 4 and all(n > 0.05 for n in norms["auto"])
    assert norms["composer"] == [None] * 4  # Composer's clipping logs no norm


def test_fused_clipping_is_refused_before_the_model_is_built_when_impossible(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the spec was refused")

    monkeypatch.setattr("mpt_train.train.builder.build_model", no_build)
    spec = tiny_spec(mds_dir, gradient_clipping={"implementation": "fused"})  # foreach on CPU
    with pytest.raises(ConfigError, match=r"gradient_clipping\.implementation.*fused AdamW"):
        build_trainer(load_config_dict(spec))
    with pytest.raises(ConfigError, match=r"gradient_clipping\.implementation.*'value'"):
        load_config_dict(
            tiny_spec(
                mds_dir, gradient_clipping={"implementation": "fused", "clipping_type": "value"}
            )
        )


@pytest.mark.slow
def test_folded_clip_under_fsdp2_uses_the_whole_models_norm(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks with FULL_SHARD hold half of every gradient: the norm that clips (and is
    logged) must be the whole model's, as on one rank with the same global batch."""
    monkeypatch.chdir(tmp_path)
    common = {"max_duration": "3ba", "optimizer": FUSED,
              "gradient_clipping": {"clipping_threshold": 0.05, "implementation": "fused"}}  # fmt: skip
    train(load_config_dict(tiny_spec(mds_dir, run_name="one", **common)))
    spec = tiny_spec(mds_dir, run_name="two", fsdp={"sharding_strategy": "FULL_SHARD"}, **common)
    run([*composer_cmd(2), str(REPO / "train.py"), str(write_spec(tmp_path / "two.yaml", spec))],
        cwd=tmp_path)  # fmt: skip
    one, two = (read_metrics(tmp_path / f"runs/{n}/metrics.jsonl") for n in ("one", "two"))
    assert [r["l2_norm/grad_preclip"] for r in two] == pytest.approx(
        [r["l2_norm/grad_preclip"] for r in one], rel=1e-4
    )
    assert _losses(tmp_path / "runs/two/metrics.jsonl") == pytest.approx(
        _losses(tmp_path / "runs/one/metrics.jsonl"), rel=1e-5
    )
