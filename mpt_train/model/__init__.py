"""MPT model: typed config, attention kernels with ALiBi, blocks, init, generation, HF interop.

Single-device architecture code only; FSDP, activation checkpointing and ``torch.compile`` are
applied by the training layer (per :class:`MPTBlock`).
"""

from mpt_train.model.alibi import alibi_slopes
from mpt_train.model.attention import MPTAttention, attend, check_attention_impl
from mpt_train.model.block import MPTMLP, MPTBlock
from mpt_train.model.config import AttentionConfig, InitConfig, MPTConfig
from mpt_train.model.generate import generate, sample_next
from mpt_train.model.init import build_model, init_weights
from mpt_train.model.mpt import MPTModel

__all__ = [
    "MPTMLP",
    "AttentionConfig",
    "InitConfig",
    "MPTAttention",
    "MPTBlock",
    "MPTConfig",
    "MPTModel",
    "alibi_slopes",
    "attend",
    "build_model",
    "check_attention_impl",
    "generate",
    "init_weights",
    "sample_next",
]
