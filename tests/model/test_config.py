"""MPTConfig validation: bad combinations fail at construction, naming the field."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mpt_train.errors import ConfigError
from mpt_train.model import AttentionConfig, InitConfig, MPTConfig, build_model
from mpt_train.model.attention import flash_attn_2_missing
from tests.model.conftest import TINY, tiny_config

BAD_MODEL_FIELDS = [
    ({"norm_type": "batchnorm"}, "norm_type", "rmsnorm"),
    ({"init_device": "gpu"}, "init_device", "meta"),
    ({"n_heads": 5}, "n_heads", "divisible"),
    ({"d_model": 0}, "d_model", ">= 1"),
    ({"embedding_fraction": 0.0}, "embedding_fraction", "(0, 1]"),
    ({"embedding_fraction": 1.5}, "embedding_fraction", "(0, 1]"),
    ({"logit_scale": -1.0}, "logit_scale", "> 0"),
    ({"emb_pdrop": 1.0}, "emb_pdrop", "[0, 1)"),
    ({"resid_pdrop": -0.1}, "resid_pdrop", "[0, 1)"),
    ({"norm_eps": 0.0}, "norm_eps", "> 0"),
]


@pytest.mark.parametrize(("fields", "key", "hint"), BAD_MODEL_FIELDS)
def test_bad_model_field_names_key_and_allowed_values(fields, key, hint) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(**fields)
    assert info.value.key == key
    assert hint in str(info.value)


BAD_ATTN_FIELDS = [
    ({"impl": "triton"}, "impl", "torch, sdpa, flex, flash"),
    ({"alibi_bias_max": 0}, "alibi_bias_max", "> 0"),
    ({"clip_qkv": 0.0}, "clip_qkv", "> 0"),
    ({"softmax_scale": -1.0}, "softmax_scale", "> 0"),
    ({"kv_n_heads": 0}, "kv_n_heads", ">= 1"),
    ({"attn_pdrop": 1.5}, "attn_pdrop", "[0, 1)"),
    ({"impl": "flex", "attn_pdrop": 0.1}, "attn_pdrop", "flex"),
    ({"impl": "sdpa", "flex_kernel_options": {"BLOCK_M": 64}}, "flex_kernel_options", "'flex'"),
    ({"sdpa_backends": ["flash", "xformers"]}, "sdpa_backends.1", "flash, cudnn, efficient"),
    ({"sdpa_backends": ["flash", "flash"]}, "sdpa_backends", "twice"),
    ({"impl": "flex", "sdpa_backends": ["cudnn"]}, "sdpa_backends", "'sdpa'"),
    (
        {"sdpa_backends": ["flash", "cudnn"], "attn_uses_sequence_id": True},
        "sdpa_backends",
        "efficient and math",
    ),
    (
        {"impl": "flash", "attn_uses_sequence_id": True},
        "attn_uses_sequence_id",
        "torch, sdpa, flex",
    ),
]


@pytest.mark.parametrize(("fields", "key", "hint"), BAD_ATTN_FIELDS)
def test_bad_attention_field(fields, key, hint) -> None:
    with pytest.raises(ConfigError) as info:
        AttentionConfig(**fields)
    assert info.value.key == key
    assert hint in str(info.value)


def test_nested_dict_errors_carry_the_section_path() -> None:
    with pytest.raises(ConfigError) as info:
        MPTConfig(**TINY, attn_config={"impl": "xformers"})
    assert info.value.key == "attn_config.impl"
    with pytest.raises(ConfigError) as info:
        MPTConfig(**TINY, init_config={"name": "xavier"})
    assert info.value.key == "init_config.name"


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(attn={"alibi": True}, learned_pos_emb=True)
    assert info.value.key == "learned_pos_emb"
    with pytest.raises(ConfigError) as info:
        tiny_config(attn={"kv_n_heads": 3})  # 4 heads
    assert info.value.key == "attn_config.kv_n_heads"
    assert "[1, 2, 4]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        InitConfig(name="normal")
    assert info.value.key == "init_std"


def test_omegaconf_structured_round_trip() -> None:
    """The run-spec loader merges YAML into the structured schema and builds the dataclass."""
    schema = OmegaConf.structured(MPTConfig)
    yaml_cfg = OmegaConf.create(
        {**TINY, "attn_config": {"impl": "torch", "kv_n_heads": 2, "clip_qkv": 6.0}}
    )
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, yaml_cfg))
    assert isinstance(cfg, MPTConfig) and isinstance(cfg.attn_config, AttentionConfig)
    assert (cfg.kv_n_heads, cfg.attn_config.clip_qkv, cfg.head_dim) == (2, 6.0, 16)
    bad = OmegaConf.create({**TINY, "attn_config": {"impl": "nope"}})
    with pytest.raises(ConfigError, match="impl"):
        OmegaConf.to_object(OmegaConf.merge(schema, bad))


@pytest.mark.skipif(flash_attn_2_missing() is None, reason="flash-attn 2 is installed here")
def test_flash_without_flash_attn_fails_at_build() -> None:
    cfg = tiny_config(attn={"impl": "flash"})  # the config itself is valid
    with pytest.raises(ConfigError) as info:
        build_model(cfg)
    assert info.value.key == "attn_config.impl"
    assert "flash-attn" in str(info.value) and "torch, sdpa, flex" in str(info.value)


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """Install fake ``flash_attn`` packages for one test: ``make(init)`` puts one on sys.path
    (``init`` None: flash-attn 4's namespace-only layout). Whatever ``flash_attn`` modules
    were imported before are back afterwards, and the fakes are gone."""
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] == "flash_attn"}

    def make(init: str | None) -> None:
        for key in [k for k in sys.modules if k.split(".")[0] == "flash_attn"]:
            del sys.modules[key]
        root = tmp_path / f"site{len(sys.path)}"  # a new folder each time: no stale bytecode
        pkg = root / "flash_attn"
        (pkg / "cute").mkdir(parents=True)
        (pkg / "cute" / "__init__.py").write_text("")
        if init is not None:
            (pkg / "__init__.py").write_text(init)
        monkeypatch.syspath_prepend(str(root))

    yield make
    for key in [k for k in sys.modules if k.split(".")[0] == "flash_attn"]:
        del sys.modules[key]
    sys.modules.update(saved)


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(fake_flash_attn) -> None:
    """flash-attn 4 ships only ``flash_attn.cute``: ``import flash_attn`` then succeeds (a
    namespace package) but there is no ``flash_attn_func``; that must fail at build, too."""
    fake_flash_attn(None)
    importlib.import_module("flash_attn")  # the trap: this works
    cfg = tiny_config(attn={"impl": "flash"})
    with pytest.raises(ConfigError, match="flash_attn_func is not importable") as info:
        build_model(cfg)
    assert info.value.key == "attn_config.impl"


def test_flash_attn_before_2_4_is_refused(fake_flash_attn) -> None:
    """alibi_slopes came in flash-attn 2.4: an older one is refused by name and version."""
    fake_flash_attn('__version__ = "2.3.6"\ndef flash_attn_func(*a, **k): ...\n')
    assert flash_attn_2_missing() == "flash-attn 2.3.6 has no alibi_slopes, which came in 2.4"
    fake_flash_attn('__version__ = "2.10.0"\ndef flash_attn_func(*a, **k): ...\n')
    assert flash_attn_2_missing() is None
    fake_flash_attn("def flash_attn_func(*a, **k): ...\n")
    assert (
        flash_attn_2_missing() == "flash-attn (no version) has no alibi_slopes, which came in 2.4"
    )


def test_flex_backend_is_checked_at_build(monkeypatch, fake_flash_attn) -> None:
    """FlexAttention's BACKEND option needs torch >= 2.9, and FLASH needs flash-attn 4 and a
    Hopper GPU: each is refused at build, naming the key, not at the first compiled step."""
    import mpt_train.model.availability as availability

    cfg = tiny_config(attn={"impl": "flex", "flex_kernel_options": {"BACKEND": "FLASH"}})
    monkeypatch.setattr(availability, "_torch_version", lambda: (2, 7))
    with pytest.raises(ConfigError, match=r"BACKEND 'FLASH' needs torch >= 2\.9") as info:
        build_model(cfg)
    assert info.value.key == "attn_config.flex_kernel_options"

    monkeypatch.setattr(availability, "_torch_version", lambda: (2, 11))
    fake_flash_attn('__version__ = "2.7.4"\n')  # flash-attn 2 alone: no flash_attn.cute kernels
    shutil.rmtree(Path(sys.path[0]) / "flash_attn" / "cute")
    with pytest.raises(ConfigError, match="need the flash-attn-4 package"):
        build_model(cfg)
    fake_flash_attn(None)  # flash-attn 4's layout
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(ConfigError, match="Hopper or newer GPU"):
            build_model(cfg)
    triton = tiny_config(attn={"impl": "flex", "flex_kernel_options": {"BACKEND": "TRITON"}})
    build_model(triton)  # other backends need only the torch version
