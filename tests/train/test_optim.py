"""Optimizers: MPT's parameter groups, fast AdamW equal to Composer's maths, decoupled Lion."""

from __future__ import annotations

import pytest
import torch
from composer.optim import DecoupledAdamW

from mpt_train.config.schema import OptimizerConfig
from mpt_train.model import MPTConfig, build_model
from mpt_train.train.lion import DecoupledLionW
from mpt_train.train.optim import build_optimizer, param_groups


def tiny_model(no_bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        MPTConfig(
            d_model=32,
            n_heads=2,
            n_layers=2,
            max_seq_len=16,
            vocab_size=64,
            norm_type="layernorm",
            no_bias=no_bias,
        )
    )


def test_param_groups_skip_norms_biases_and_embeddings() -> None:
    model = tiny_model()
    decay, no_decay = param_groups(model, OptimizerConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(
        n.endswith("weight") and "norm" not in n and "wte" not in n for n in decayed
    )
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "wte.weight",
        "norm_f.weight",
        "norm_f.bias",
    }
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    groups = param_groups(
        model, OptimizerConfig(decay_embeddings=True, decay_norms_and_biases=True)
    )
    assert len(groups) == 1


@pytest.mark.parametrize("impl", ["foreach", "fused", "auto"])
def test_fast_decoupled_adamw_matches_composer(impl: str) -> None:
    cfg = OptimizerConfig(name="decoupled_adamw", lr=1e-2, weight_decay=1e-3, implementation=impl)
    # No biases (MPT's default): a key bias has an exactly-zero true gradient, whose rounding
    # noise Adam would amplify differently in any two implementations.
    a, b = tiny_model(no_bias=True), tiny_model(no_bias=True)
    opt_a = build_optimizer(cfg, a, on_gpu=False)
    opt_b = DecoupledAdamW(
        param_groups(b, cfg),
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt_a, opt_b)]
    x = torch.randint(0, 64, (2, 16))
    for _ in range(5):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            o.step()
        for s in sched:
            s.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_lion_update_is_sign_of_interpolated_momentum_with_decoupled_decay() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = DecoupledLionW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    g1 = torch.tensor([0.3, -0.1, 0.0])
    p.grad = g1.clone()
    opt.step()
    # m0 = 0: update = sign(0.1 g); decay multiplies by 1 - wd * lr / lr0 = 0.5 first.
    expected = torch.tensor([1.0, -2.0, 0.5]) * 0.5 - 0.1 * torch.sign(0.1 * g1)
    torch.testing.assert_close(p.detach(), expected)
    m = 0.01 * g1
    torch.testing.assert_close(opt.state[p]["exp_avg"], m)
    g2 = torch.tensor([-1.0, 1.0, 2.0])
    p.grad = g2
    opt.param_groups[0]["lr"] = 0.05  # the schedule halves lr: decay halves too (decoupled)
    opt.step()
    expected = expected * (1 - 0.5 * 0.05 / 0.1) - 0.05 * torch.sign(0.9 * m + 0.1 * g2)
    torch.testing.assert_close(p.detach(), expected)


def test_lion_trains_a_model_down() -> None:
    model = tiny_model()
    opt = build_optimizer(OptimizerConfig(name="decoupled_lionw", lr=3e-3), model, on_gpu=False)
    x = torch.randint(0, 64, (4, 16))
    first = None
    for _ in range(20):
        opt.zero_grad()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.5
