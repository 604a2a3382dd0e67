"""Convert between :class:`MPTModel` and transformers' native ``MptForCausalLM`` (no remote code).

transformers implements the *released* MPT architecture only: ALiBi with ``alibi_bias_max``
fixed at 8 (its ``MptModel.forward`` never passes the configured value), no biases in linear
layers or norms, plain LayerNorm (``layer_norm_epsilon``), MLP expansion 4 with exact GELU,
multi-head attention, ``clip_qkv`` and ``softmax_scale``, tied LM head, no logit scaling.
:func:`to_hf` refuses any config outside that set rather than export a model that would
silently compute something else. Weight names map by adding the ``transformer.`` prefix.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mpt_train.model.config import AttentionConfig, MPTConfig
from mpt_train.model.mpt import MPTModel

if TYPE_CHECKING:
    from transformers import MptConfig, MptForCausalLM

__all__ = ["config_from_hf", "config_to_hf", "from_hf", "to_hf"]

logger = logging.getLogger(__name__)

HF_PREFIX = "transformer."


def _unsupported(cfg: MPTConfig) -> list[str]:
    """Reasons ``cfg`` has no faithful transformers MPT equivalent (empty when it has one)."""
    a = cfg.attn_config
    checks = [
        (not a.alibi, "attn_config.alibi must be true (transformers MPT always uses ALiBi)"),
        (a.alibi_bias_max != 8, "attn_config.alibi_bias_max must be 8 (transformers ignores it)"),
        (cfg.learned_pos_emb, "learned_pos_emb must be false (transformers MPT has no wpe)"),
        (a.qk_ln, "attn_config.qk_ln must be false (not implemented by transformers MPT)"),
        (cfg.kv_n_heads != cfg.n_heads, "attn_config.kv_n_heads must equal n_heads (no GQA/MQA)"),
        (not cfg.no_bias, "no_bias must be true (transformers MPT has no biases)"),
        (cfg.norm_type == "rmsnorm", "norm_type must be layernorm/low_precision_layernorm"),
        (cfg.expansion_ratio != 4, "expansion_ratio must be 4 (hard-coded in transformers MPT)"),
        (cfg.logit_scale is not None, "logit_scale must be null (not applied by transformers)"),
    ]
    return [msg for bad, msg in checks if bad]


def config_to_hf(cfg: MPTConfig, max_seq_len: int | None = None) -> MptConfig:
    """Map our config to ``transformers.MptConfig``; raise ValueError if it cannot be faithful.

    ``max_seq_len`` overrides the exported value: transformers builds its ALiBi table that long
    and cannot run longer inputs, so raise it to evaluate beyond the training length.
    """
    from transformers import MptConfig

    problems = _unsupported(cfg)
    if problems:
        raise ValueError(
            "config not representable by transformers MptConfig: " + "; ".join(problems)
        )
    a = cfg.attn_config
    return MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=cfg.expansion_ratio,
        max_seq_len=max_seq_len or cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        resid_pdrop=cfg.resid_pdrop,
        layer_norm_epsilon=cfg.norm_eps,
        emb_pdrop=cfg.emb_pdrop,
        learned_pos_emb=False,
        attn_config={
            "attn_type": "multihead_attention",
            "attn_pdrop": a.attn_pdrop,
            "attn_impl": "torch",
            "clip_qkv": a.clip_qkv,
            "softmax_scale": a.softmax_scale,
            "qk_ln": False,
            "attn_uses_sequence_id": a.attn_uses_sequence_id,
            "alibi": True,
            "alibi_bias_max": a.alibi_bias_max,
        },
        init_device="cpu",
        logit_scale=None,
        no_bias=True,
        embedding_fraction=cfg.embedding_fraction,
        norm_type=cfg.norm_type,
        use_cache=False,
        tie_word_embeddings=True,
    )


def config_from_hf(hf_cfg: MptConfig, impl: str = "sdpa") -> MPTConfig:
    """Map ``transformers.MptConfig`` to ours, as transformers would run it (ALiBi max 8)."""
    a = hf_cfg.attn_config
    if a.alibi_bias_max != 8:
        logger.warning(
            "alibi_bias_max=%s in the HF config is ignored by transformers; using 8",
            a.alibi_bias_max,
        )
    if a.qk_ln or hf_cfg.learned_pos_emb or not a.alibi:
        logger.warning("qk_ln / learned_pos_emb / alibi=false are ignored by transformers MPT")
    return MPTConfig(
        d_model=hf_cfg.d_model,
        n_heads=hf_cfg.n_heads,
        n_layers=hf_cfg.n_layers,
        expansion_ratio=4,
        max_seq_len=hf_cfg.max_seq_len,
        vocab_size=hf_cfg.vocab_size,
        no_bias=True,
        norm_type="layernorm" if hf_cfg.norm_type == "layernorm" else "low_precision_layernorm",
        norm_eps=hf_cfg.layer_norm_epsilon,
        learned_pos_emb=False,
        logit_scale=None,
        embedding_fraction=hf_cfg.embedding_fraction,
        emb_pdrop=hf_cfg.emb_pdrop,
        resid_pdrop=hf_cfg.resid_pdrop,
        attn_config=AttentionConfig(
            impl=impl,
            alibi=True,
            alibi_bias_max=8,
            clip_qkv=a.clip_qkv,
            softmax_scale=a.softmax_scale,
            attn_pdrop=a.attn_pdrop,
            attn_uses_sequence_id=a.attn_uses_sequence_id,
        ),
    )


def to_hf(model: MPTModel, max_seq_len: int | None = None) -> MptForCausalLM:
    """Export to a ``transformers.MptForCausalLM`` with the same weights (copied, fp32 kept)."""
    from transformers import MptForCausalLM

    hf_cfg = config_to_hf(model.cfg, max_seq_len)
    with torch.device("meta"):
        hf = MptForCausalLM(hf_cfg)
    state = {HF_PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state[HF_PREFIX + "wte.weight"]
    hf.load_state_dict(state, strict=True, assign=True)
    hf.tie_weights()
    return hf.eval()


def from_hf(hf_model: MptForCausalLM, impl: str = "sdpa") -> MPTModel:
    """Import a ``transformers.MptForCausalLM`` (its tied head becomes our ``wte``)."""
    head, wte = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    if head.shape != wte.shape or not torch.equal(head, wte):
        raise ValueError("lm_head is not tied to transformer.wte; MPTModel always ties them")
    cfg = config_from_hf(hf_model.config, impl)
    with torch.device("meta"):
        model = MPTModel(cfg)
    state = {
        k[len(HF_PREFIX) :]: v.detach().clone()
        for k, v in hf_model.state_dict().items()
        if k.startswith(HF_PREFIX)
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
