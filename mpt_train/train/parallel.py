"""How a run spreads over its ranks: FSDP2 settings for Composer, or (one rank, NO_SHARD) the
parts of the ``fsdp`` section that still apply without sharding."""

from __future__ import annotations

import logging
from typing import Any

from composer.distributed.activation_checkpointing import apply_ac
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config

from mpt_train.config import RunConfig
from mpt_train.errors import ConfigError
from mpt_train.model import MPTBlock
from mpt_train.train.composer_model import ComposerMPT

__all__ = ["apply_unsharded_settings", "parallelism_config"]

log = logging.getLogger(__name__)


def parallelism_config(cfg: RunConfig, device: str) -> dict[str, Any] | None:
    """FSDP2 settings, or None for one rank (no sharding to do) or NO_SHARD (plain DDP)."""
    f = cfg.fsdp
    world = dist.get_world_size()
    if f is None or world == 1 or f.sharding_strategy == "NO_SHARD":
        return None
    mesh = None
    if f.sharding_strategy == "HYBRID_SHARD":
        from torch.distributed.device_mesh import init_device_mesh

        local = dist.get_local_world_size()
        if world % local:
            raise ConfigError(
                "fsdp.sharding_strategy",
                f"HYBRID_SHARD needs whole nodes: world size {world} is not a multiple of the "
                f"{local} ranks per node",
            )
        mesh = init_device_mesh(
            "cuda" if device == "gpu" else "cpu",
            (world // local, local),
            mesh_dim_names=("replicate", "shard"),
        )
    return {
        "fsdp": FSDP2Config(
            device_mesh=mesh,
            reshard_after_forward=f.sharding_strategy != "SHARD_GRAD_OP",
            activation_checkpointing=f.activation_checkpointing,
            activation_cpu_offload=f.activation_cpu_offload,
            state_dict_type=f.state_dict_type,
            mixed_precision=f.mixed_precision,
        )
    }


def apply_unsharded_settings(cfg: RunConfig, model: ComposerMPT, world: int) -> None:
    """Without FSDP (one rank, NO_SHARD) keep what still applies: activation checkpointing."""
    f = cfg.fsdp
    if f is None:
        return
    if f.activation_checkpointing or f.activation_cpu_offload:
        apply_ac(
            model,
            f.activation_checkpointing,
            f.activation_cpu_offload,
            check_fn=lambda module: isinstance(module, MPTBlock),
        )
    ignored = f.mixed_precision != "DEFAULT" or f.sharding_strategy not in (
        "FULL_SHARD",
        "NO_SHARD",
    )
    if ignored and dist.get_global_rank() == 0:
        log.warning(
            "fsdp.mixed_precision=%s / fsdp.sharding_strategy=%s have no effect without sharding "
            "(%d rank(s)); `precision` alone sets the compute dtype",
            f.mixed_precision,
            f.sharding_strategy,
            world,
        )
