"""Logits of ours vs transformers' own MptForCausalLM, same weights, both directions (fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import MptConfig, MptForCausalLM

from mpt_train.model import build_model, generate
from mpt_train.model.hf import config_to_hf, from_hf, to_hf
from tests.model.conftest import perturb_norms, tiny_config

TOL = dict(atol=1e-5, rtol=1e-5)

# (name, MPTConfig fields, attention fields, sequence length)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], int]] = [
    ("mpt7b_layout", dict(d_model=128, n_heads=4, n_layers=3), {}, 48),
    ("six_heads", dict(d_model=96, n_heads=6), {}, 40),
    ("twelve_heads", dict(d_model=96, n_heads=12), {}, 40),
    ("clip_qkv", {}, dict(clip_qkv=0.3), 32),
    ("softmax_scale", {}, dict(softmax_scale=0.7), 32),
    ("layernorm_eps", dict(norm_type="layernorm", norm_eps=1e-3), {}, 32),
]


def _ids(vocab: int, seq: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "fields", "attn", "seq"), CASES, ids=[c[0] for c in CASES])
def test_to_hf_logits_match(name: str, fields: dict, attn: dict, seq: int) -> None:
    torch.manual_seed(0)
    ours = build_model(tiny_config(attn, **fields)).eval()
    perturb_norms(ours)
    hf = to_hf(ours)
    assert isinstance(hf, MptForCausalLM) and hf.config.model_type == "mpt"
    ids = _ids(ours.cfg.vocab_size, seq)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)


def test_clip_qkv_case_actually_clips() -> None:
    """Guard the clip_qkv case above against being vacuous: the clamp must bind."""
    torch.manual_seed(0)
    ours = build_model(tiny_config({"clip_qkv": 0.3}))
    x = ours.blocks[0].norm_1(ours.wte(_ids(97, 32)))
    assert ours.blocks[0].attn.Wqkv(x).abs().max() > 0.3


@pytest.mark.parametrize(("name", "fields", "attn", "seq"), CASES, ids=[c[0] for c in CASES])
def test_from_hf_logits_match(name: str, fields: dict, attn: dict, seq: int) -> None:
    hf_cfg = config_to_hf(tiny_config(attn, **fields))
    torch.manual_seed(1)
    hf = MptForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF's std-0.02 init gives near-zero logits; use MPT-sized weights
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0.0, (2.0 / p.shape[1]) ** 0.5)
    perturb_norms(hf, seed=1)
    ours = from_hf(hf)
    assert ours.cfg.attn_config.clip_qkv == attn.get("clip_qkv")
    ids = _ids(hf_cfg.vocab_size, seq)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)


def test_extrapolation_beyond_max_seq_len() -> None:
    """ALiBi runs past max_seq_len; transformers needs its ALiBi table that long."""
    torch.manual_seed(0)
    ours = build_model(tiny_config(max_seq_len=16)).eval()
    ids = _ids(97, 40)
    hf = to_hf(ours, max_seq_len=64)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)
    # And back: the import keeps the exported (longer) max_seq_len and the same logits.
    back = from_hf(hf)
    assert back.cfg.max_seq_len == 64
    with torch.no_grad():
        torch.testing.assert_close(back(ids), hf(ids).logits, **TOL)


def test_alibi_bias_max_other_than_8(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' MptModel never passes alibi_bias_max to its ALiBi builder (always 8).

    So to_hf refuses such configs; the slopes themselves are checked against transformers'
    builder called with the value, on a model where we make it pass the value through.
    """
    torch.manual_seed(0)
    ours = build_model(tiny_config({"alibi_bias_max": 4}, d_model=96, n_heads=6)).eval()
    with pytest.raises(ValueError, match="alibi_bias_max"):
        to_hf(ours)
    hf = MptForCausalLM(config_to_hf(tiny_config(d_model=96, n_heads=6))).eval()
    hf.load_state_dict({"transformer." + k: v for k, v in ours.state_dict().items()}, strict=False)
    hf.tie_weights()
    ids = _ids(97, 24)
    with torch.no_grad():
        stock = hf(ids).logits
        builder = hf.transformer.build_mpt_alibi_tensor
        monkeypatch.setattr(
            hf.transformer,
            "build_mpt_alibi_tensor",
            lambda n, s, device=None: builder(n, s, 4, device),
        )
        patched = hf(ids).logits
        assert (stock - patched).abs().max() > 1e-3  # bias_max matters, and HF drops it
        torch.testing.assert_close(ours(ids), patched, **TOL)


def test_round_trip_keeps_every_weight() -> None:
    torch.manual_seed(0)
    ours = build_model(tiny_config())
    perturb_norms(ours)
    back = from_hf(to_hf(ours))
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b), k
    assert back.wte.weight.data_ptr() != ours.wte.weight.data_ptr()  # copies, not views


def test_greedy_generation_matches_transformers_generate() -> None:
    torch.manual_seed(0)
    ours = build_model(tiny_config()).eval()
    hf = to_hf(ours)
    prompt = _ids(97, 7, batch=1)
    hf_out = hf.generate(
        prompt,
        max_new_tokens=12,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    assert torch.equal(generate(ours, prompt, max_new_tokens=12), hf_out)


REFUSED = [
    ({"attn": {"kv_n_heads": 2}}, "kv_n_heads"),
    ({"attn": {"kv_n_heads": 1}}, "kv_n_heads"),
    ({"attn": {"qk_ln": True}}, "qk_ln"),
    ({"no_bias": False}, "no_bias"),
    ({"attn": {"alibi": False}, "learned_pos_emb": True}, "learned_pos_emb"),
    ({"attn": {"alibi": False}}, "alibi"),
    ({"norm_type": "rmsnorm"}, "norm_type"),
    ({"logit_scale": 0.5}, "logit_scale"),
    ({"expansion_ratio": 2}, "expansion_ratio"),
]


@pytest.mark.parametrize(("fields", "named"), REFUSED)
def test_to_hf_refuses_unrepresentable_configs(fields: dict, named: str) -> None:
    fields = dict(fields)
    model = build_model(tiny_config(fields.pop("attn", None), **fields))
    with pytest.raises(ValueError, match=named):
        to_hf(model)


def test_from_hf_refuses_untied_head() -> None:
    hf_cfg = MptConfig(
        d_model=64, n_heads=4, n_layers=1, vocab_size=97, max_seq_len=32, tie_word_embeddings=False
    )
    hf = MptForCausalLM(hf_cfg)
    with pytest.raises(ValueError, match="tied"):
        from_hf(hf)
