"""Packed sequences: with sequence_id, no token attends across a document boundary."""

from __future__ import annotations

import pytest
import torch

from tests.model.conftest import clone_with

DOC_LENS = [[7, 13, 4], [24]]  # two rows of 24 tokens; row 0 packs three documents


@pytest.mark.parametrize("impl", ["torch", "sdpa", "flex"])
@pytest.mark.parametrize("positions", ["alibi", "learned_pos_emb"])
def test_packed_logits_equal_documents_alone(make_model, impl, positions) -> None:
    fields = {"learned_pos_emb": True} if positions == "learned_pos_emb" else {}
    attn = {"impl": impl, "attn_uses_sequence_id": True}
    if positions == "learned_pos_emb":
        attn["alibi"] = False
    model = make_model(attn=attn, **fields).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 24), generator=gen)
    seq_id = torch.stack(
        [torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)) for lens in DOC_LENS]
    )
    with torch.no_grad():
        packed = model(ids, sequence_id=seq_id)
        for row, lens in enumerate(DOC_LENS):
            start = 0
            for n in lens:
                alone = model(ids[row : row + 1, start : start + n])
                torch.testing.assert_close(
                    packed[row, start : start + n], alone[0], atol=1e-5, rtol=1e-5
                )
                start += n
        # Without document ids, later documents see earlier ones: the logits must differ.
        unmasked = model(ids)
    assert (unmasked[0, 7:] - packed[0, 7:]).abs().max() > 1e-3
    torch.testing.assert_close(unmasked[0, :7], packed[0, :7], atol=1e-5, rtol=1e-5)


def test_sequence_id_ignored_unless_enabled(make_model, caplog) -> None:
    """llm-foundry semantics: attn_uses_sequence_id=false means the ids are not used."""
    model = make_model().eval()
    masked = clone_with(model, attn={"attn_uses_sequence_id": True}).eval()
    ids = torch.randint(0, 97, (1, 20))
    seq_id = (torch.arange(20) >= 10).long()[None]
    with torch.no_grad():
        ignored = model(ids, sequence_id=seq_id)
        torch.testing.assert_close(ignored, model(ids))
        assert (masked(ids, sequence_id=seq_id) - ignored).abs().max() > 1e-3
    assert "attn_uses_sequence_id" in caplog.text


def test_sequence_id_shape_is_checked(make_model) -> None:
    model = make_model(attn={"attn_uses_sequence_id": True})
    with pytest.raises(ValueError, match="sequence_id"):
        model(torch.zeros(2, 8, dtype=torch.long), sequence_id=torch.zeros(2, 7, dtype=torch.long))
