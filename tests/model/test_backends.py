"""The torch (reference), sdpa and flex kernels agree in forward and gradients.

On CPU FlexAttention runs eagerly (torch 2.7's CPU compile path has no backward); the compiled
kernel is exercised by the GPU test at the end, skipped without CUDA.
"""

from __future__ import annotations

import re

import pytest
import torch

from mpt_train.compat import flex_attention_trains_on_cpu
from mpt_train.model import MPTModel, attend
from mpt_train.model.alibi import alibi_slopes
from mpt_train.model.attention import flash_attn_2_missing
from tests.model.conftest import clone_with

IMPLS = ["sdpa", "flex"]
TOL = dict(atol=2e-5, rtol=1e-4)

# (case id, MPTConfig fields, attention fields)
CASES = [
    ("alibi", {}, {}),
    ("no_alibi", {}, {"alibi": False}),
    ("learned_pos", {"learned_pos_emb": True}, {"alibi": False}),
    ("gqa", {}, {"kv_n_heads": 2}),
    ("mqa", {}, {"kv_n_heads": 1}),
    ("six_heads_qk_ln_clip", {"d_model": 96, "n_heads": 6}, {"qk_ln": True, "clip_qkv": 0.5}),
    ("biases_rmsnorm_scale", {"no_bias": False, "norm_type": "rmsnorm"}, {"softmax_scale": 0.3}),
    ("sequence_id", {}, {"attn_uses_sequence_id": True}),
]


def _loss_and_grads(model: MPTModel, ids, seq_id) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(ids, sequence_id=seq_id)
    # A loss that weights positions differently, so gradient errors cannot cancel out.
    weights = torch.linspace(0.5, 1.5, logits.shape[1], device=logits.device)[None, :, None]
    (logits * weights).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("case", "fields", "attn"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_backend_matches_torch_reference(make_model, case, fields, attn, impl) -> None:
    if impl == "flex" and not flex_attention_trains_on_cpu():
        pytest.skip(f"torch {torch.__version__}'s FlexAttention has no CPU backward (GPU only)")
    ref = make_model(attn={**attn, "impl": "torch"}, **fields)
    other = clone_with(ref, attn={"impl": impl})
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 37), generator=gen)  # not a multiple of any block size
    seq_id = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 37]) if "sequence" in case else None
    ref_logits, ref_grads = _loss_and_grads(ref, ids, seq_id)
    logits, grads = _loss_and_grads(other, ids, seq_id)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert ref_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", ["torch", "sdpa", "flex"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("q_len", [1, 5, 12])
def test_attend_decode_shapes_equal_last_rows_of_full(impl, kv_heads, q_len) -> None:
    """Queries that are the last Q of K keys (KV-cache decoding) see the same scores."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, 12, 16, generator=gen) for _ in range(2))
    slopes = alibi_slopes(4)
    full = attend("torch", q, k, v, slopes_H=slopes, softmax_scale=0.25)
    part = attend(impl, q[:, :, -q_len:], k, v, slopes_H=slopes, softmax_scale=0.25)
    torch.testing.assert_close(part, full[:, :, -q_len:], **TOL)


def test_attend_is_causal() -> None:
    """Changing a future key/value never changes earlier outputs, in any kernel."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=gen) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 15:] += 5.0
    v2[:, :, 15:] -= 5.0
    for impl in ("torch", "sdpa", "flex"):
        for slopes in (None, alibi_slopes(2)):
            a = attend(impl, q, k, v, slopes_H=slopes, softmax_scale=0.3)
            b = attend(impl, q, k2, v2, slopes_H=slopes, softmax_scale=0.3)
            torch.testing.assert_close(a[:, :, :15], b[:, :, :15])
            assert (a[:, :, 15:] - b[:, :, 15:]).abs().max() > 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs CUDA here")
def test_compiled_flex_on_gpu_matches_sdpa(make_model) -> None:
    ref = make_model(attn={"impl": "sdpa", "attn_uses_sequence_id": True}).cuda()
    flex = clone_with(ref, attn={"impl": "flex"}).cuda()
    ids = torch.randint(0, 97, (2, 256), device="cuda")
    seq_id = (torch.arange(256, device="cuda") // 100).expand(2, -1)
    torch.testing.assert_close(flex(ids, seq_id), ref(ids, seq_id), atol=1e-4, rtol=1e-4)


def test_flex_kernel_options_from_the_spec_reach_every_flex_call(make_model, monkeypatch) -> None:
    """``attn_config.flex_kernel_options`` is passed to FlexAttention as is, and (tiles only,
    never the maths) leaves the output unchanged."""
    import mpt_train.model.flex as flex_mod

    seen = []
    real = flex_mod.flex_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(flex_mod, "flex_attention", spy)
    plain = make_model(attn={"impl": "flex"})
    opts = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}
    tuned = clone_with(plain, attn={"impl": "flex", "flex_kernel_options": opts})
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():  # the options are the subject, not the backward
        torch.testing.assert_close(tuned(ids), plain(ids))
    layers = plain.cfg.n_layers
    assert seen == [opts] * layers + [None] * layers  # tuned ran first


@pytest.mark.parametrize(
    "backends,kernel",
    [
        (["math"], "aten::_scaled_dot_product_attention_math"),
        (["flash", "math"], "aten::_scaled_dot_product_flash_attention_for_cpu"),
    ],
)
def test_sdpa_backends_decide_the_kernel_and_keep_the_result(make_model, backends, kernel):
    """``sdpa_backends`` are the kernels SDPA may use: an unlisted one never runs (seen in the
    profiler), and the result is the reference's."""
    from torch.profiler import profile

    ref = make_model(attn={"impl": "torch"})
    model = clone_with(ref, attn={"impl": "sdpa", "sdpa_backends": backends})
    ids = torch.randint(0, 97, (2, 40))
    with profile() as prof:
        out = model(ids)
    ran = {e.key for e in prof.key_averages()}
    assert kernel in ran
    other = {"aten::_scaled_dot_product_attention_math",
             "aten::_scaled_dot_product_flash_attention_for_cpu"} - {kernel}  # fmt: skip
    assert not other & ran
    torch.testing.assert_close(out, ref(ids), **TOL)


def test_sdpa_is_refused_when_its_math_kernel_may_add_scores_in_half_precision(make_model):
    """That setting would round the folded ALiBi columns' sum (slope x position) to bf16."""
    from mpt_train.errors import ConfigError

    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with pytest.raises(ConfigError, match="allow_fp16_bf16_reduction_math_sdp"):
            make_model(attn={"impl": "sdpa"})
        make_model(attn={"impl": "flex"})  # scores with the bias added in fp32 by its kernel
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)
    make_model(attn={"impl": "sdpa"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_gpu_only_sdpa_backends_are_refused_at_build_on_cpu(make_model) -> None:
    from mpt_train.errors import ConfigError

    with pytest.raises(ConfigError, match="none of which runs without a CUDA GPU") as info:
        make_model(attn={"impl": "sdpa", "sdpa_backends": ["cudnn", "efficient"]})
    assert info.value.key == "attn_config.sdpa_backends"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs CUDA here")
def test_compiled_flex_with_kernel_options_on_gpu_matches_default(make_model) -> None:
    ref = make_model(attn={"impl": "flex"}).cuda()
    opts = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    tuned = clone_with(ref, attn={"impl": "flex", "flex_kernel_options": opts}).cuda()
    ids = torch.randint(0, 97, (2, 256), device="cuda")
    torch.testing.assert_close(tuned(ids), ref(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's GPU kernels need CUDA")
@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_folded_alibi_on_each_gpu_sdpa_kernel_matches_reference(backend: str) -> None:
    """MPT-1B's head shape at 2k tokens in bf16: the widened heads (128 + 8) through each SDPA
    kernel are as close to the fp32 reference, output and gradients, as plain bf16 ALiBi is."""
    torch.manual_seed(0)
    slopes = alibi_slopes(16, device="cuda")
    base = [torch.randn(2, 16, 2048, 128, device="cuda") for _ in range(3)]
    grad = torch.randn(2, 16, 2048, 128, device="cuda")

    def run(impl: str, dtype: torch.dtype, backends: list[str]) -> list[torch.Tensor]:
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in base)
        out = attend(impl, q, k, v, slopes_H=slopes, softmax_scale=128**-0.5,
                     sdpa_backends=backends)  # fmt: skip
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    ref = run("torch", torch.float32, [])
    plain = run("torch", torch.bfloat16, [])  # the error bf16 itself costs
    try:
        got = run("sdpa", torch.bfloat16, [backend])
    except RuntimeError as err:  # flash must take them: it is what SDPA picks by default
        if "No available kernel" in str(err) and backend != "flash":
            pytest.skip(f"SDPA's {backend} kernel does not take these inputs on this GPU")
        raise
    for name, r, p, g in zip(("out", "dq", "dk", "dv"), ref, plain, got, strict=True):
        err, bf16_err = ((x - r).norm() / r.norm() for x in (g, p))
        assert err <= 2 * bf16_err + 1e-3, f"{backend} {name}: {err:.2e} vs bf16 {bf16_err:.2e}"


def _fa4_missing() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return "FlashAttention-4 runs on Hopper or newer GPUs only"
    if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < (2, 9):
        return f"FlexAttention's BACKEND option needs torch >= 2.9, this is {torch.__version__}"
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as err:
        return f"flash-attn-4 is not installed ({err})"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_fa4_missing() is not None, reason=str(_fa4_missing()))
def test_flex_on_flash_attention_4_matches_reference() -> None:
    """FlexAttention's ALiBi score_mod on FlashAttention-4's kernels (``BACKEND: FLASH``) at
    MPT-1B's head shape: output and gradients as close to the fp32 reference as bf16 allows."""
    torch.manual_seed(0)
    slopes = alibi_slopes(16, device="cuda")
    base = [torch.randn(2, 16, 2048, 128, device="cuda") for _ in range(3)]
    grad = torch.randn(2, 16, 2048, 128, device="cuda")

    def run(impl: str, dtype: torch.dtype, options: dict | None) -> list[torch.Tensor]:
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in base)
        out = attend(impl, q, k, v, slopes_H=slopes, softmax_scale=128**-0.5,
                     flex_kernel_options=options)  # fmt: skip
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    ref = run("torch", torch.float32, None)
    plain = run("torch", torch.bfloat16, None)  # the error bf16 itself costs
    got = run("flex", torch.bfloat16, {"BACKEND": "FLASH"})
    for name, r, p, g in zip(("out", "dq", "dk", "dv"), ref, plain, got, strict=True):
        err, bf16_err = ((x - r).norm() / r.norm() for x in (g, p))
        assert err <= 2 * bf16_err + 1e-3, f"FA4 {name}: {err:.2e} vs bf16 {bf16_err:.2e}"


def _flash_missing() -> str | None:
    if not torch.cuda.is_available():
        return "flash-attn runs on CUDA GPUs only"
    reason = flash_attn_2_missing()
    if reason is not None:
        return f"flash-attn 2 is not usable here ({reason}; pip install 'mpt-train[gpu]')"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_flash_missing() is not None, reason=str(_flash_missing()))
@pytest.mark.parametrize(("case", "fields", "attn"), CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_flash_matches_torch_reference_in_bf16(make_model, case, fields, attn) -> None:
    """flash-attn (ALiBi slopes, GQA, bottom-right causal) against the reference, in bf16."""
    ref = make_model(attn={**attn, "impl": "torch"}, **fields).cuda()
    flash = clone_with(ref, attn={"impl": "flash"}).cuda()
    ids = torch.randint(0, 97, (2, 37), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_logits, ref_grads = _loss_and_grads(ref, ids, None)
        logits, grads = _loss_and_grads(flash, ids, None)
    torch.testing.assert_close(logits, ref_logits, atol=3e-2, rtol=3e-2)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=3e-2, rtol=5e-2, msg=name)
