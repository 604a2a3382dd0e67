"""FP8 linears in the transformer blocks, through torchao's float8 training.

The blocks' ``nn.Linear`` layers (QKV, attention output, MLP up and down) become torchao
``Float8Linear``: inputs, weights and output gradients are cast to float8 with dynamic scales
and multiplied on the GPU's FP8 tensor cores, while weights, gradients and optimizer state stay
in high precision. The embedding and the tied LM head stay as they are (the head's logits are
the most precision-sensitive matmul, and an embedding is no matmul).

Order, as torchao requires: conversion after the model is built and before FSDP2 wraps it and
before ``torch.compile``. Under FSDP2 with the tensorwise recipe the sharded weights are
all-gathered in float8 (half the bytes of bf16); their scales are then computed for all layers
in one all-reduce after each optimizer step (:class:`Float8ScalePrecompute`).

Checkpoints stay plain: state dicts hold the high-precision weights under the same keys as an
unconverted model, so a checkpoint resumes with or without FP8 and exports to Hugging Face as
any other (:func:`convert_blocks` registers the hook that unwraps torchao's weight wrapper).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch import nn

from mpt_train.config.fp8 import Fp8Config
from mpt_train.errors import ConfigError

if TYPE_CHECKING:
    from mpt_train.config.schema import RunConfig

__all__ = [
    "FP8_MIN_CAPABILITY",
    "Float8ScalePrecompute",
    "apply_fp8",
    "apply_run_fp8",
    "check_fp8_device",
    "check_fp8_replication",
    "convert_blocks",
    "float8_linear_config",
    "plain_tensor",
]

log = logging.getLogger(__name__)

#: FP8 tensor cores: Ada (8.9: L4, L40S) and Hopper (9.0: H100, H200) and newer.
FP8_MIN_CAPABILITY = (8, 9)


def check_fp8_replication(fp8: Fp8Config, compiled: bool, sharded: bool, world: int) -> None:
    """Compiled FP8 linears under plain DDP (NO_SHARD, or no fsdp section, on several ranks)
    fail in Dynamo: torchao supports float8 with compile under FSDP2, not DDP
    (pytorch/ao#1308)."""
    if fp8.enabled and compiled and not sharded and world > 1:
        raise ConfigError(
            "fsdp.sharding_strategy",
            f"fp8 with compile.enabled on {world} ranks needs FSDP2 sharding (FULL_SHARD, "
            "SHARD_GRAD_OP or HYBRID_SHARD); torchao's compiled float8 does not run under DDP "
            "(NO_SHARD)",
        )


def check_fp8_device(fp8: Fp8Config, device: str) -> bool:
    """Refuse, naming the key, where FP8 cannot run; return whether to emulate."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "fp8.enabled",
            f"needs the torchao package ({e}); install mpt-train's pinned dependencies "
            "(torchao 0.11.0 goes with torch 2.7, 0.17.0 with torch 2.11)",
        ) from None
    emulate = fp8.emulate if fp8.emulate != "auto" else device == "cpu"
    if device == "cpu" and not emulate:
        raise ConfigError(
            "fp8.emulate",
            "false needs FP8 tensor cores, and this run is on CPU; set emulate auto or true "
            "(FP8 numerics with high-precision matmuls) or run on a GPU",
        )
    if device == "gpu" and not emulate:
        cap = torch.cuda.get_device_capability()
        if cap < FP8_MIN_CAPABILITY:
            raise ConfigError(
                "fp8.enabled",
                f"needs a GPU of compute capability 8.9+ (L4, L40S, H100, H200); "
                f"{torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}",
            )
    return bool(emulate)


def float8_linear_config(
    fp8: Fp8Config, *, emulate: bool, all_gather: bool, recompute_weight: bool
) -> Any:
    """torchao's ``Float8LinearConfig`` for the spec's recipe.

    ``recompute_weight``: cast the weight to float8 again in the backward instead of keeping
    the cast from the forward; under FSDP2 that kept cast is a whole unsharded weight per layer
    (torchao's advice for sharded runs; activation checkpointing recomputes it anyway).
    """
    from torchao.float8 import Float8LinearConfig

    base = Float8LinearConfig.from_recipe_name(fp8.recipe)
    # from_recipe_name returns a frozen dataclass: rebuild it with the switches set.
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields.update(
        emulate=emulate,
        enable_fsdp_float8_all_gather=all_gather,
        force_recompute_fp8_weight_in_bwd=recompute_weight and fp8.recipe == "tensorwise",
    )
    return Float8LinearConfig(**fields)


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """The high-precision tensor inside torchao's float8 weight wrapper (itself otherwise).

    Handles the wrapper alone and as the local shard of an FSDP2 DTensor; the result shares
    storage with the weight, so loading a checkpoint into it loads the model.
    """
    from torch.distributed.tensor import DTensor
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    if isinstance(t, DTensor) and isinstance(t._local_tensor, WeightWithDynamicFloat8CastTensor):
        local = t._local_tensor._tensor
        return DTensor.from_local(
            local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    if isinstance(t, WeightWithDynamicFloat8CastTensor):
        return t._tensor
    return t


def _plain_state_dict(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict and isinstance(state_dict[key], torch.Tensor):
            state_dict[key] = plain_tensor(state_dict[key])


def convert_blocks(blocks: nn.ModuleList, config: Any) -> int:
    """Swap every ``nn.Linear`` inside the blocks for a ``Float8Linear``; return how many."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    count = 0
    for block in blocks:
        convert_to_float8_training(block, config=config)
        for module in block.modules():
            if isinstance(module, Float8Linear):
                module._register_state_dict_hook(_plain_state_dict)
                count += 1
    return count


def apply_fp8(
    fp8: Fp8Config,
    blocks: nn.ModuleList,
    *,
    emulate: bool,
    sharded: bool,
    activation_checkpointing: bool,
    compiled: bool,
    on_gpu: bool,
) -> bool:
    """Convert the blocks' linears as the spec asks (call before FSDP2 and torch.compile).

    Returns whether weights are all-gathered in float8, i.e. whether the run needs
    :class:`Float8ScalePrecompute` (only with FSDP2 sharding and the tensorwise recipe).
    """
    all_gather = fp8.float8_all_gather and sharded
    config = float8_linear_config(
        fp8,
        emulate=emulate,
        all_gather=all_gather,
        recompute_weight=sharded and not activation_checkpointing,
    )
    n = convert_blocks(blocks, config)
    log.info(
        "fp8 %s: %d block linears%s%s",
        fp8.recipe,
        n,
        ", float8 weight all-gather" if all_gather else "",
        ", emulated" if emulate else "",
    )
    if on_gpu and not compiled:
        log.warning("fp8 without compile.enabled: unfused casts make it slower than bf16")
    return all_gather


def apply_run_fp8(cfg: RunConfig, blocks: nn.ModuleList, device: str, sharded: bool) -> bool:
    """:func:`apply_fp8` with the run spec's settings; whether weights all-gather in float8."""
    return apply_fp8(
        cfg.fp8,
        blocks,
        emulate=check_fp8_device(cfg.fp8, device),
        sharded=sharded,
        activation_checkpointing=bool(cfg.fsdp and cfg.fsdp.activation_checkpointing),
        compiled=cfg.compile.enabled,
        on_gpu=device == "gpu",
    )


class Float8ScalePrecompute(Callback):
    """After each optimizer step (and once before the first), compute the float8 scales of
    all FSDP2-sharded weights in one all-reduce, for the next step's float8 all-gathers.

    Without it each layer's all-gather would first all-reduce its own weight's amax. Computing
    them before the first step too makes every step take the same path, so a resumed run
    repeats the uninterrupted one bit for bit.
    """

    def fit_start(self, state: State, logger: Logger) -> None:
        self._precompute(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._precompute(state)

    @staticmethod
    def _precompute(state: State) -> None:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(state.model)
