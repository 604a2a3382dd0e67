"""One table says what each attention kernel supports; the spec checks and the docs follow it."""

from __future__ import annotations

import pytest

from mpt_train.errors import ConfigError
from mpt_train.model.config import ATTN_IMPLS, AttentionConfig
from mpt_train.model.kernels import KERNELS, markdown_table
from tests.helpers import REPO


def test_the_docs_page_shows_the_generated_table() -> None:
    page = (REPO / "docs" / "attention.md").read_text(encoding="utf-8")
    assert markdown_table() in page, "run make docs"
    for k in KERNELS.values():
        assert f"| `{k.name}` | {k.summary} |" in page


def test_every_impl_the_spec_takes_has_a_row() -> None:
    assert set(ATTN_IMPLS) == set(KERNELS)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_the_spec_refuses_exactly_what_the_kernel_lacks(impl: str) -> None:
    k = KERNELS[impl]
    asks = {
        "dropout": ({"attn_pdrop": 0.1}, "attn_pdrop"),
        "document_masking": ({"attn_uses_sequence_id": True}, "attn_uses_sequence_id"),
    }
    for field, (fields, key) in asks.items():
        if getattr(k, field):
            AttentionConfig(impl=impl, **fields)
        else:
            with pytest.raises(ConfigError) as info:
                AttentionConfig(impl=impl, **fields)
            assert info.value.key == key
    for bias_max in (4, 8, 16):
        if k.alibi_bias_max is None or bias_max in k.alibi_bias_max:
            AttentionConfig(impl=impl, alibi_bias_max=bias_max)
        else:
            with pytest.raises(ConfigError, match="alibi_bias_max"):
                AttentionConfig(impl=impl, alibi_bias_max=bias_max)
