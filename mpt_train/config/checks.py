"""Checks of a whole run spec that need nothing but the spec: combinations of sections.

One function, :func:`check_spec`, run by everything that is about to act on a spec:
``train.py --dry-run``, ``scripts/sweep.py`` before launching, ``scripts/plan.py``, and
training itself before any process group, model or data loader exists. So what training
refuses for a spec-only reason is refused by all of them, with the same key and message.

Checks that depend on the device read it from the spec (``device: cpu|gpu``); with
``device: auto`` they wait for training, which passes the device it found. Checks of the world
outside the spec (files, buckets, ranks per node, installed packages, GPUs) live in
:mod:`mpt_train.config.validate` and :func:`mpt_train.model.check_attention_impl`.
"""

from __future__ import annotations

from mpt_train.config.schema import (
    CUDA_GRAPH_MODES,
    GradientClippingConfig,
    OptimizerConfig,
    RunConfig,
    check_schedule,
)
from mpt_train.config.validate import check_batch_split
from mpt_train.data.config import TextLoaderConfig
from mpt_train.errors import ConfigError
from mpt_train.model.kernels import kernel, kernels_with

__all__ = [
    "CPU_SDPA_BACKENDS",
    "REMOTE_SCHEMES",
    "adamw_kernel",
    "check_spec",
    "resolve_precision",
    "why_not_fused",
]

#: SDPA kernels torch has for CPU tensors
CPU_SDPA_BACKENDS = {"flash", "math"}
REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "hf://", "dbfs:/", "sftp://")


def check_spec(
    cfg: RunConfig, world_size: int = 1, device: str | None = None, *, schedule: bool = True
) -> str | None:
    """Refuse what no machine could run; return the schedule's warning, if any.

    ``device``: where the run will be ("cpu" or "gpu"); None reads the spec, where ``auto``
    leaves the device-dependent checks to training. ``schedule=False`` skips the LR schedule
    against ``max_duration`` (for tools that size a spec at other lengths).
    """
    device = device or (cfg.device if cfg.device != "auto" else None)
    precision = resolve_precision(cfg, device)
    _check_kernel(cfg, device, precision)
    if cfg.device_train_microbatch_size == "auto" and device == "cpu":
        raise ConfigError("device_train_microbatch_size", "'auto' needs a GPU; give an int on CPU")
    if cfg.gradient_clipping is not None and device is not None and precision is not None:
        _check_clipping(cfg, device, precision)
    if cfg.autoresume and not (cfg.save_folder and cfg.run_name):
        raise ConfigError("autoresume", "needs save_folder and a fixed run_name (or $RUN_NAME)")
    check_batch_split(cfg, world_size)
    _check_loaders(cfg)
    return check_schedule(cfg.scheduler, cfg.max_duration) if schedule else None


def resolve_precision(cfg: RunConfig, device: str | None) -> str | None:
    """The precision the run computes in on ``device``; None while the device is unknown
    and the spec says ``auto``."""
    if cfg.precision == "auto":
        return None if device is None else ("amp_bf16" if device == "gpu" else "fp32")
    if device == "cpu" and cfg.precision != "fp32":
        raise ConfigError("precision", f"{cfg.precision!r} needs a GPU; use 'fp32' on CPU")
    return cfg.precision


def _check_kernel(cfg: RunConfig, device: str | None, precision: str | None) -> None:
    """The attention kernel against the run's compile settings, precision and device: the
    checks that need no device first, so a spec with ``device: auto`` is refused for the same
    reason by ``--dry-run`` as by training."""
    acfg, c = cfg.model.attn_config, cfg.compile
    k = kernel(acfg.impl)
    if c.enabled and c.mode in CUDA_GRAPH_MODES and not k.cuda_graphs:
        # cuDNN's frontend copies the ALiBi slopes from host memory at each call: not capturable.
        raise ConfigError(
            "compile.mode",
            f"{c.mode!r} captures CUDA graphs, which impl {k.name!r} cannot run inside; "
            "use compile.mode default or max-autotune-no-cudagraphs",
        )
    if precision == "fp32" and not k.fp32:
        # Advice that works on this machine, whichever it is: a CPU has no bf16 to switch to.
        cpu = ", ".join(kernels_with("devices", ("cpu", "gpu")))
        raise ConfigError(
            "model.attn_config.impl",
            f"{k.name!r} needs bf16/fp16 activations: on a GPU use precision amp_bf16, on a "
            f"CPU one of: {cpu}",
        )
    if device != "cpu":
        return
    if "cpu" not in k.devices:
        raise ConfigError(
            "model.attn_config.impl",
            f"{k.name!r} runs on {'/'.join(k.devices)} only and device is cpu; "
            f"use one of: {', '.join(kernels_with('devices', ('cpu', 'gpu')))}",
        )
    if acfg.sdpa_backends and not CPU_SDPA_BACKENDS & set(acfg.sdpa_backends):
        raise ConfigError(
            "model.attn_config.sdpa_backends",
            f"got {list(acfg.sdpa_backends)}, none of which runs without a CUDA GPU; "
            "on CPU SDPA has flash and math",
        )
    if c.enabled and c.backend == "inductor" and not k.compiles_on_cpu:
        raise ConfigError(
            "compile.enabled",
            "compiled FlexAttention needs CUDA (Inductor cannot compile its backward on CPU); "
            "on CPU set compile.enabled=false or model.attn_config.impl=sdpa",
        )


def _check_clipping(cfg: RunConfig, device: str, precision: str) -> None:
    """``implementation: fused`` where the optimizer's kernel cannot fold the clip."""
    clip = cfg.gradient_clipping
    if clip.implementation != "fused":
        return
    why_not = why_not_fused(clip, cfg.optimizer, device == "gpu", precision)
    if why_not:
        raise ConfigError("gradient_clipping.implementation", f"'fused' is not possible: {why_not}")


def _check_loaders(cfg: RunConfig) -> None:
    """Every data section against the model: lengths, sources, document masks."""
    if cfg.train_loader is not None:
        _check_loader("train_loader", cfg.train_loader, cfg, training=True)
    if cfg.eval_loader is not None:
        _check_loader("eval_loader", cfg.eval_loader, cfg, training=False)
    for label, loader in cfg.eval_loaders.items():
        _check_loader(f"eval_loaders.{label}", loader, cfg, training=False)
    if cfg.finetune_loader is not None:
        ds = cfg.finetune_loader.dataset
        if ds.max_seq_len > cfg.model.max_seq_len:
            raise ConfigError(
                "finetune_loader.dataset.max_seq_len",
                f"{ds.max_seq_len} is above the model's max_seq_len {cfg.model.max_seq_len}",
            )
        if ds.packing and not cfg.model.attn_config.attn_uses_sequence_id:
            raise ConfigError(
                "finetune_loader.dataset.packing",
                "packed examples would attend to each other: set "
                "model.attn_config.attn_uses_sequence_id=true or packing=false",
            )


def _check_loader(key: str, loader: TextLoaderConfig, cfg: RunConfig, training: bool) -> None:
    ds = loader.dataset
    model_len = cfg.model.max_seq_len
    if ds.max_seq_len > model_len and (training or cfg.model.learned_pos_emb):
        why = "" if training else " (learned position embeddings cannot go past their table)"
        raise ConfigError(
            f"{key}.dataset.max_seq_len",
            f"{ds.max_seq_len} is above the model's max_seq_len {model_len}{why}",
        )
    if loader.name == "synthetic":
        if not training and cfg.eval_subset_num_batches <= 0:
            raise ConfigError(
                f"{key}.name",
                "a synthetic eval set never ends: set eval_subset_num_batches > 0 "
                "(or use a real eval set)",
            )
        return  # no sources: ids are generated in the training process
    if ds.streams:
        for name, stream in ds.streams.items():
            _check_source(f"{key}.dataset.streams.{name}", stream.remote, stream.local)
    else:
        _check_source(f"{key}.dataset", ds.remote, ds.local)


def _check_source(key: str, remote: str | None, local: str | None) -> None:
    if remote:
        if "://" in remote and not remote.startswith(REMOTE_SCHEMES):
            raise ConfigError(
                f"{key}.remote",
                f"{remote!r}: unsupported scheme, expected one of {REMOTE_SCHEMES}",
            )
        return
    if not local:
        raise ConfigError(key, "set 'local' (an MDS folder) or 'remote' (a URL) for the data")


def adamw_kernel(cfg: OptimizerConfig, on_gpu: bool) -> str | None:
    """What runs the AdamW update: 'fused', 'foreach' or 'composer'; None for Lion."""
    if cfg.name == "decoupled_lionw":
        return None
    if cfg.implementation == "auto":
        return "fused" if on_gpu else "foreach"
    return cfg.implementation


def why_not_fused(
    cfg: GradientClippingConfig, optimizer: OptimizerConfig, on_gpu: bool, precision: str
) -> str:
    """Why clipping cannot be folded into the optimizer's step, or '' when it can."""
    if cfg.clipping_type != "norm":
        return f"clipping_type {cfg.clipping_type!r} is not a norm clip"
    step = adamw_kernel(optimizer, on_gpu)
    if step != "fused":
        return (
            f"optimizer {optimizer.name!r} runs on the {step or 'Lion'} kernel, which has no "
            "grad_scale input: needs torch's fused AdamW (optimizer.implementation fused, or "
            "auto on a GPU)"
        )
    if precision == "amp_fp16":
        return "precision amp_fp16: the fp16 loss scaler owns the optimizer's grad_scale"
    return ""
