"""scripts/bench_attention.py times attention on the layout the model really hands over."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import mpt_train.model.attention as attention_mod
from mpt_train.compat import flex_attention_trains_on_cpu
from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location(
    "bench_attention", REPO / "scripts/bench_attention.py"
)
bench = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["bench_attention"] = bench
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


def _model_layout(make_model, monkeypatch) -> dict[str, tuple]:
    """Strides of q, k, v and of the output's gradient inside a real forward + backward."""
    seen: dict[str, tuple] = {}
    real_attend = attention_mod.attend

    def spy(impl, q, k, v, **kwargs):
        seen.update(q=q.stride(), k=k.stride(), v=v.stride(), shape=tuple(q.shape))
        out = real_attend(impl, q, k, v, **kwargs)
        out.register_hook(lambda g: seen.__setitem__("grad", g.stride()))
        return out

    monkeypatch.setattr(attention_mod, "attend", spy)
    model = make_model(attn={"impl": "sdpa"}, n_layers=1)
    tokens = torch.randint(0, 97, (2, 32))
    model(tokens).float().sum().backward()
    return seen


def test_packed_inputs_have_the_models_strides(make_model, monkeypatch) -> None:
    seen = _model_layout(make_model, monkeypatch)
    batch, heads, seq, dim = seen["shape"]
    q, k, v, grad = bench.model_inputs(
        batch, heads, seq, dim, torch.device("cpu"), torch.float32, packed=True
    )
    assert (q.stride(), k.stride(), v.stride()) == (seen["q"], seen["k"], seen["v"])
    assert grad.stride() == seen["grad"]
    # Not contiguous per tensor: the other layout is what --contiguous gives.
    q2, *_, grad2 = bench.model_inputs(
        batch, heads, seq, dim, torch.device("cpu"), torch.float32, packed=False
    )
    assert q2.is_contiguous() and grad2.is_contiguous()
    assert q2.stride() != seen["q"] and grad2.stride() != seen["grad"]


def test_timing_returns_gradients_without_accumulating_them() -> None:
    q, k, v, grad = bench.model_inputs(1, 2, 16, 8, torch.device("cpu"), torch.float32, True)
    calls = []

    def kernel(q, k, v):
        calls.append(torch.is_grad_enabled())
        return (q * k + v).sum(-1, keepdim=True).expand_as(q)

    both, fwd = bench.time_kernel(kernel, q, k, v, grad, warmup=1, iters=3)
    assert both > 0 and fwd > 0
    # warmup + iters forward + backward calls, then 1 + iters forwards, all recording autograd
    assert len(calls) == 1 + 3 + 1 + 3 and all(calls)
    assert q._base is not None and q._base.grad is None  # nothing accumulated in the leaf


def test_script_checks_and_times_every_cpu_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(
        [
            "--batch",
            "1",
            "--heads",
            "2",
            "--seq",
            "64",
            "--head-dim",
            "16",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--iters",
            "2",
            "--warmup",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "inputs laid out as in the model" in out
    table = out.split("kernel", 1)[1].splitlines()[1:]
    rows = {line[:32].strip(): line[32:].split() for line in table if line.strip()}
    floor = float(rows["sdpa causal (no alibi)"][0])
    timed = ["torch+alibi", "sdpa+alibi folded", "sdpa+alibi dense bias", "sdpa causal (no alibi)"]
    if flex_attention_trains_on_cpu():
        timed.append("flex+alibi eager")
    else:  # this torch refuses FlexAttention's CPU backward: the row says so instead of a time
        assert rows["flex+alibi eager"][0] == "n/a:", rows["flex+alibi eager"]
    for name in timed:
        both, ratio, fwd, bwd = map(float, rows[name])  # passed the reference check: timed
        assert both > 0 and fwd > 0 and abs(both - fwd - bwd) < 0.011
        # the ratio of the unrounded times: within the printed values' rounding
        lo, hi = (both - 0.005) / (floor + 0.005), (both + 0.005) / (floor - 0.005)
        assert lo - 0.005 <= ratio <= hi + 0.005
