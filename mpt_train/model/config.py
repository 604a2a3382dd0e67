"""Typed model section of the run spec: what an MPT network needs, validated up front.

The fields follow llm-foundry's MPT ``model:`` section (and transformers' ``MptConfig``) so
YAMLs carry over. Every dataclass here loads with ``OmegaConf.structured`` (plain types, no
Literal/Union). A bad combination raises :class:`~mpt_train.errors.ConfigError` naming the
field and the allowed values at construction, before any memory is allocated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from mpt_train.errors import ConfigError, check_choice
from mpt_train.model.kernels import KERNELS, kernel, kernels_with

__all__ = [
    "ATTN_IMPLS",
    "INIT_DEVICES",
    "INIT_NAMES",
    "NORM_TYPES",
    "SDPA_BACKENDS",
    "AttentionConfig",
    "InitConfig",
    "MPTConfig",
]

logger = logging.getLogger(__name__)

ATTN_IMPLS = tuple(KERNELS)
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
NORM_TYPES = ("low_precision_layernorm", "layernorm", "rmsnorm")
INIT_DEVICES = ("cpu", "meta")
INIT_NAMES = ("kaiming_normal", "normal")
FAN_MODES = ("fan_in", "fan_out")


def _check_prob(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(key, f"got {value!r}, must be a probability in [0, 1)")


@dataclass
class AttentionConfig:
    """Attention kernel choice and MPT's attention options.

    ``impl`` picks the kernel: ``torch`` (explicit matmul/softmax, the reference), ``sdpa``
    (``F.scaled_dot_product_attention``, ALiBi folded into the heads), ``flex`` (FlexAttention
    with an ALiBi ``score_mod``, compiled), ``flash`` (flash-attn, GPU only) or ``cudnn``
    (cuDNN's fused attention with ALiBi inside it, GPU only; no document masking or attention
    dropout, ``alibi_bias_max`` 8). ALiBi and document masking (``attn_uses_sequence_id``) are
    applied inside every kernel that takes them.
    ``kv_n_heads`` < ``n_heads`` gives grouped-query attention (1 = multi-query).
    ``flex_kernel_options`` go to FlexAttention's generated GPU kernel unchanged (tile sizes,
    warps, stages; see ``scripts/bench_attention.py --flex-options`` to time them); empty keeps
    torch's choice. They change speed only, never the result. ``sdpa_backends`` are the SDPA
    kernels impl ``sdpa`` may use (``flash``, ``cudnn``, ``efficient``, ``math``; SDPA takes the
    first of them in torch's own order that accepts the inputs, the others are off); empty
    allows all. Packed documents (``attn_uses_sequence_id``) need a mask, which only
    ``efficient`` and ``math`` take.
    """

    impl: str = "sdpa"
    alibi: bool = True
    alibi_bias_max: int = 8
    qk_ln: bool = False
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    kv_n_heads: int | None = None
    attn_pdrop: float = 0.0
    attn_uses_sequence_id: bool = False
    flex_kernel_options: dict[str, Any] = field(default_factory=dict)
    sdpa_backends: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("impl", self.impl, ATTN_IMPLS)
        for i, name in enumerate(self.sdpa_backends):
            check_choice(f"sdpa_backends.{i}", name, SDPA_BACKENDS)
        if len(set(self.sdpa_backends)) != len(self.sdpa_backends):
            raise ConfigError("sdpa_backends", f"got {list(self.sdpa_backends)}: a backend twice")
        if self.sdpa_backends and self.impl != "sdpa":
            raise ConfigError(
                "sdpa_backends", f"set for impl {self.impl!r}; they only apply to impl 'sdpa'"
            )
        masked = {"efficient", "math"}
        if (
            self.sdpa_backends
            and self.attn_uses_sequence_id
            and not masked & set(self.sdpa_backends)
        ):
            raise ConfigError(
                "sdpa_backends",
                f"got {list(self.sdpa_backends)} with attn_uses_sequence_id: packed documents "
                "need a mask, which only the efficient and math kernels take; add one of them",
            )
        if self.flex_kernel_options and self.impl != "flex":
            raise ConfigError(
                "flex_kernel_options",
                f"set for impl {self.impl!r}; they only apply to impl 'flex'",
            )
        if self.alibi_bias_max <= 0:
            raise ConfigError("alibi_bias_max", f"got {self.alibi_bias_max}, must be > 0")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError("clip_qkv", f"got {self.clip_qkv}, must be > 0 or null")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ConfigError("softmax_scale", f"got {self.softmax_scale}, must be > 0 or null")
        if self.kv_n_heads is not None and self.kv_n_heads < 1:
            raise ConfigError("kv_n_heads", f"got {self.kv_n_heads}, must be >= 1 or null")
        _check_prob("attn_pdrop", self.attn_pdrop)
        self._check_kernel()

    def _check_kernel(self) -> None:
        """What the chosen kernel cannot do (:data:`mpt_train.model.kernels.KERNELS`)."""
        k = kernel(self.impl)
        if self.attn_pdrop > 0 and not k.dropout:
            raise ConfigError(
                "attn_pdrop",
                f"got {self.attn_pdrop}; impl {k.name!r} has no attention dropout, "
                f"use 0.0 or impl {'/'.join(kernels_with('dropout'))}",
            )
        if self.attn_uses_sequence_id and not k.document_masking:
            raise ConfigError(
                "attn_uses_sequence_id",
                f"document masking is not implemented for impl {k.name!r}; "
                f"allowed impls with attn_uses_sequence_id: "
                f"{', '.join(kernels_with('document_masking'))}",
            )
        allowed = k.alibi_bias_max
        if self.alibi and allowed is not None and self.alibi_bias_max not in allowed:
            # cuDNN computes the slopes itself (the ALiBi paper's): MPT's only for max 8.
            raise ConfigError(
                "alibi_bias_max",
                f"got {self.alibi_bias_max}; impl {k.name!r} applies the standard ALiBi slopes, "
                f"which are MPT's only for alibi_bias_max {'/'.join(map(str, allowed))}: use "
                f"{'/'.join(map(str, allowed))} or impl "
                f"{'/'.join(kernels_with('alibi_bias_max', None))}",
            )


@dataclass
class InitConfig:
    """Parameter initialisation (llm-foundry's ``init_config``).

    The MPT default is kaiming-normal (fan_in, relu gain, i.e. std sqrt(2/fan_in)) for every
    linear layer and the embedding, with the residual output projections (``attn.out_proj``,
    ``ffn.down_proj``) divided by sqrt(2 * n_layers) so the residual stream's variance does not
    grow with depth. ``name='normal'`` uses a fixed ``init_std`` instead. ``init_gain`` is the
    negative slope of ``init_nonlinearity: leaky_relu`` (torch ignores it for ``relu``, so a
    gain with ``relu`` is refused rather than silently dropped).
    """

    name: str = "kaiming_normal"
    fan_mode: str = "fan_in"
    init_gain: float = 0.0
    init_nonlinearity: str = "relu"
    init_std: float | None = None
    emb_init_std: float | None = None
    init_div_is_residual: bool = True

    def __post_init__(self) -> None:
        check_choice("name", self.name, INIT_NAMES)
        check_choice("fan_mode", self.fan_mode, FAN_MODES)
        check_choice("init_nonlinearity", self.init_nonlinearity, ("relu", "leaky_relu"))
        if self.init_gain and self.init_nonlinearity == "relu":
            raise ConfigError(
                "init_gain",
                f"got {self.init_gain}, but it is leaky_relu's negative slope and has no effect "
                "with init_nonlinearity relu; set init_nonlinearity: leaky_relu or init_gain: 0",
            )
        if self.name == "normal" and (self.init_std is None or self.init_std <= 0):
            raise ConfigError("init_std", f"got {self.init_std}, name 'normal' needs a std > 0")
        if self.emb_init_std is not None and self.emb_init_std <= 0:
            raise ConfigError("emb_init_std", f"got {self.emb_init_std}, must be > 0 or null")


@dataclass
class MPTConfig:
    """The MPT architecture. Field names match llm-foundry / transformers' ``MptConfig``."""

    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 50432
    no_bias: bool = True
    norm_type: str = "low_precision_layernorm"
    norm_eps: float = 1e-5
    learned_pos_emb: bool = False
    logit_scale: float | None = None
    embedding_fraction: float = 1.0
    emb_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_config: AttentionConfig = field(default_factory=AttentionConfig)
    init_config: InitConfig = field(default_factory=InitConfig)
    init_device: str = "cpu"

    def __post_init__(self) -> None:
        # OmegaConf.structured hands nested sections over as DictConfig; accept plain dicts too.
        if not isinstance(self.attn_config, AttentionConfig):
            self.attn_config = _nested(AttentionConfig, self.attn_config, "attn_config")
        if not isinstance(self.init_config, InitConfig):
            self.init_config = _nested(InitConfig, self.init_config, "init_config")
        for key in (
            "d_model",
            "n_heads",
            "n_layers",
            "expansion_ratio",
            "max_seq_len",
            "vocab_size",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"got {getattr(self, key)}, must be >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(
                "n_heads", f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}"
            )
        kv = self.attn_config.kv_n_heads
        if kv is not None and (kv > self.n_heads or self.n_heads % kv):
            raise ConfigError(
                "attn_config.kv_n_heads",
                f"got {kv}, must divide n_heads ({self.n_heads}): allowed values "
                f"{[h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]}",
            )
        check_choice("norm_type", self.norm_type, NORM_TYPES)
        check_choice("init_device", self.init_device, INIT_DEVICES)
        if self.norm_eps <= 0:
            raise ConfigError("norm_eps", f"got {self.norm_eps}, must be > 0")
        if self.learned_pos_emb and self.attn_config.alibi:
            raise ConfigError(
                "learned_pos_emb",
                "learned position embeddings and ALiBi are exclusive: set learned_pos_emb "
                "false or attn_config.alibi false",
            )
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise ConfigError(
                "embedding_fraction", f"got {self.embedding_fraction}, must be in (0, 1]"
            )
        if self.logit_scale is not None and (
            self.logit_scale <= 0 or not math.isfinite(self.logit_scale)
        ):
            raise ConfigError("logit_scale", f"got {self.logit_scale}, must be > 0 or null")
        _check_prob("emb_pdrop", self.emb_pdrop)
        _check_prob("resid_pdrop", self.resid_pdrop)
        if not self.attn_config.alibi and not self.learned_pos_emb:
            logger.warning("MPTConfig: neither ALiBi nor learned_pos_emb: no position signal")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        """Key/value heads: ``attn_config.kv_n_heads`` or ``n_heads`` (plain multi-head)."""
        return self.attn_config.kv_n_heads or self.n_heads


def _nested(cls: type, value: object, key: str) -> object:
    try:
        return cls(**dict(value))  # type: ignore[call-overload]
    except ConfigError as err:
        raise err.with_prefix(key) from None
    except TypeError as err:
        raise ConfigError(key, f"invalid section: {err}") from None
