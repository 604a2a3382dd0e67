"""Where the run spec's sections meet: RunConfig -> Composer Trainer.

Every builder takes only its own section; this module is the one place that sees them all.
Order matters and is deliberate: the spec is checked against the world (ranks, data paths,
checkpoint folder) before a single parameter is allocated.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from composer import Evaluator, Trainer
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator
from composer.core import Callback, DataSpec, State
from composer.devices import DeviceGPU
from composer.distributed.activation_checkpointing import apply_ac
from composer.loggers import Logger, LoggerDestination, WandBLogger
from composer.utils import dist, reproducibility
from composer.utils.parallelism import FSDP2Config

from mpt_train.callbacks import CostMonitor, TrainSpeedMonitor
from mpt_train.callbacks.accounting import detect_gpu_type, get_gpu
from mpt_train.config import RunConfig, redact, to_container
from mpt_train.config.schema import CUDA_GRAPH_MODES, check_schedule
from mpt_train.config.validate import device_train_batch_size, validate_run
from mpt_train.data import build_text_dataloader, load_tokenizer
from mpt_train.data.config import TextLoaderConfig
from mpt_train.data.finetune import FinetuneLoaderConfig, build_finetune_dataloader
from mpt_train.data.synthetic import build_synthetic_dataloader
from mpt_train.errors import ConfigError
from mpt_train.eval.callback import ICLEvalCallback
from mpt_train.eval.icl import for_model
from mpt_train.loggers import ConsoleLine, JsonlLogger
from mpt_train.model import MPTBlock, build_model, init_weights
from mpt_train.reliability import (
    check_load_path_trusted,
    check_resume_layout,
    prepare_resume,
    reliability_callbacks,
)
from mpt_train.train.clipping import build_gradient_clipping
from mpt_train.train.composer_model import IGNORE_INDEX, ComposerMPT, shift_labels
from mpt_train.train.gloo_average import GlooGradientAverage
from mpt_train.train.host_reads import side_stream
from mpt_train.train.optim import build_optimizer, build_scheduler

__all__ = ["RunSpecRecorder", "build_trainer", "resolve_run_name", "train"]

log = logging.getLogger(__name__)


class RunSpecRecorder(Callback):
    """Stores the resolved, redacted spec in every checkpoint and next to the metrics."""

    def __init__(self, spec: dict[str, Any], out_dir: Path) -> None:
        self.spec = spec
        self.out_dir = out_dir

    def init(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.spec, sort_keys=False))

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The spec of the resumed run is the one given now; the saved one is for the record."""


class MPTTrainer(Trainer):
    """Composer's Trainer, with host waits taken out of the step.

    * ``optimizer.step()`` without a closure. By default Composer runs the forward and
      backward inside a closure handed to the optimizer and returns ``loss.item()`` from it,
      for optimizers that re-evaluate the loss (LBFGS, SAM): the host then waits for the whole
      backward before it can queue the optimizer's kernels, and the GPU idles for that
      hand-over every step. mpt-train's optimizers (torch's and Composer's AdamW, Lion) never
      read the closure's result. With the loss guard deciding on the device and the norm clip
      folded into the fused step, the host reads nothing back between a step's first forward
      and its update (with ``device_train_microbatch_size: auto`` Composer still reads an OOM
      flag after every forward).
    * With one rank, samples and tokens are counted on the host: Composer adds them up across
      ranks by a device round trip, a wait for the whole update.
    * ``overlap_step_end`` (GPU, no fp16 loss scaling): Composer reads the step's loss with
      ``.cpu().item()`` right after queuing the update, so the host idles until the update
      ends and only then runs the between-step work (callbacks, loggers, the scheduler, the
      next batch) while the GPU idles in turn. Here that read (and the cross-rank counts) run
      on a side stream that waits for the loss only; the default stream is current again
      before any callback runs, so everything that reads weights still waits for the update.
      The loss guard's and the clip's numbers are copied early (:mod:`mpt_train.train.host_reads`).
      Composer still waits for the update at its next-batch check (``iter_finished.item()``
      after fetching the batch), after every forward with ``device_train_microbatch_size:
      auto``, and in ``loss.train_metrics``' sync: the overlap is BATCH_END to the fetch.
    """

    def __init__(self, *args: Any, overlap_step_end: bool = False, **kwargs: Any) -> None:
        self._overlap_step_end = overlap_step_end
        self._loss_ready: torch.cuda.Event | None = None
        self._main: torch.cuda.Stream | None = None
        super().__init__(*args, **kwargs)

    def _use_closures(self) -> bool:
        return False

    def _train_microbatches(
        self, microbatches: Any, total_loss_dict: dict[str, torch.Tensor], ddp_sync: bool = True
    ) -> torch.Tensor:
        loss = super()._train_microbatches(microbatches, total_loss_dict, ddp_sync)
        if self._overlap_step_end and isinstance(self.state.device, DeviceGPU):
            self._loss_ready = torch.cuda.Event()
            self._loss_ready.record()  # after the backward and AFTER_TRAIN_BATCH, before the update
        return loss

    def _train_loop(self) -> None:
        try:
            super()._train_loop()
        finally:  # an error between the loss read and the step end must not leave the side on
            self._back_on_main()

    def _back_on_main(self) -> None:
        if self._main is not None:
            torch.cuda.set_stream(self._main)
            self._main = None

    def _train_batch(self, use_grad_scaling: bool) -> dict[str, torch.Tensor]:
        self._back_on_main()
        self._loss_ready = None
        total = super()._train_batch(use_grad_scaling)
        ready, self._loss_ready = self._loss_ready, None
        # fp16 loss scaling: the scaler's update, next, reads the optimizer's inf checks.
        if ready is None or total is None or use_grad_scaling:
            return total
        side = side_stream()
        self._main = torch.cuda.current_stream()
        side.wait_event(ready)
        for t in total.values():
            t.record_stream(side)  # made on the main stream, read on the side one
        torch.cuda.set_stream(side)  # until _accumulate_time_across_ranks has run
        return total

    def _accumulate_time_across_ranks(
        self, num_samples: int | float, num_tokens: int, batch_time: datetime.timedelta
    ) -> tuple[int, int, datetime.timedelta]:
        """Called once per step, after the loss is read and before any event of the step end."""
        try:
            if dist.get_world_size() == 1:  # a sum over one rank
                return round(num_samples), int(num_tokens), batch_time
            return super()._accumulate_time_across_ranks(num_samples, num_tokens, batch_time)
        finally:
            self._back_on_main()


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


def _precision(cfg: RunConfig, device: str) -> str:
    if cfg.precision == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    if device == "cpu" and cfg.precision != "fp32":
        raise ConfigError("precision", f"{cfg.precision!r} needs a GPU; use 'fp32' on CPU")
    return cfg.precision


def _parallelism(cfg: RunConfig, device: str) -> dict[str, Any] | None:
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
        if device == "cpu" and world > local:
            raise ConfigError(
                "fsdp.sharding_strategy",
                f"HYBRID_SHARD across {world // local} nodes of CPU ranks: FSDP2 averages the "
                "replicas' gradients with an all-reduce that torch's gloo backend cannot do "
                "(ReduceOp.AVG); use FULL_SHARD on CPU",
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


def _unsharded_fsdp_settings(cfg: RunConfig, model: ComposerMPT, world: int) -> None:
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


def _token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Tokens of a batch: ``total`` for throughput, ``loss_generating`` to weight microbatches.

    Padding (``sequence_id`` -1 in fine-tuning batches) is not data. Weighting microbatches by
    the tokens that carry loss (not by samples) makes a fine-tune's gradient the mean over all
    response tokens of the global batch, whatever the microbatch size or number of ranks.
    """
    seq_id = batch.get("sequence_id")
    total = int((seq_id >= 0).sum()) if seq_id is not None else int(batch["input_ids"].numel())
    return {"total": total, "loss_generating": int((shift_labels(batch) != IGNORE_INDEX).sum())}


def _pretrain_token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """:func:`_token_counts` of a pretraining batch, read off its shape.

    Text and synthetic batches are all data, and every position but the last has a target.
    Counting from shapes keeps each microbatch from waiting on a device-to-host copy (Composer
    asks for these counts at every microbatch, before its forward pass).
    """
    bsz, seq_len = batch["input_ids"].shape[:2]
    return {"total": bsz * seq_len, "loss_generating": bsz * (seq_len - 1)}


def _dataloader(
    loader: TextLoaderConfig, tokenizer: Any, batch_size: int, seq_id: bool, vocab_size: int
) -> DataSpec:
    if loader.name == "synthetic":
        dl = build_synthetic_dataloader(loader, vocab_size, batch_size, emit_sequence_id=seq_id)
    else:
        dl = build_text_dataloader(
            loader, tokenizer, batch_size, emit_sequence_id=seq_id, vocab_size=vocab_size
        )
    return DataSpec(dl, get_num_tokens_in_batch=_pretrain_token_counts)


def _needs_tokenizer(cfg: RunConfig) -> bool:
    """Real data and ICL need the tokenizer; synthetic batches do not (nothing to download)."""
    loaders = [cfg.train_loader, cfg.eval_loader, *cfg.eval_loaders.values()]
    real = any(lo is not None and lo.name != "synthetic" for lo in loaders)
    return real or cfg.finetune_loader is not None or bool(cfg.icl_tasks)


def _finetune_dataloader(loader: FinetuneLoaderConfig, tokenizer: Any, batch_size: int) -> DataSpec:
    try:
        dl = build_finetune_dataloader(loader, tokenizer, batch_size)
    except ConfigError as err:
        raise err.with_prefix("finetune_loader") from None
    return DataSpec(dl, get_num_tokens_in_batch=_token_counts)


def _loggers(cfg: RunConfig, run_name: str) -> list[LoggerDestination]:
    lc = cfg.loggers
    out: list[LoggerDestination] = []
    if lc.console:
        out.append(ConsoleLine(lc.console_log_interval))
    if lc.jsonl is not None:
        out.append(JsonlLogger(lc.jsonl.path.format(run_name=run_name)))
    if lc.wandb is not None:
        w = lc.wandb
        out.append(
            WandBLogger(
                project=w.project,
                entity=w.entity,
                group=w.group,
                tags=list(w.tags) or None,
                name=run_name,
                log_artifacts=w.log_artifacts,
                init_kwargs={"config": redact(to_container(cfg))},
            )
        )
    return out


def _callbacks(cfg: RunConfig, spec: dict[str, Any], run_dir: Path) -> list[Callback]:
    cc = cfg.callbacks
    out: list[Callback] = [RunSpecRecorder(spec, run_dir)]
    # One peak for both monitors' MFU: the spec's, else the dense bf16 peak of the GPU named in
    # `cost` or detected (Composer's own lookup knows no H100 NVL and reads an H200 NVL as SXM).
    gpu_type = cfg.cost.gpu_type or detect_gpu_type()
    peak = cc.speed_monitor.gpu_flops_available if cc.speed_monitor is not None else None
    if peak is None and gpu_type is not None:
        peak = get_gpu(gpu_type).peak_flops
    if cc.speed_monitor is not None:
        out.append(
            TrainSpeedMonitor(window_size=cc.speed_monitor.window_size, gpu_flops_available=peak)
        )
    if cc.lr_monitor:
        out.append(LRMonitor())
    if cc.memory_monitor and torch.cuda.is_available():
        out.append(MemoryMonitor())
    if cc.runtime_estimator:
        out.append(RuntimeEstimator(time_unit="seconds"))
    if cc.cost_monitor is not None:
        out.append(
            CostMonitor(
                gpu_type=gpu_type,
                price_per_gpu_hour=cfg.cost.price_per_gpu_hour,
                peak_flops=peak,
                # applied through FSDP2, or directly to the blocks without sharding
                activation_checkpointing=bool(cfg.fsdp and cfg.fsdp.activation_checkpointing),
                log_interval=cc.cost_monitor.log_interval,
                ledger_path=str(run_dir / "cost_ledger.json") if cc.cost_monitor.ledger else None,
            )
        )
    return out


def build_trainer(cfg: RunConfig, *, extra_callbacks: list[Callback] | None = None) -> Trainer:
    """Check the spec against the world, build every part, return a ready Composer Trainer."""
    device = _device(cfg)
    # botocore's default (3 tries in ~2 s) turns a short S3 hiccup into a failed run; set the
    # retry budget before anything (write probe, dataset index) talks to a bucket.
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(cfg.reliability.s3_max_attempts))
    dist.initialize_dist(device, timeout=cfg.dist_timeout)
    run_name, fixed_name = resolve_run_name(cfg)
    cfg = replace(cfg, run_name=run_name)
    world = dist.get_world_size()
    impl = cfg.model.attn_config.impl
    if impl == "cudnn" and cfg.compile.enabled and cfg.compile.mode in CUDA_GRAPH_MODES:
        # cuDNN's frontend copies the ALiBi slopes from host memory at each call: not capturable.
        raise ConfigError(
            "compile.mode",
            f"{cfg.compile.mode!r} captures CUDA graphs, which impl 'cudnn' cannot run inside; "
            "use compile.mode default or max-autotune-no-cudagraphs",
        )
    precision = _precision(cfg, device)
    if impl in ("flash", "cudnn") and precision == "fp32":
        raise ConfigError(
            "model.attn_config.impl",
            f"{impl!r} needs bf16/fp16 activations; use precision amp_bf16",
        )
    c = cfg.compile
    if (
        device == "cpu"
        and c.enabled
        and c.backend == "inductor"
        and cfg.model.attn_config.impl == "flex"
    ):
        raise ConfigError(
            "compile.enabled",
            "compiled FlexAttention needs CUDA (Inductor cannot compile its backward on CPU); "
            "on CPU set compile.enabled=false or model.attn_config.impl=sdpa",
        )
    if cfg.device_train_microbatch_size == "auto" and device != "gpu":
        raise ConfigError("device_train_microbatch_size", "'auto' needs a GPU; give an int on CPU")
    validate_run(cfg, world)
    algorithms, callbacks = [], []
    if cfg.gradient_clipping is not None:
        algorithms, callbacks = build_gradient_clipping(
            cfg.gradient_clipping, cfg.optimizer, device == "gpu", precision
        )
    schedule_note = check_schedule(cfg.scheduler, cfg.max_duration)
    if schedule_note and dist.get_global_rank() == 0:
        log.warning(schedule_note)
    per_rank = device_train_batch_size(cfg, world)

    autoresume = cfg.autoresume
    if autoresume is None:
        autoresume = bool(cfg.save_folder) and fixed_name
    if autoresume and not (cfg.save_folder and fixed_name):
        raise ConfigError("autoresume", "needs save_folder and a fixed run_name (or $RUN_NAME)")

    rel = cfg.reliability
    check_load_path_trusted(cfg.load_path, cfg.save_folder, run_name, rel.trust_checkpoint)
    if autoresume and rel.checkpoint_manifest and cfg.save_folder:
        prepare_resume(cfg.save_folder, run_name, rel.on_corrupt_checkpoint)

    spec = redact(to_container(cfg))
    log.info("run %s on %d rank(s), %s, %s", run_name, world, device, precision)
    log.debug("resolved spec:\n%s", yaml.safe_dump(spec, sort_keys=False))

    # Composer seeds after the model is built: seed first so fresh runs are reproducible.
    reproducibility.seed_all(cfg.seed)
    tokenizer = None
    if _needs_tokenizer(cfg):
        try:
            tokenizer = load_tokenizer(cfg.tokenizer.name, **cfg.tokenizer.kwargs)
        except ConfigError as err:
            raise err.with_prefix("tokenizer") from None
    if tokenizer is not None and len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than tokenizer {cfg.tokenizer.name!r} "
            f"({len(tokenizer)} ids); token ids past the table would fail on the first step",
        )
    parallelism = _parallelism(cfg, device)
    if autoresume:
        sharded = parallelism is not None and cfg.fsdp is not None
        check_resume_layout(
            cfg.save_folder, run_name, sharded and cfg.fsdp.state_dict_type == "sharded"
        )
    model_cfg = cfg.model
    if model_cfg.init_device == "meta" and parallelism and device == "gpu":
        # FSDP shards the meta model, then Composer materialises each shard with this function.
        model = build_model(model_cfg, device="meta")
        model.param_init_fn = lambda module: init_weights(module, model_cfg)
    elif model_cfg.init_device == "meta" and device == "gpu":
        # One GPU (or DDP): materialise straight on this rank's GPU; a host build of MPT-3B
        # draws 2.7B random numbers on the CPU and copies 11 GB across before the first step.
        model = build_model(model_cfg, device=torch.device("cuda", dist.get_local_rank()))
    else:
        model = build_model(model_cfg, device="cpu")
    model.fsdp_wrap_fn = lambda module: isinstance(module, MPTBlock)
    model.activation_checkpointing_fn = lambda module: isinstance(module, MPTBlock)
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
    if parallelism is None:
        _unsharded_fsdp_settings(cfg, composer_model, world)

    seq_id = model_cfg.attn_config.attn_uses_sequence_id
    if cfg.finetune_loader is not None:
        train_dl = _finetune_dataloader(cfg.finetune_loader, tokenizer, per_rank)
    else:
        train_dl = _dataloader(cfg.train_loader, tokenizer, per_rank, seq_id, cfg.model.vocab_size)
    eval_loaders = dict(cfg.eval_loaders)
    if cfg.eval_loader is not None:
        eval_loaders = {"eval": cfg.eval_loader, **eval_loaders}
    evaluators = [
        Evaluator(
            label=label,
            dataloader=_dataloader(
                loader, tokenizer, cfg.device_eval_batch_size, seq_id, cfg.model.vocab_size
            ),
            metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
        )
        for label, loader in eval_loaders.items()
    ]

    optimizer = build_optimizer(cfg.optimizer, composer_model, on_gpu=device == "gpu")
    run_dir = Path("runs") / run_name
    if parallelism is not None and device == "cpu":
        mesh = parallelism["fsdp"].device_mesh
        callbacks.append(GlooGradientAverage(mesh["shard"].get_group() if mesh else None))
    callbacks += _callbacks(cfg, spec, run_dir)
    callbacks += reliability_callbacks(rel, cfg.save_folder, run_dir)
    if cfg.icl_tasks:
        m = cfg.model
        tasks = [for_model(t, m.learned_pos_emb, m.max_seq_len) for t in cfg.icl_tasks]
        callbacks.append(ICLEvalCallback(tasks, tokenizer, cfg.eval_interval))
    callbacks += list(extra_callbacks or [])
    mb = (
        cfg.device_train_microbatch_size
        if cfg.device_train_microbatch_size is not None
        else per_rank
    )
    return MPTTrainer(
        run_name=run_name,
        seed=cfg.seed,
        model=composer_model,
        train_dataloader=train_dl,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval if evaluators else 1,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=optimizer,
        schedulers=build_scheduler(cfg.scheduler),
        max_duration=cfg.max_duration,
        device_train_microbatch_size=mb,
        device=device,
        precision=precision,
        parallelism_config=parallelism,
        algorithms=algorithms,
        loggers=_loggers(cfg, run_name),
        callbacks=callbacks,
        progress_bar=cfg.progress_bar,
        log_to_console=False,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=autoresume,
        # With autoresume, a checkpoint found in save_folder wins over load_path.
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        load_strict_model_weights=cfg.load_strict_model_weights,
        dist_timeout=cfg.dist_timeout,
        accumulate_train_batch_on_tokens=True,
        python_log_level=None,
        overlap_step_end=cfg.overlap_step_end,
    )


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
    finally:
        trainer.close()
    return trainer
