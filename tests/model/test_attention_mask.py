"""Attention masks are built once per forward by the model, not once per layer."""

from __future__ import annotations

import pytest
import torch

import mpt_train.model.attention as attention
from mpt_train.model import AttentionConfig, MPTConfig, build_model


def _cfg(impl: str, packed: bool) -> MPTConfig:
    """Three layers, so that a per-layer mask would be built three times."""
    return MPTConfig(
        d_model=32, n_heads=4, n_layers=3, max_seq_len=16, vocab_size=64,
        attn_config=AttentionConfig(impl=impl, attn_uses_sequence_id=packed),
    )  # fmt: skip


@pytest.mark.parametrize("packed", [False, True])
def test_mask_is_built_once_per_forward_and_never_reused_across_batches(
    packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packed rows need a same-document mask, built once for all layers; plain causal training
    needs none at all (ALiBi is folded into the heads, SDPA runs ``is_causal``)."""
    torch.manual_seed(0)
    model = build_model(_cfg("sdpa", packed))
    built = []
    real = attention._keep_mask
    monkeypatch.setattr(attention, "_keep_mask", lambda *a: built.append(1) or real(*a))
    ids = torch.randint(0, 64, (2, 16))
    seq_a = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    seq_b = torch.tensor([[0] * 4 + [1] * 12, [0] * 16])
    out_a = model(ids, sequence_id=seq_a if packed else None)
    assert len(built) == (1 if packed else 0)  # three layers, at most one mask
    out_b = model(ids, sequence_id=seq_b if packed else None)
    assert len(built) == (2 if packed else 0)  # a new forward (new batch) builds its own
    # Reference without the cache: a fresh torch-backend model with the same weights.
    ref = build_model(_cfg("torch", packed))
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        out_b, ref(ids, sequence_id=seq_b if packed else None), atol=1e-5, rtol=1e-5
    )
    if packed:
        assert not torch.allclose(out_a, out_b)


@pytest.mark.parametrize("packed", [False, True])
def test_flex_block_mask_is_built_once_per_forward(
    packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mpt_train.model.flex as flex

    model = build_model(_cfg("flex", packed))
    built = []
    real = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    flex._causal_block_mask.cache_clear()
    seq = torch.tensor([[0] * 8 + [1] * 8, [0] * 16]) if packed else None
    with torch.no_grad():  # the mask is built in the forward; no gradient is needed for it
        model(torch.randint(0, 64, (2, 16)), sequence_id=seq)
    assert len(built) == 1  # three layers, one block mask


def test_sdpa_masks_carry_no_alibi_bias_over_whole_sequences() -> None:
    """With ALiBi in the heads, a packed-document mask is ``[B, 1, S, S]`` (no ``[H, S, S]``
    bias: 268 MB per forward at MPT-7B's 2k tokens in bf16), additive in the queries' dtype;
    decoding over a cache adds the ALiBi bias to its small ``[1, H, Q, K]`` mask instead."""
    cpu, slopes = torch.device("cpu"), attention.alibi_slopes(4)
    seq_id = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    mask = attention.shared_mask("sdpa", slopes, 16, 16, seq_id, torch.bfloat16, cpu)
    assert mask.dtype == torch.bfloat16 and mask.shape == (2, 1, 16, 16)
    assert mask[0, 0, 9, 7] == -torch.inf and mask[1, 0, 9, 7] == 0  # documents
    assert mask[1, 0, 7, 9] == -torch.inf  # causal
    assert attention.shared_mask("sdpa", slopes, 16, 16, None, torch.float32, cpu) is None
    decode = attention.shared_mask("sdpa", slopes, 3, 10, None, torch.float32, cpu)
    assert decode.shape == (1, 4, 3, 10)  # bottom-right causal, which is_causal cannot express
    torch.testing.assert_close(decode[0, :, 0, :8], attention.alibi_bias(slopes, 1, 8, 7)[:, 0])
    assert (decode[0, :, 0, 8:] == -torch.inf).all()


def test_sdpa_mask_is_built_in_the_autocast_dtype() -> None:
    """Under autocast the queries are bf16: a mask built in fp32 would be cast in every layer."""
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64,
                    attn_config=AttentionConfig(impl="sdpa", attn_uses_sequence_id=True))  # fmt: skip
    model = build_model(cfg)
    seen = []
    real = attention.shared_mask

    def spy(*args):
        out = real(*args)
        seen.append(out.dtype)
        return out

    import mpt_train.model.mpt as mpt

    seq_id = torch.tensor([[0] * 8 + [1] * 8])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mpt, "shared_mask", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randint(0, 64, (1, 16)), sequence_id=seq_id)
        model(torch.randint(0, 64, (1, 16)), sequence_id=seq_id)
    assert seen == [torch.bfloat16, torch.float32] and torch.isfinite(out).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_sdpa_saves_one_mask_for_backward_not_one_per_layer(autocast: bool) -> None:
    """A boolean mask, or one in another dtype, would be converted inside every layer's SDPA
    call and each layer would save its own ``[B, 1, S, S]`` copy for backward."""
    torch.manual_seed(0)
    seq = 64
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=4, max_seq_len=seq, vocab_size=64,
                    attn_config=AttentionConfig(impl="sdpa", attn_uses_sequence_id=True))  # fmt: skip
    model = build_model(cfg)
    seq_id = torch.cumsum(torch.rand(2, seq) < 0.1, dim=1)
    saved = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[-2:] == (seq, seq):
            saved.add(t.untyped_storage().data_ptr())
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(torch.randint(0, 64, (2, seq)), sequence_id=seq_id).float().sum().backward()
    assert len(saved) == 1


@pytest.fixture
def no_mask_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a block mask is built by evaluating every (query, key) pair: at 65k tokens that
    is a 4.3 GB temporary per row."""
    import mpt_train.model.flex as flex

    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated the mask over every (query, key) pair")

    monkeypatch.setattr(flex, "create_block_mask", evaluate)


@pytest.mark.parametrize("seq_len", [128, 384, 1024, 2048])  # whole blocks: built directly
def test_causal_block_mask_written_down_equals_the_evaluated_one(seq_len: int) -> None:
    """The causal block mask is built from block indices (no [S, S] evaluation: 4.3 GB at 65k
    tokens); it must be exactly the mask FlexAttention would derive from ``kv <= q``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import mpt_train.model.flex as flex

    cpu = torch.device("cpu")
    ref = create_block_mask(flex._causal, None, None, seq_len, seq_len, device=cpu)
    got = flex._causal_block_mask(seq_len, cpu)
    pairs = (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
             ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices"))  # fmt: skip
    for count, index in pairs:
        assert torch.equal(getattr(got, count), getattr(ref, count)), count
        for row, n in enumerate(getattr(ref, count)[0, 0].tolist()):  # entries past n unused
            want = sorted(getattr(ref, index)[0, 0, row, :n].tolist())
            assert sorted(getattr(got, index)[0, 0, row, :n].tolist()) == want, (index, row)
    if seq_len <= 1024:
        q, k, v = torch.randn(3, 1, 2, seq_len, 16).unbind(0)
        torch.testing.assert_close(
            flex_attention(q, k, v, block_mask=got), flex_attention(q, k, v, block_mask=ref)
        )


def test_long_context_causal_block_mask_is_built_without_evaluating_the_mask(
    no_mask_evaluation: None,
) -> None:
    import mpt_train.model.flex as flex

    flex._causal_block_mask.cache_clear()
    mask = flex._causal_block_mask(65536, torch.device("cpu"))
    assert mask.kv_num_blocks.shape == (1, 1, 512) and mask.seq_lengths == (65536, 65536)
    assert mask.full_kv_num_blocks[0, 0, -1] == 511  # the last row sees every earlier block
    flex._causal_block_mask.cache_clear()


def _packed_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """Document ids as text packing writes them: 0, 0, ..., 1, 1, ... (non-decreasing)."""
    rows = [torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths_per_row]
    return torch.stack(rows)


def _same_doc_sets(mask, count: str, index: str) -> list[list[set[int]]]:
    counts, indices = getattr(mask, count), getattr(mask, index)
    return [
        [set(indices[b, 0, r, :n].tolist()) for r, n in enumerate(counts[b, 0].tolist())]
        for b in range(counts.shape[0])
    ]


@pytest.mark.parametrize(
    "docs",
    [
        [[512], [128, 384], [100, 156, 256]],  # one document; boundaries on and off blocks
        [[1] * 12 + [500], [300, 1, 1, 210], [64] * 8],  # tiny documents, many per block
    ],
)
def test_document_block_mask_from_block_ranges_equals_the_evaluated_one(docs) -> None:
    """Packed rows: the block classification from per-block id ranges must be exactly
    what ``create_block_mask`` derives by evaluating every (query, key) pair."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import mpt_train.model.flex as flex

    seq_id = _packed_ids(docs)
    batch, seq_len = seq_id.shape
    ref = create_block_mask(
        flex._same_doc_mask_mod(seq_id), batch, None, seq_len, seq_len, device=torch.device("cpu")
    )
    got = flex._document_block_mask(seq_id)
    for count, index in (
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
    ):
        assert torch.equal(getattr(got, count), getattr(ref, count)), count
        assert _same_doc_sets(got, count, index) == _same_doc_sets(ref, count, index), index
    q, k, v = torch.randn(3, batch, 2, seq_len, 16).unbind(0)
    torch.testing.assert_close(
        flex_attention(q, k, v, block_mask=got), flex_attention(q, k, v, block_mask=ref)
    )


def _allowed_by_blocks(mask, seq_id: torch.Tensor) -> torch.Tensor:
    """The (query, key) pairs a block mask lets through, as a kernel reads it: every pair of a
    full block, the mask_mod's pairs of a partial block, nothing elsewhere. (Eager CPU
    FlexAttention applies the mask_mod densely and would hide a wrong block list.)"""
    batch, seq_len = seq_id.shape
    pos = torch.arange(seq_len)
    dense = (pos[None, :] <= pos[:, None]) & (seq_id[:, :, None] == seq_id[:, None, :])
    out = torch.zeros_like(dense)
    blk = 128
    for b in range(batch):
        for i in range(seq_len // blk):
            rows = slice(i * blk, (i + 1) * blk)
            n = int(mask.kv_num_blocks[b, 0, i])
            for j in mask.kv_indices[b, 0, i, :n].tolist():
                cols = slice(j * blk, (j + 1) * blk)
                out[b, rows, cols] = dense[b, rows, cols]
            n = int(mask.full_kv_num_blocks[b, 0, i])
            for j in mask.full_kv_indices[b, 0, i, :n].tolist():
                out[b, rows, j * blk : (j + 1) * blk] = True
    return out, dense


def test_document_block_mask_is_exact_for_any_ids() -> None:
    """Fine-tuning pads with id -1 and ids need not be sorted: the block mask may then keep
    extra partial blocks, but what it lets through must be exactly the dense same-document
    causal mask (no full block with a masked pair, no skipped block with an allowed one)."""
    import mpt_train.model.flex as flex

    torch.manual_seed(0)
    padded = torch.cat([torch.zeros(1, 200), torch.ones(1, 150), torch.full((1, 162), -1)], 1)
    shuffled = torch.randint(0, 3, (1, 512))
    packed = torch.cat([torch.full((1, 300), 4), torch.full((1, 212), 5)], 1)
    seq_id = torch.cat([padded, shuffled, packed]).long()
    got, want = _allowed_by_blocks(flex._document_block_mask(seq_id), seq_id)
    assert torch.equal(got, want)


def test_long_context_document_block_mask_is_built_without_evaluating_the_mask(
    no_mask_evaluation: None,
) -> None:
    import mpt_train.model.flex as flex

    seq_id = _packed_ids([[65536], [40000, 25536]])
    mask = flex.flex_block_mask(65536, seq_id, torch.device("cpu"))
    assert mask.kv_num_blocks.shape == (2, 1, 512)
    assert mask.full_kv_num_blocks[0, 0, -1] == 511  # one document: every earlier block full
    # Second row: the last query block (in document 1) sees only document 1's blocks.
    first_of_doc1 = 40000 // 128  # block 312 straddles the boundary: partial
    assert mask.full_kv_num_blocks[1, 0, -1] == 511 - first_of_doc1 - 1
    assert mask.kv_num_blocks[1, 0, -1] == 2  # the straddling block and the diagonal
