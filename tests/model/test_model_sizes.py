"""Every yamls/models/*.yaml builds on meta with the parameter count docs/models.md states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mpt_train.model import MPTConfig, build_model

REPO = Path(__file__).resolve().parents[2]
MODELS_PAGE = REPO / "docs" / "models.md"

# The shapes of llm-foundry's MPT yamls (d_model, n_heads, n_layers), from the issue.
LLM_FOUNDRY_SHAPES = {
    "125m": (768, 12, 12),
    "350m": (1024, 16, 24),
    "760m": (1536, 12, 24),
    "1b": (2048, 16, 24),
    "3b": (2560, 20, 32),
    "7b": (4096, 32, 32),
    "13b": (5120, 40, 40),
    "30b": (7168, 64, 48),
    "70b": (8192, 64, 80),
}


def _table() -> dict[str, dict[str, str]]:
    """Parse the markdown table: {yaml path: {column: cell}}."""
    section = MODELS_PAGE.read_text().split("\n## Sizes\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        rows[cells["YAML"].strip("`")] = cells
    return rows


def _load(path: Path) -> MPTConfig:
    merged = OmegaConf.merge(OmegaConf.structured(MPTConfig), OmegaConf.load(path).model)
    return OmegaConf.to_object(merged)


TABLE = _table()


def test_table_lists_every_model_yaml() -> None:
    yamls = {str(p.relative_to(REPO)) for p in (REPO / "yamls" / "models").glob("mpt-*.yaml")}
    assert yamls == set(TABLE) and len(yamls) == len(LLM_FOUNDRY_SHAPES)


@pytest.mark.parametrize("yaml_path", sorted(TABLE))
def test_yaml_builds_on_meta_with_documented_count(yaml_path: str) -> None:
    cfg = _load(REPO / yaml_path)
    row = TABLE[yaml_path]
    size = re.fullmatch(r"yamls/models/mpt-(\w+)\.yaml", yaml_path).group(1)
    shape = (cfg.d_model, cfg.n_heads, cfg.n_layers)
    assert shape == LLM_FOUNDRY_SHAPES[size]
    assert shape == (int(row["d_model"]), int(row["n_heads"]), int(row["n_layers"]))
    assert cfg.max_seq_len == int(row["max_seq_len"]) == (8192 if size == "30b" else 2048)
    assert cfg.attn_config.alibi and cfg.no_bias and cfg.vocab_size == 50432
    model = build_model(cfg, device="meta")
    assert model.num_params() == int(row["Parameters"].replace(",", ""))


def test_published_sizes() -> None:
    """MPT-7B is the 6.65-6.7B model; MPT-30B is 29.96B (mosaicml model cards)."""
    count = {p: int(r["Parameters"].replace(",", "")) for p, r in TABLE.items()}
    assert 6.64e9 <= count["yamls/models/mpt-7b.yaml"] <= 6.7e9
    assert round(count["yamls/models/mpt-30b.yaml"] / 1e9, 2) == 29.96
