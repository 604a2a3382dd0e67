"""impl ``cudnn``: cuDNN's fused attention adding ALiBi itself.

cuDNN computes the ALiBi slopes from the head count; the CPU tests pin down that these are
MPT's exactly where the config allows the kernel, and that every combination it cannot run
is refused before a model is built. The GPU tests compare it with the fp32 reference, forward
and backward, eager and compiled; they skip without a CUDA GPU and the cuDNN frontend.
"""

from __future__ import annotations

import pytest
import torch

from mpt_train.errors import ConfigError
from mpt_train.model import attend, build_model
from mpt_train.model.alibi import alibi_slopes
from mpt_train.model.cudnn_attention import cudnn_alibi_slopes, cudnn_attention_missing
from tests.model.conftest import clone_with, tiny_config

MISSING = cudnn_attention_missing()


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 6, 12, 16, 20, 24, 32, 40, 48, 56, 64, 96])
def test_cudnn_slopes_are_mpts_at_alibi_bias_max_8(n_heads: int) -> None:
    """Powers of two and the in-between head counts (MPT-125m's 12, MPT-3b's 20) alike."""
    got = torch.tensor(cudnn_alibi_slopes(n_heads))
    torch.testing.assert_close(got, alibi_slopes(n_heads, 8), rtol=1e-6, atol=0)


def test_cudnn_slopes_differ_from_mpts_at_other_alibi_bias_max() -> None:
    """Why the config refuses impl cudnn with another alibi_bias_max: the bias would change."""
    for n_heads in (8, 12, 16):
        mine = alibi_slopes(n_heads, 16)
        assert not torch.allclose(torch.tensor(cudnn_alibi_slopes(n_heads)), mine)


@pytest.mark.parametrize(
    ("attn", "key", "hint"),
    [
        ({"alibi_bias_max": 16}, "alibi_bias_max", "use 8 or impl torch/sdpa/flex/flash"),
        ({"attn_uses_sequence_id": True}, "attn_uses_sequence_id", "torch, sdpa, flex"),
        ({"attn_pdrop": 0.1}, "attn_pdrop", "use 0.0"),
    ],
)
def test_cudnn_config_refuses_what_the_kernel_cannot_do(attn, key, hint) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(attn={"impl": "cudnn", **attn})
    assert info.value.key == key and hint in str(info.value)


def test_cudnn_without_alibi_takes_any_alibi_bias_max() -> None:
    cfg = tiny_config(attn={"impl": "cudnn", "alibi": False, "alibi_bias_max": 16},
                      learned_pos_emb=True)  # fmt: skip
    assert cfg.attn_config.impl == "cudnn"


@pytest.mark.skipif(MISSING is None, reason="cuDNN attention can run here")
def test_cudnn_is_refused_at_build_where_it_cannot_run() -> None:
    with pytest.raises(ConfigError) as info:
        build_model(tiny_config(attn={"impl": "cudnn"}))
    assert info.value.key == "attn_config.impl"
    assert MISSING in str(info.value) and "torch, sdpa, flex" in str(info.value)


def test_attend_refuses_what_cudnn_cannot_do_and_routes_the_rest_to_sdpa() -> None:
    """Called directly (no config in between), impl cudnn refuses document masks and dropout
    rather than dropping them, and takes SDPA's path for fp32 and for a single query."""
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    slopes = alibi_slopes(4)
    with pytest.raises(ValueError, match="no document masking or attention dropout"):
        attend("cudnn", q, k, v, slopes_H=slopes, softmax_scale=0.25,
               seq_id_BS=torch.zeros(1, 8, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="no document masking or attention dropout"):
        attend("cudnn", q, k, v, slopes_H=slopes, softmax_scale=0.25, dropout_p=0.1)
    for args in ((q, k, v), tuple(t[:, :, :1].bfloat16() for t in (q, k, v))):
        got = attend("cudnn", *args, slopes_H=slopes, softmax_scale=0.25)
        torch.testing.assert_close(got, attend("sdpa", *args, slopes_H=slopes, softmax_scale=0.25))


def _reference_error(
    impl: str, alibi: bool, kv_heads: int, heads: int = 16
) -> list[tuple[str, float, float]]:
    """Relative error of output and gradients against the fp32 reference at MPT-1B's head
    shape, for ``impl`` in bf16 and for the bf16 reference itself."""
    torch.manual_seed(0)
    slopes = alibi_slopes(heads, device="cuda") if alibi else None
    shapes = [(2, heads, 2048, 128), (2, kv_heads, 2048, 128), (2, kv_heads, 2048, 128)]
    base = [torch.randn(s, device="cuda") for s in shapes]
    grad = torch.randn(2, heads, 2048, 128, device="cuda")

    def run(kernel: str, dtype: torch.dtype) -> list[torch.Tensor]:
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in base)
        out = attend(kernel, q, k, v, slopes_H=slopes, softmax_scale=128**-0.5)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    ref, plain, got = (
        run("torch", torch.float32),
        run("torch", torch.bfloat16),
        run(impl, torch.bfloat16),
    )
    names = ("out", "dq", "dk", "dv")
    return [
        (name, ((g - r).norm() / r.norm()).item(), ((p - r).norm() / r.norm()).item())
        for name, r, p, g in zip(names, ref, plain, got, strict=True)
    ]


@pytest.mark.gpu
@pytest.mark.skipif(MISSING is not None, reason=f"impl cudnn cannot run here: {MISSING}")
@pytest.mark.parametrize(
    ("alibi", "kv_heads", "heads"), [(True, 16, 16), (False, 16, 16), (True, 4, 16), (True, 12, 12)]
)
def test_cudnn_matches_fp32_reference_at_mpt_1b_shape(alibi, kv_heads, heads) -> None:
    """As close to the fp32 reference, output and gradients, as bf16 itself allows (with
    ALiBi, without, with grouped-query heads, and with 12 heads as MPT-125m: cuDNN's own
    slopes for a head count that is not a power of two)."""
    for name, err, bf16_err in _reference_error("cudnn", alibi, kv_heads, heads):
        assert err <= 2 * bf16_err + 1e-3, f"cudnn {name}: {err:.2e} vs bf16 {bf16_err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(MISSING is not None, reason=f"impl cudnn cannot run here: {MISSING}")
@pytest.mark.parametrize("fields", [{}, {"kv_n_heads": 2}, {"alibi": False}], ids=str)
def test_cudnn_model_matches_fp32_reference_eager_and_compiled(make_model, fields) -> None:
    """The whole model under bf16 autocast (packed-QKV views as the kernel's inputs, gradients
    through every weight), eager and inside torch.compile, where the kernel is one opaque op:
    logits and every gradient as close to the fp32 reference as the bf16 reference is."""
    extra = {"learned_pos_emb": True} if fields.get("alibi") is False else {}
    ref = make_model(attn={"impl": "torch", **fields}, **extra).cuda()
    model = clone_with(ref, attn={"impl": "cudnn"}).cuda()
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    weights = torch.linspace(0.5, 1.5, 64, device="cuda")[None, :, None]

    def run(m: torch.nn.Module, bf16: bool) -> dict[str, torch.Tensor]:
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = m(ids)
        (logits.float() * weights).square().mean().backward()
        grads = {n.removeprefix("_orig_mod."): p.grad.float() for n, p in m.named_parameters()}
        return {"logits": logits.detach().float(), **grads}

    exact, plain = run(ref, bf16=False), run(ref, bf16=True)
    for label, candidate in (("eager", model), ("compiled", torch.compile(model))):
        got = run(candidate, bf16=True)
        assert got.keys() == exact.keys()
        for name, e in exact.items():
            err, bf16_err = ((t[name] - e).norm() / e.norm() for t in (got, plain))
            assert err <= 2 * bf16_err + 1e-3, f"{label} {name}: {err:.2e} vs bf16 {bf16_err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(MISSING is not None, reason=f"impl cudnn cannot run here: {MISSING}")
def test_cudnn_decoding_over_a_cache_matches_full_forward(make_model) -> None:
    """Decoding (queries after cached keys) takes the SDPA path: the same logits."""
    model = make_model(attn={"impl": "cudnn"}).cuda().eval()
    ids = torch.randint(0, 97, (1, 24), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(ids).float()
        prefix, past = model(ids[:, :20], use_cache=True)
        steps = [prefix.float()]
        for i in range(20, 24):
            logits, past = model(ids[:, i : i + 1], past_key_values=past, use_cache=True)
            steps.append(logits.float())
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=3e-2, rtol=3e-2)
