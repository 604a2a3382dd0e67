"""GPU peak FLOP/s and prices, and the arithmetic that turns FLOPs into days and dollars.

One place for the numbers that the cost monitor (``mpt_train.callbacks.cost_monitor``), the
planner (``scripts/plan.py``) and the benchmark (``scripts/benchmark.py``) share, so a price or
a peak changes in one line and every report agrees.

Peak FLOP/s are NVIDIA's dense (no sparsity) tensor-core figures for bf16/fp16, the figures
llm-foundry's MFU tables divide by. Prices are *defaults* for when a spec gives none: round
on-demand cloud rates per GPU-hour. They are placeholders for your contract price
(``cost.price_per_gpu_hour`` in the spec, ``--price`` on the scripts), not a quote.

| GPU type    | peak bf16 TFLOP/s | peak fp8 TFLOP/s | default $/GPU-hour | why that price                       |
|-------------|-------------------|------------------|--------------------|--------------------------------------|
| a100_40gb   | 312               | (none)           | 2.00               | MosaicML's MPT-7B figure ($2/h)      |
| a100_80gb   | 312               | (none)           | 2.50               | typical reserved A100-80GB rate      |
| h100        | 989               | 1979             | 3.00               | typical reserved H100 SXM rate       |
| h100_pcie   | 756               | 1513             | 2.50               | typical H100 PCIe rate (below SXM)   |
| h100_nvl    | 835               | 1671             | 2.75               | between the PCIe and SXM rates       |
| h200        | 989               | 1979             | 3.50               | typical reserved H200 rate           |
| h200_nvl    | 835               | 1671             | 3.25               | below the H200 SXM rate              |

``h100`` and ``h200`` are the SXM parts. The H100 variants differ in clocks and power, so each
has its own peak: NVIDIA's datasheets give 1,979 (SXM), 1,513 (PCIe) and 1,671 (NVL, per GPU of
the pair) sparse bf16 TFLOP/s, halved here for dense; H200 NVL is 1,671 too. Composer's
SpeedMonitor uses the same SXM and PCIe figures (``h100-sxm``, ``h100-pcie``) and knows no NVL
part, so its MFU is missing on NVL GPUs unless ``callbacks.speed_monitor.gpu_flops_available``
is set.

FP8 peaks are NVIDIA's datasheet FP8 tensor-core figures, halved the same way from the sparse
ones: 3,958 (H100 SXM, H200 SXM), 3,026 (H100 PCIe; 1,513 dense), 3,341 (H100 NVL, H200 NVL).
A100s have no FP8 tensor cores. MFU of a run with FP8 linears is still taken against the bf16
peak, as for every run (tokens/s and MFU then compare directly across rows); the FP8 peak is
reported beside it as a share (``throughput/device/fp8_peak_share``).

MFU convention (llm-foundry's): a training step costs 3x its forward FLOPs (forward, backward
for activations, backward for weights), i.e. ``6 * N * T + 12 * L * d_model * S * T`` with N all
parameters, T tokens, S sequence length (causal masking ignored). HFU adds the forward pass
that activation checkpointing recomputes: 4x forward, so ``HFU = MFU * 4 / 3``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mpt_train.errors import ConfigError

if TYPE_CHECKING:
    from mpt_train.model import MPTConfig, MPTModel

__all__ = [
    "GPU_TYPES",
    "GPUSpec",
    "detect_gpu_type",
    "duration_tokens",
    "flops_per_token",
    "get_gpu",
    "hfu_from_mfu",
    "price_per_gpu_hour",
    "shape_model",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPUSpec:
    """What accounting needs to know about one GPU type."""

    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    price_per_hour: float  # default USD per GPU-hour
    memory_gb: int
    fp8_peak_flops: float | None = None  # dense FP8 tensor-core FLOP/s; None: no FP8 cores


GPU_TYPES: dict[str, GPUSpec] = {
    spec.name: spec
    for spec in (
        GPUSpec("a100_40gb", 312e12, 2.00, 40),
        GPUSpec("a100_80gb", 312e12, 2.50, 80),
        GPUSpec("h100", 989e12, 3.00, 80, 1979e12),  # SXM5
        GPUSpec("h100_pcie", 756e12, 2.50, 80, 1513e12),
        GPUSpec("h100_nvl", 835e12, 2.75, 94, 1671e12),
        GPUSpec("h200", 989e12, 3.50, 141, 1979e12),  # SXM
        GPUSpec("h200_nvl", 835e12, 3.25, 141, 1671e12),
    )
}


def get_gpu(name: str, key: str = "gpu_type") -> GPUSpec:
    """The table entry for ``name``, or a ConfigError listing the known types."""
    spec = GPU_TYPES.get(name.lower())
    if spec is None:
        raise ConfigError(
            key, f"unknown GPU type {name!r}, expected one of {', '.join(map(repr, GPU_TYPES))}"
        )
    return spec


def price_per_gpu_hour(gpu_type: str | None, override: float | None) -> float | None:
    """The user's price if given, else the table's default for ``gpu_type``, else None."""
    if override is not None:
        if override < 0:
            raise ConfigError("price_per_gpu_hour", f"got {override}, expected >= 0")
        return float(override)
    if gpu_type is None:
        return None
    return get_gpu(gpu_type).price_per_hour


def detect_gpu_type(device_name: str | None = None) -> str | None:
    """Map a CUDA device name (``NVIDIA A100-SXM4-40GB``) to a table key; None on CPU.

    H100s report their variant in the name, read as Composer's SpeedMonitor reads it:
    ``NVIDIA H100 80GB HBM3`` (SXM) -> ``h100``, ``NVIDIA H100 PCIe`` (or an HBM2e part) ->
    ``h100_pcie``, ``NVIDIA H100 NVL`` -> ``h100_nvl``. An unrecognised GPU, or an H100 whose
    variant the name does not tell, gives None (and a warning) rather than a wrong peak: MFU is
    then reported only when the user names the type or the peak.
    """
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    if "H200" in name:
        return "h200_nvl" if "NVL" in name else "h200"
    if "H100" in name:
        if "NVL" in name:
            return "h100_nvl"
        if "PCIE" in name or "HBM2E" in name:
            return "h100_pcie"
        if "HBM3" in name or "SXM" in name:
            return "h100"
        log.warning(
            "GPU %r: cannot tell which H100 (SXM, PCIe or NVL) from its name; set cost.gpu_type "
            "to h100, h100_pcie or h100_nvl for MFU",
            device_name,
        )
        return None
    if "A100" in name:
        return "a100_80gb" if "80G" in name else "a100_40gb"
    log.warning("GPU %r is not in the accounting table; set cost.gpu_type for MFU", device_name)
    return None


def hfu_from_mfu(mfu: float, activation_checkpointing: bool) -> float:
    """HFU counts the forward pass that activation checkpointing recomputes (4x vs 3x fwd)."""
    return mfu * 4.0 / 3.0 if activation_checkpointing else mfu


def duration_tokens(
    max_duration: str, global_batch_size: int, seq_len: int, key: str = "max_duration"
) -> int:
    """Tokens in a Composer duration (``1e12tok``, ``63900ba``, ``1000sp``).

    Batches and samples are full sequences of ``seq_len`` tokens (the packed-text loader never
    pads). Epochs depend on the dataset's size, which planning does not read: give tokens.
    """
    from composer.core import Time, TimeUnit

    t = Time.from_timestring(str(max_duration))
    if t.unit == TimeUnit.TOKEN:
        return int(t.value)
    if t.unit == TimeUnit.BATCH:
        return int(t.value) * global_batch_size * seq_len
    if t.unit == TimeUnit.SAMPLE:
        return int(t.value) * seq_len
    raise ConfigError(
        key, f"{max_duration!r}: cannot count tokens in unit {t.unit.value!r}; use 'tok' or 'ba'"
    )


def shape_model(model_cfg: MPTConfig) -> MPTModel:
    """The model on the meta device: parameter shapes only, no memory (70B in a second).

    Built with the reference attention kernel: the kernel does not change parameters or FLOPs,
    and planning must work where the run's kernel (flash-attn, a GPU) is not available.
    """
    from mpt_train.model import build_model

    attn = replace(model_cfg.attn_config, impl="torch", flex_kernel_options={})
    cfg = replace(model_cfg, attn_config=attn)
    return build_model(cfg, device="meta")


def flops_per_token(model_cfg: MPTConfig, seq_len: int) -> float:
    """Training FLOPs per token of ``model_cfg`` at ``seq_len``, from the model's own formula.

    The same formula the model reports to Composer for MFU during training.
    """
    return float(shape_model(model_cfg).flops_per_batch(1, seq_len)) / seq_len
