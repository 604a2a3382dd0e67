"""The ``fp8`` section: FP8 matmuls in the transformer blocks (torchao's float8 training).

Spec-only checks live here, so ``--dry-run`` refuses what training refuses: the recipe, the
weight all-gather it allows, precisions that clash with it, and layer shapes the FP8 matmul
cannot take. What needs the machine (a GPU of compute capability 8.9+, torchao installed) is
checked in :mod:`mpt_train.train.fp8` before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpt_train.errors import ConfigError, check_choice

if TYPE_CHECKING:
    from mpt_train.config.schema import RunConfig
    from mpt_train.model.config import MPTConfig

__all__ = ["FP8_DIM_MULTIPLE", "FP8_RECIPES", "Fp8Config", "check_fp8_run", "fp8_linear_shapes"]

FP8_RECIPES = ("tensorwise", "rowwise")
#: torch._scaled_mm needs both dimensions of every FP8 operand divisible by 16; the tokens of a
#: micro batch are the inner dimension of the weight-gradient matmul.
FP8_DIM_MULTIPLE = 16


@dataclass
class Fp8Config:
    """FP8 linears through ``torchao.float8`` (the recipes torchtitan and OLMo-core train with).

    Attributes:
        enabled: Run the blocks' linear layers (QKV, attention output, MLP) in FP8; weights,
            gradients, optimizer state and checkpoints stay in high precision.
        recipe: ``tensorwise`` (one scale per tensor; the fastest, and the one whose weights
            FSDP2 can all-gather in FP8) or ``rowwise`` (one scale per row; closer to bf16).
        all_gather: Under FSDP2, all-gather weights in FP8 (half the bytes of bf16), their
            scales computed for all layers at once after each optimizer step. None: on for
            tensorwise, off for rowwise (torchao cannot all-gather row-scaled weights).
        emulate: Emulate the FP8 casts with high-precision matmuls (numerics checks on any
            device); ``auto`` emulates on CPU and runs real FP8 kernels on a GPU.
    """

    enabled: bool = False
    recipe: str = "tensorwise"
    all_gather: bool | None = None
    emulate: bool | str = "auto"

    def __post_init__(self) -> None:
        check_choice("recipe", self.recipe, FP8_RECIPES)
        if self.emulate not in (True, False, "auto"):
            raise ConfigError("emulate", f"got {self.emulate!r}, expected true, false or auto")
        if self.all_gather and self.recipe != "tensorwise":
            raise ConfigError(
                "all_gather",
                f"torchao all-gathers FP8 weights with one scale per tensor; recipe "
                f"{self.recipe!r} scales each row: use recipe tensorwise or all_gather false",
            )

    @property
    def float8_all_gather(self) -> bool:
        """Whether sharded weights are all-gathered in FP8 (when FSDP2 shards at all)."""
        return self.enabled and self.all_gather is not False and self.recipe == "tensorwise"


def fp8_linear_shapes(model: MPTConfig) -> list[tuple[str, str, int, int]]:
    """(key to blame, layer, in_features, out_features) of each linear a block converts."""
    d = model.d_model
    qkv = d + 2 * model.kv_n_heads * model.head_dim
    hidden = model.expansion_ratio * d
    return [
        ("model.d_model", "attn.out_proj", d, d),
        ("model.attn_config.kv_n_heads", "attn.Wqkv", d, qkv),
        ("model.expansion_ratio", "ffn.up_proj", d, hidden),
    ]


def check_fp8_run(cfg: RunConfig) -> None:
    """Cross-section checks of a spec with ``fp8.enabled`` (no-op otherwise)."""
    if not cfg.fp8.enabled:
        return
    if cfg.precision in ("amp_fp8", "amp_fp16"):
        why = (
            "is Composer's TransformerEngine FP8, a second FP8 path over the same matmuls"
            if cfg.precision == "amp_fp8"
            else "scales losses for fp16, which torchao's float8 recipes are not made for"
        )
        raise ConfigError(
            "precision", f"{cfg.precision!r} {why}; with fp8.enabled use amp_bf16 (or auto)"
        )
    m = FP8_DIM_MULTIPLE
    for key, layer, n_in, n_out in fp8_linear_shapes(cfg.model):
        if n_in % m or n_out % m:
            raise ConfigError(
                key,
                f"fp8.enabled needs every block linear's dimensions divisible by {m}; "
                f"blocks.*.{layer} is {n_in} x {n_out}",
            )
    loader = "train_loader" if cfg.train_loader is not None else "finetune_loader"
    seq = getattr(cfg, loader).dataset.max_seq_len
    if seq % m:
        raise ConfigError(
            f"{loader}.dataset.max_seq_len",
            f"{seq} is not a multiple of {m}: with fp8.enabled the tokens of a micro batch are "
            "an FP8 matmul dimension (weight gradients); use a multiple of 16 such as "
            f"{(seq // m + 1) * m}",
        )
