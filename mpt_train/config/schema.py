"""The run spec: one typed dataclass per section, with every default in one place.

Sections that belong to a builder live next to it (``model`` in :mod:`mpt_train.model.config`,
``train_loader`` in :mod:`mpt_train.data.config`); the small training sections live here.
Key names follow llm-foundry's where it has them, so its users feel at home.
Field validation happens in ``__post_init__`` and raises :class:`ConfigError` naming the field;
the loader prefixes the section path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpt_train.config.fp8 import Fp8Config, check_fp8_run
from mpt_train.data.config import EvalLoaderConfig, TextLoaderConfig
from mpt_train.data.finetune import FinetuneLoaderConfig
from mpt_train.errors import ConfigError, check_choice
from mpt_train.eval.icl import ICLTaskConfig
from mpt_train.model.config import MPTConfig
from mpt_train.reliability.config import ReliabilityConfig

__all__ = [
    "CallbacksConfig",
    "CompileConfig",
    "CostConfig",
    "FSDPConfig",
    "Fp8Config",
    "GradientClippingConfig",
    "JsonlLoggerConfig",
    "LoggersConfig",
    "LossConfig",
    "OptimizerConfig",
    "RunConfig",
    "SchedulerConfig",
    "TokenizerConfig",
    "WandbLoggerConfig",
    "check_choice",
    "check_schedule",
    "check_time",
    "train_seq_len",
]

TIME_UNITS = ("ba", "tok", "ep", "sp", "dur")


def check_time(
    key: str, value: str, units: tuple[str, ...] = TIME_UNITS, positive: bool = False
) -> None:
    """Check a Composer time string such as ``'1000ba'``, ``'2ep'`` or ``'1e9tok'``: never
    negative, and above zero when ``positive``."""
    from composer.core import Time

    try:
        t = Time.from_timestring(str(value))
    except (ValueError, TypeError):
        raise ConfigError(
            key, f"got {value!r}, expected a Composer time string like '1000ba', '2ep', '1e9tok'"
        ) from None
    if t.unit.value not in units:
        raise ConfigError(key, f"got {value!r}, its unit must be one of {', '.join(units)}")
    if t.value < 0 or (positive and t.value == 0):
        raise ConfigError(key, f"got {value!r}, expected {'> 0' if positive else '>= 0'}")


@dataclass
class TokenizerConfig:
    """Any Hugging Face tokenizer name or local path; ``mpt-train/tiny-bpe`` is the shipped one."""

    name: str = "EleutherAI/gpt-neox-20b"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """MPT trained with decoupled AdamW and decoupled Lion; torch's AdamW is the fast path.

    ``weight_decay`` is decoupled (absolute, not multiplied by lr) for the ``decoupled_*``
    optimizers, as in Composer; for ``adamw`` it is torch's (multiplied by lr).
    """

    name: str = "decoupled_adamw"
    lr: float = 6.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    # adamw kernels: auto (fused on GPU, foreach on CPU) | fused | foreach | composer (its loop)
    implementation: str = "auto"
    # Parameter groups: MPT does not decay norms, biases and embeddings.
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False

    def __post_init__(self) -> None:
        check_choice("name", self.name, ("decoupled_adamw", "decoupled_lionw", "adamw"))
        check_choice(
            "implementation", self.implementation, ("auto", "fused", "foreach", "composer")
        )
        if self.lr <= 0:
            raise ConfigError("lr", f"got {self.lr}, expected a positive learning rate")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"got {list(self.betas)}, expected two values in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"got {self.weight_decay}, expected >= 0")
        if self.eps < 0:
            raise ConfigError("eps", f"got {self.eps}, expected >= 0")
        if self.name == "decoupled_lionw" and self.implementation != "auto":
            raise ConfigError(
                "implementation",
                f"got {self.implementation!r}, but decoupled_lionw has one implementation "
                "(leave it 'auto'); the choice of kernels is for the AdamW optimizers",
            )
        if self.name == "adamw" and self.implementation == "composer":
            raise ConfigError(
                "implementation",
                "'composer' is Composer's DecoupledAdamW loop, for name decoupled_adamw; "
                "adamw runs on torch's fused or foreach kernel",
            )


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"
    t_warmup: str = "100ba"
    alpha_f: float = 0.1
    t_max: str = "1dur"

    def __post_init__(self) -> None:
        check_choice(
            "name",
            self.name,
            ("cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup"),
        )
        check_time("t_warmup", self.t_warmup)
        check_time("t_max", self.t_max)
        if not 0.0 <= self.alpha_f <= 1.0:
            raise ConfigError("alpha_f", f"got {self.alpha_f}, expected a fraction in [0, 1]")


@dataclass
class GradientClippingConfig:
    """``implementation``: auto (norm clipping folded into torch's fused AdamW when that is the
    optimizer, Composer's otherwise) | fused (insist) | composer. See mpt_train.train.clipping."""

    clipping_type: str = "norm"
    clipping_threshold: float = 1.0
    implementation: str = "auto"

    def __post_init__(self) -> None:
        check_choice("clipping_type", self.clipping_type, ("norm", "value", "adaptive"))
        check_choice("implementation", self.implementation, ("auto", "fused", "composer"))
        if self.implementation == "fused" and self.clipping_type != "norm":
            raise ConfigError(
                "implementation",
                f"'fused' folds a norm clip into the optimizer; clipping_type is "
                f"{self.clipping_type!r} (use auto or composer)",
            )
        if self.clipping_threshold <= 0:
            raise ConfigError("clipping_threshold", f"got {self.clipping_threshold}, expected > 0")


@dataclass
class FSDPConfig:
    """Sharding across ranks, applied through Composer's FSDP2.

    HYBRID_SHARD shards inside a node and replicates across nodes (2-D device mesh).
    NO_SHARD replicates (DDP). ``limit_all_gathers`` is FSDP1's knob: FSDP2 already bounds
    in-flight all-gathers, so it is accepted for llm-foundry specs and has no effect.
    """

    sharding_strategy: str = "FULL_SHARD"
    mixed_precision: str = "DEFAULT"
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    limit_all_gathers: bool = True
    state_dict_type: str = "sharded"

    def __post_init__(self) -> None:
        check_choice(
            "sharding_strategy",
            self.sharding_strategy,
            ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"),
        )
        check_choice("mixed_precision", self.mixed_precision, ("DEFAULT", "PURE", "FULL"))
        check_choice("state_dict_type", self.state_dict_type, ("sharded", "full"))


@dataclass
class LossConfig:
    """How the training loss is computed (numerically the same either way)."""

    # 0: from full logits. N > 0: head + cross-entropy N tokens at a time, recomputed in
    # backward, so a [B, S, vocab] fp32 logits tensor never exists (saves GBs at large vocab).
    chunk_tokens: int = 0
    # Also log metrics/train/LanguageCrossEntropy: a second softmax and an all-reduce per step.
    train_metrics: bool = False

    def __post_init__(self) -> None:
        if self.chunk_tokens < 0:
            raise ConfigError(
                "chunk_tokens", f"got {self.chunk_tokens}, expected 0 or a positive int"
            )
        if self.chunk_tokens and self.train_metrics:
            raise ConfigError(
                "chunk_tokens",
                f"got {self.chunk_tokens} with train_metrics: true, but train metrics need the "
                "full logits the chunked loss exists to avoid; set one of them off",
            )


@dataclass
class CompileConfig:
    """Per-block ``torch.compile`` (whole-model compile recompiles too often under FSDP)."""

    enabled: bool = False
    # torch.compile backend: inductor (GPU), aot_eager (numerics checks without codegen), ...
    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool = False
    fullgraph: bool = False
    # Also compile the loss head (head matmul + cross-entropy, per loss chunk) when enabled.
    loss: bool = True

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice("mode", self.mode, COMPILE_MODES)
        if self.enabled:
            import torch._dynamo

            check_choice("backend", self.backend, tuple(torch._dynamo.list_backends(())))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs


@dataclass
class WandbLoggerConfig:
    project: str = "mpt-train"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_artifacts: bool = False


@dataclass
class JsonlLoggerConfig:
    """One JSON object per logged step; ``{run_name}`` is filled in."""

    path: str = "runs/{run_name}/metrics.jsonl"


@dataclass
class LoggersConfig:
    console: bool = True
    console_log_interval: str = "10ba"
    wandb: WandbLoggerConfig | None = None
    jsonl: JsonlLoggerConfig | None = field(default_factory=JsonlLoggerConfig)

    def __post_init__(self) -> None:
        check_time("console_log_interval", self.console_log_interval, ("ba",))


@dataclass
class SpeedMonitorConfig:
    window_size: int = 10
    # Peak FLOP/s of one device for MFU; None: the peak of cost.gpu_type or of the detected
    # GPU (no MFU on CPU unless one is named).
    gpu_flops_available: float | None = None

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ConfigError("window_size", f"got {self.window_size}, expected >= 1 batches")


@dataclass
class CostConfig:
    """GPU type and price: what a run costs, for the cost monitor and ``scripts/plan.py``."""

    # a100_40gb | a100_80gb | h100 (SXM) | h100_pcie | h100_nvl | h200 | h200_nvl;
    # None = detect from the visible GPU
    gpu_type: str | None = None
    # None = the default of mpt_train.callbacks.accounting's table for the GPU type
    price_per_gpu_hour: float | None = None

    def __post_init__(self) -> None:
        from mpt_train.callbacks.accounting import GPU_TYPES

        if self.gpu_type is not None:
            check_choice("gpu_type", self.gpu_type, tuple(GPU_TYPES))
        if self.price_per_gpu_hour is not None and self.price_per_gpu_hour < 0:
            raise ConfigError("price_per_gpu_hour", f"got {self.price_per_gpu_hour}, expected >= 0")


@dataclass
class CostMonitorConfig:
    log_interval: int = 10
    # runs/{run_name}/cost_ledger.json: how much work restarts cost
    ledger: bool = True

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError("log_interval", f"got {self.log_interval}, expected >= 1")


@dataclass
class CallbacksConfig:
    speed_monitor: SpeedMonitorConfig | None = field(default_factory=SpeedMonitorConfig)
    lr_monitor: bool = True
    memory_monitor: bool = False
    runtime_estimator: bool = True
    cost_monitor: CostMonitorConfig | None = field(default_factory=CostMonitorConfig)


@dataclass
class RunConfig:
    """A whole run spec. ``variables`` holds free values for ``${variables.x}``."""

    model: MPTConfig
    max_duration: str
    global_train_batch_size: int
    # Pretraining data; or ``finetune_loader`` (instruction/chat JSONL), exactly one of them.
    train_loader: TextLoaderConfig | None = None
    finetune_loader: FinetuneLoaderConfig | None = None
    # In-context-learning tasks run at eval_interval (logged as icl/<label>/accuracy).
    icl_tasks: list[ICLTaskConfig] = field(default_factory=list)
    variables: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None
    seed: int = 17
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    eval_loader: EvalLoaderConfig | None = None
    eval_loaders: dict[str, EvalLoaderConfig] = field(default_factory=dict)
    eval_interval: str = "1000ba"
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    gradient_clipping: GradientClippingConfig | None = field(default_factory=GradientClippingConfig)
    # int, or 'auto' (Composer searches the largest that fits; GPU only); None = no microbatching.
    device_train_microbatch_size: Any = None
    device_eval_batch_size: int = 8
    device: str = "auto"
    # 'auto' = amp_bf16 on GPU, fp32 on CPU.
    precision: str = "auto"
    fsdp: FSDPConfig | None = field(default_factory=FSDPConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    # FP8 matmuls in the blocks' linear layers (torchao float8; mpt_train.train.fp8).
    fp8: Fp8Config = field(default_factory=Fp8Config)
    loss: LossConfig = field(default_factory=LossConfig)
    # GPU: read the step's loss on a side stream, so the between-step host work overlaps the
    # optimizer update instead of waiting for it (mpt_train.train.trainer.MPTTrainer).
    overlap_step_end: bool = False
    save_folder: str | None = None
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    # None = on whenever save_folder is set and run_name is fixed.
    autoresume: bool | None = None
    load_path: str | None = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    progress_bar: bool = False

    def __post_init__(self) -> None:
        check_time("max_duration", self.max_duration, ("ba", "tok", "ep", "sp"), positive=True)
        if self.train_loader is None and self.finetune_loader is None:
            raise ConfigError("train_loader", "required, but not set (or set finetune_loader)")
        if self.train_loader is not None and self.finetune_loader is not None:
            raise ConfigError("finetune_loader", "give train_loader or finetune_loader, not both")
        check_time("eval_interval", self.eval_interval, ("ba", "tok", "ep", "sp", "dur"))
        check_time("save_interval", self.save_interval, ("ba", "tok", "ep", "sp", "dur"))
        check_choice("device", self.device, ("auto", "cpu", "gpu"))
        check_choice(
            "precision", self.precision, ("auto", "fp32", "amp_bf16", "amp_fp16", "amp_fp8")
        )
        if self.global_train_batch_size <= 0:
            raise ConfigError(
                "global_train_batch_size", f"got {self.global_train_batch_size}, expected > 0"
            )
        mb = self.device_train_microbatch_size
        if (
            mb is not None
            and mb != "auto"
            and (isinstance(mb, bool) or not isinstance(mb, int) or mb <= 0)
        ):
            raise ConfigError(
                "device_train_microbatch_size", f"got {mb!r}, expected a positive int or 'auto'"
            )
        if self.device_eval_batch_size <= 0:
            raise ConfigError(
                "device_eval_batch_size", f"got {self.device_eval_batch_size}, expected > 0"
            )
        if self.eval_loader is not None and "eval" in self.eval_loaders:
            raise ConfigError("eval_loaders.eval", "the label 'eval' is taken by eval_loader")
        self._check_retention()
        check_fp8_run(self)

    def _check_retention(self) -> None:
        keep = self.save_num_checkpoints_to_keep
        if keep < -1:
            raise ConfigError(
                "save_num_checkpoints_to_keep", f"got {keep}, expected -1 (all) or >= 0"
            )
        local = bool(self.save_folder) and "://" not in str(self.save_folder)
        if keep == 0 and local:
            raise ConfigError(
                "save_num_checkpoints_to_keep",
                f"0 keeps no local checkpoint, and save_folder {self.save_folder} is local: "
                "nothing would be left to resume from (0 is for bucket save folders)",
            )
        if keep == 1 and local and self.reliability.on_corrupt_checkpoint == "fallback":
            raise ConfigError(
                "reliability.on_corrupt_checkpoint",
                "'fallback' resumes from the previous good checkpoint, but "
                "save_num_checkpoints_to_keep is 1, so there is never a previous one: keep 2 "
                "or more (or -1 for all), or use 'fail'",
            )


#: Words for the units a schedule is counted in, once Composer has converted it.
_UNIT_WORDS = {"ba": "batches", "tok": "tokens", "sp": "samples"}


def check_schedule(sched: SchedulerConfig, max_duration: str) -> str | None:
    """The LR schedule against the run's length, as Composer checks it when the Trainer is
    built (after the model). Called where a spec is about to run (``build_trainer`` before the
    model, ``--dry-run``, sweeps before launching), not at load: tools that only read a spec
    (``plan.py max_duration=1e9tok``) stay usable.

    Composer converts ``dur`` to ``max_duration``'s unit and epochs to batches; warmup and
    ``t_max`` must then be in the same unit and ``t_max`` must cover the run. Returns a warning
    for a warmup as long as the run (it never reaches the peak learning rate), else None.
    """
    from composer.core import Time

    max_dur = Time.from_timestring(max_duration)

    def unit(t: Time) -> str:
        u = max_dur.unit.value if t.unit.value == "dur" else t.unit.value
        return "ba" if u == "ep" else u

    def fraction(t: Time) -> float | None:
        """``t`` as a fraction of the run, where the units allow telling without data."""
        if t.unit.value == "dur":
            return float(t.value)
        return float(t.value) / float(max_dur.value) if t.unit == max_dur.unit else None

    warm, t_max = Time.from_timestring(sched.t_warmup), Time.from_timestring(sched.t_max)
    if unit(warm) != unit(t_max):
        raise ConfigError(
            "scheduler.t_warmup",
            f"{sched.t_warmup!r} counts {_UNIT_WORDS[unit(warm)]}, but t_max {sched.t_max!r} "
            f"(max_duration {max_duration}) counts {_UNIT_WORDS[unit(t_max)]}: give the warmup "
            f"in {unit(t_max)} as well, or as a fraction of the run such as '0.01dur'",
        )
    f_max, f_warm = fraction(t_max), fraction(warm)
    if f_max is not None and f_max < 1:
        raise ConfigError(
            "scheduler.t_max",
            f"{sched.t_max!r} ends before max_duration {max_duration}: the learning rate would "
            "be undefined for the rest of the run; use '1dur' or more",
        )
    if f_warm is not None and f_warm >= 1:
        # Legitimate for a short smoke test of a real spec; worth a line in any other run.
        return (
            f"scheduler.t_warmup {sched.t_warmup!r} is not shorter than max_duration "
            f"{max_duration}: the learning rate never leaves warmup"
        )
    return None


def train_seq_len(cfg: RunConfig) -> int:
    """Tokens per training sample, whichever loader (pretraining or fine-tuning) the spec uses."""
    loader = cfg.train_loader if cfg.train_loader is not None else cfg.finetune_loader
    return loader.dataset.max_seq_len
