"""KV-cache decoding equals full recomputation; sampling controls behave as specified."""

from __future__ import annotations

import pytest
import torch

from mpt_train.model import generate, sample_next

ATTN_CASES = [
    ("mha_sdpa", {"impl": "sdpa"}),
    ("mha_torch", {"impl": "torch"}),
    ("gqa_flex", {"impl": "flex", "kv_n_heads": 2}),
    ("mqa_sdpa", {"impl": "sdpa", "kv_n_heads": 1}),
    ("no_alibi_sdpa", {"impl": "sdpa", "alibi": False}),
]


@pytest.mark.parametrize(("case", "attn"), ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_incremental_logits_equal_full_forward(make_model, case, attn) -> None:
    model = make_model(attn=attn).eval()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model(ids[:, :11], use_cache=True)  # prefill 11, then 1 + 3 + 1 + ...
        steps = [logits]
        start = 11
        for n in (1, 3, 1, 14):
            logits, cache = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
            steps.append(logits)
            start += n
    assert cache[0][0].shape == (2, model.cfg.kv_n_heads, 30, model.cfg.head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("case", "attn"), ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_generate_with_cache_equals_recomputation(make_model, case, attn) -> None:
    model = make_model(attn=attn)
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, max_new_tokens=15)
    recomputed = generate(model, prompt, max_new_tokens=15, use_cache=False)
    assert cached.shape == (3, 20) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)
    # The greedy choice really is the argmax of the full forward at every step.
    with torch.no_grad():
        logits = model.eval()(cached[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), cached[:, 5:])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.8},
    ],
)
def test_sampling_with_cache_equals_recomputation(make_model, kwargs) -> None:
    model = make_model(attn={"kv_n_heads": 2})
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(2))
    a = generate(model, prompt, 12, generator=torch.Generator().manual_seed(5), **kwargs)
    b = generate(
        model, prompt, 12, use_cache=False, generator=torch.Generator().manual_seed(5), **kwargs
    )
    assert torch.equal(a, b)


def test_eos_stops_and_pads(make_model) -> None:
    model = make_model()
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, 10)
    eos = int(free[0, 6])  # the 3rd token row 0 generates
    out = generate(model, prompt, 10, eos_token_id=eos)
    assert torch.all(out[0, 6:] == eos)
    hits = (out[:, 4:] == eos).float().argmax(dim=1)
    for row in range(2):
        first = int(hits[row]) if bool((out[row, 4:] == eos).any()) else None
        if first is not None:
            assert torch.equal(out[row, : 4 + first], free[row, : 4 + first])


def test_generate_restores_training_mode(make_model) -> None:
    model = make_model().train()
    generate(model, torch.zeros(1, 3, dtype=torch.long), 2)
    assert model.training


def test_sample_next_controls() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=gen), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=gen), greedy)
    # top_p = 0 (as transformers allows) keeps the top token instead of failing to sample.
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=0.0, generator=gen), greedy)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        tok = sample_next(logits, temperature=2.0, top_k=3, generator=gen)
        assert bool((top3 == tok[:, None]).any(dim=1).all())
    # top_p keeps the smallest prefix of tokens whose probability reaches p.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {int(sample_next(probs.log(), 1.0, top_p=0.75, generator=gen)) for _ in range(200)}
    assert seen == {0, 1}
