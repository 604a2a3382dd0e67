"""Where the run spec's sections meet: RunConfig -> Composer Trainer, in named steps.

Every builder takes only its own section; this module is the one place that sees them all.
Order matters and is deliberate: the spec is checked against this machine and the world
(ranks, data paths, checkpoint folder) before a single parameter is allocated.

    check_run -> load_run_tokenizer -> build_run_model -> build_data
        -> build_optimizer_and_callbacks -> assemble_trainer
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from composer import Evaluator, Trainer
from composer.core import Callback, DataSpec
from composer.core.algorithm import Algorithm
from composer.utils import dist, format_name_with_dist, reproducibility

from mpt_train.config import RunConfig, redact, to_container
from mpt_train.config.checks import check_spec, resolve_precision
from mpt_train.config.validate import device_train_batch_size, validate_run
from mpt_train.errors import ConfigError, RunInterrupted
from mpt_train.eval.callback import ICLEvalCallback
from mpt_train.eval.icl import for_model
from mpt_train.model import MPTBlock, build_model, check_attention_impl, init_weights
from mpt_train.reliability import (
    check_load_path_trusted,
    check_resume_layout,
    check_resume_spec,
    prepare_resume,
    reliability_callbacks,
)
from mpt_train.reliability.manifest import manifest_path
from mpt_train.reliability.resume import list_checkpoints
from mpt_train.train.callbacks import build_callbacks, build_loggers
from mpt_train.train.clipping import build_gradient_clipping
from mpt_train.train.composer_model import ComposerMPT
from mpt_train.train.data import build_data, load_run_tokenizer
from mpt_train.train.fp8 import (
    Float8ScalePrecompute,
    apply_run_fp8,
    check_fp8_device,
    check_fp8_replication,
)
from mpt_train.train.gloo_average import GlooGradientAverage
from mpt_train.train.optim import build_optimizer, build_scheduler
from mpt_train.train.parallel import apply_unsharded_settings, parallelism_config
from mpt_train.train.trainer import MPTTrainer

__all__ = [
    "RunPlan",
    "build_trainer",
    "check_machine",
    "check_run",
    "is_finished",
    "resolve_run_name",
    "train",
]

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What :func:`check_run` settled about a run: every later step reads it, none re-decides."""

    cfg: RunConfig  # with the run name filled in
    device: str
    precision: str
    world: int
    per_rank: int
    autoresume: bool
    spec: dict[str, Any]  # resolved and redacted, as recorded with every checkpoint
    algorithms: list[Algorithm] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path("runs") / self.cfg.run_name


def resolve_run_name(cfg: RunConfig) -> tuple[str, bool]:
    """(run name, whether the user fixed it). A generated name is the same on every rank."""
    if cfg.run_name:
        return cfg.run_name, True
    name = [f"mpt-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0], False


def _device(cfg: RunConfig) -> str:
    if cfg.device != "auto":
        if cfg.device == "gpu" and not torch.cuda.is_available():
            raise ConfigError("device", "'gpu' requested but no CUDA device is visible")
        return cfg.device
    return "gpu" if torch.cuda.is_available() else "cpu"


def _autoresume(cfg: RunConfig, fixed_name: bool) -> bool:
    """The spec's choice, or on whenever there is a save folder and a fixed name to find."""
    if cfg.autoresume is None:
        return bool(cfg.save_folder) and fixed_name
    return cfg.autoresume


def check_machine(cfg: RunConfig) -> None:
    """Whether this machine has what the spec's attention kernel needs (GPU, packages)."""
    acfg = cfg.model.attn_config
    try:
        check_attention_impl(acfg.impl, acfg.sdpa_backends, acfg.flex_kernel_options)
    except ConfigError as err:
        raise err.with_prefix("model") from None


def check_run(cfg: RunConfig) -> RunPlan:
    """Step 1: check the spec, then the run against this machine and the world; nothing is
    built yet and, for a spec-only reason, not even a process group exists."""
    device = _device(cfg)  # the GPU asked for is visible
    world = dist.get_world_size()  # from the launcher's environment, before any process group
    schedule_note = check_spec(cfg, world, device)
    precision = resolve_precision(cfg, device)
    check_machine(cfg)
    if cfg.fp8.enabled:
        check_fp8_device(cfg.fp8, device)
    # botocore's default (3 tries in ~2 s) turns a short S3 hiccup into a failed run; set the
    # retry budget before anything (write probe, dataset index) talks to a bucket.
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(cfg.reliability.s3_max_attempts))
    dist.initialize_dist(device, timeout=cfg.reliability.collective_timeout_s)
    run_name, fixed_name = resolve_run_name(cfg)
    # The precision recorded with every checkpoint is the resolved one (``auto`` is per device).
    cfg = replace(cfg, run_name=run_name, precision=precision)
    autoresume = _autoresume(cfg, fixed_name)
    spec = redact(to_container(cfg))
    rel = cfg.reliability
    if autoresume and cfg.save_folder:
        # Before anything is loaded, moved or rotated: the checkpoint must be this run's.
        check_resume_spec(cfg.save_folder, run_name, spec, rel.resume_allow_changes)
    validate_run(cfg, world)
    algorithms, callbacks = [], []
    if cfg.gradient_clipping is not None:
        algorithms, callbacks = build_gradient_clipping(
            cfg.gradient_clipping, cfg.optimizer, device == "gpu", precision
        )
    if schedule_note and dist.get_global_rank() == 0:
        log.warning(schedule_note)
    per_rank = device_train_batch_size(cfg, world)
    check_load_path_trusted(cfg.load_path, cfg.save_folder, run_name, rel.trust_checkpoint)
    if autoresume and rel.checkpoint_manifest and cfg.save_folder:
        prepare_resume(cfg.save_folder, run_name, rel.on_corrupt_checkpoint)
    log.info("run %s on %d rank(s), %s, %s", run_name, world, device, precision)
    log.debug("resolved spec:\n%s", yaml.safe_dump(spec, sort_keys=False))
    return RunPlan(cfg, device, precision, world, per_rank, autoresume, spec, algorithms, callbacks)


def build_run_model(run: RunPlan, parallelism: dict[str, Any] | None) -> ComposerMPT:
    """Step 2: the network (on meta, this rank's GPU or the host), compiled, wrapped for Composer."""
    cfg, model_cfg = run.cfg, run.cfg.model
    check_fp8_replication(cfg.fp8, cfg.compile.enabled, parallelism is not None, run.world)
    if model_cfg.init_device == "meta" and parallelism and run.device == "gpu":
        # FSDP shards the meta model, then Composer materialises each shard with this function.
        model = build_model(model_cfg, device="meta")
        model.param_init_fn = lambda module: init_weights(module, model_cfg)
    elif model_cfg.init_device == "meta" and run.device == "gpu":
        # One GPU (or DDP): materialise straight on this rank's GPU; a host build of MPT-3B
        # draws 2.7B random numbers on the CPU and copies 11 GB across before the first step.
        model = build_model(model_cfg, device=torch.device("cuda", dist.get_local_rank()))
    else:
        model = build_model(model_cfg, device="cpu")
    model.fsdp_wrap_fn = lambda module: isinstance(module, MPTBlock)
    model.activation_checkpointing_fn = lambda module: isinstance(module, MPTBlock)
    if cfg.fp8.enabled:  # before FSDP2 (in the Trainer) and torch.compile wrap the blocks
        apply_run_fp8(cfg, model.blocks, run.device, sharded=parallelism is not None)
    if cfg.compile.enabled:
        compiled = [*model.blocks, model.loss_head] if cfg.compile.loss else model.blocks
        for module in compiled:
            module.compile(
                backend=cfg.compile.backend,
                mode=cfg.compile.mode,
                dynamic=cfg.compile.dynamic,
                fullgraph=cfg.compile.fullgraph,
            )
    composer_model = ComposerMPT(
        model, loss_chunk_tokens=cfg.loss.chunk_tokens, train_metrics=cfg.loss.train_metrics
    )
    # A resume loads its own checkpoint: every tensor must be there, whatever load_path allows.
    composer_model.strict_loading = cfg.load_strict_model_weights or run.autoresume
    if parallelism is None:
        apply_unsharded_settings(cfg, composer_model, run.world)
    return composer_model


def build_optimizer_and_callbacks(
    run: RunPlan,
    model: ComposerMPT,
    parallelism: dict[str, Any] | None,
    tokenizer: Any,
    extra_callbacks: list[Callback],
) -> tuple[torch.optim.Optimizer, list[Callback]]:
    """Step 4: the optimizer, and every callback in the order Composer runs them."""
    cfg = run.cfg
    optimizer = build_optimizer(cfg.optimizer, model, on_gpu=run.device == "gpu")
    callbacks = list(run.callbacks)
    if parallelism is not None and run.device == "cpu":
        callbacks.append(GlooGradientAverage())
    if parallelism is not None and cfg.fp8.float8_all_gather:
        callbacks.append(Float8ScalePrecompute())
    callbacks += build_callbacks(cfg, run.spec, run.run_dir)
    callbacks += reliability_callbacks(cfg.reliability, cfg.save_folder, run.run_dir, run.spec)
    if cfg.icl_tasks:
        m = cfg.model
        tasks = [for_model(t, m.learned_pos_emb, m.max_seq_len) for t in cfg.icl_tasks]
        callbacks.append(ICLEvalCallback(tasks, tokenizer, cfg.eval_interval))
    return optimizer, callbacks + list(extra_callbacks)


def assemble_trainer(
    run: RunPlan,
    model: ComposerMPT,
    parallelism: dict[str, Any] | None,
    data: tuple[DataSpec, list[Evaluator]],
    optimizer: torch.optim.Optimizer,
    callbacks: list[Callback],
) -> Trainer:
    """Step 5: hand every part to Composer's Trainer."""
    cfg = run.cfg
    train_dl, evaluators = data
    mb = cfg.device_train_microbatch_size
    return MPTTrainer(
        run_name=cfg.run_name,
        seed=cfg.seed,
        model=model,
        train_dataloader=train_dl,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval if evaluators else 1,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=optimizer,
        schedulers=build_scheduler(cfg.scheduler),
        max_duration=cfg.max_duration,
        device_train_microbatch_size=mb if mb is not None else run.per_rank,
        device=run.device,
        precision=run.precision,
        parallelism_config=parallelism,
        algorithms=run.algorithms,
        loggers=build_loggers(cfg, cfg.run_name),
        callbacks=callbacks,
        progress_bar=cfg.progress_bar,
        log_to_console=False,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=run.autoresume,
        # With autoresume, a checkpoint found in save_folder wins over load_path.
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        load_strict_model_weights=cfg.load_strict_model_weights,
        dist_timeout=cfg.reliability.collective_timeout_s,
        accumulate_train_batch_on_tokens=True,
        python_log_level=None,
        overlap_step_end=cfg.overlap_step_end,
    )


def build_trainer(cfg: RunConfig, *, extra_callbacks: list[Callback] | None = None) -> Trainer:
    """Check the spec against the world, build every part, return a ready Composer Trainer."""
    run = check_run(cfg)
    # Composer seeds after the model is built: seed first so fresh runs are reproducible.
    reproducibility.seed_all(run.cfg.seed)
    tokenizer = load_run_tokenizer(run.cfg)
    parallelism = parallelism_config(run.cfg, run.device)
    if run.autoresume:
        f = run.cfg.fsdp
        sharded = parallelism is not None and f is not None and f.state_dict_type == "sharded"
        check_resume_layout(run.cfg.save_folder, run.cfg.run_name, sharded)
    model = build_run_model(run, parallelism)
    data = build_data(run.cfg, tokenizer, run.per_rank)
    optimizer, callbacks = build_optimizer_and_callbacks(
        run, model, parallelism, tokenizer, extra_callbacks or []
    )
    return assemble_trainer(run, model, parallelism, data, optimizer, callbacks)


def is_finished(trainer: Trainer) -> bool:
    """True when the (resumed) state already reached ``max_duration``."""
    max_dur = trainer.state.max_duration
    return max_dur is not None and trainer.state.timestamp.get(max_dur.unit) >= max_dur


def train(cfg: RunConfig) -> Trainer:
    """Build and fit; returns the trainer (closed) for callers that inspect its state.

    A run resumed from its final checkpoint is already done: it returns at once instead of
    training past ``max_duration`` or failing.
    """
    trainer = build_trainer(cfg)
    try:
        if is_finished(trainer):
            log.info(
                "run %s already reached max_duration %s; nothing to do",
                trainer.state.run_name,
                trainer.state.max_duration,
            )
        else:
            evaluators = trainer.state.evaluators
            if cfg.eval_first and evaluators and int(trainer.state.timestamp.batch) == 0:
                trainer.eval()
            trainer.fit()
    except KeyboardInterrupt:
        raise RunInterrupted(_where_stopped(trainer, cfg)) from None
    finally:
        trainer.close()
    return trainer


def _where_stopped(trainer: Trainer, cfg: RunConfig) -> str:
    """Where an interrupted run stopped, and what the same command will do next."""
    state = trainer.state
    where = f"run {state.run_name} interrupted at batch {int(state.timestamp.batch)}"
    if not (cfg.save_folder and trainer.state.run_name and cfg.autoresume is not False):
        return f"{where}; it saves no checkpoints to resume from: the same command starts over"
    folder = format_name_with_dist(cfg.save_folder, state.run_name)
    if "://" in folder:
        return f"{where}; the same command resumes from the newest checkpoint in {folder}"
    # The newest complete checkpoint (one cut short by the interruption has no manifest).
    done = (
        [
            n
            for _, n in list_checkpoints(Path(folder))
            if not cfg.reliability.checkpoint_manifest or manifest_path(folder, n).exists()
        ]
        if Path(folder).is_dir()
        else []
    )
    if not done:
        return f"{where}, before its first checkpoint: the same command starts over"
    return f"{where}; the same command resumes from {Path(folder) / done[0]}"
