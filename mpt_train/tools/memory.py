"""Peak GPU memory of one rank, from the spec alone: does it fit, and at what micro batch.

Counted from first principles, in bytes per parameter and bytes per activation element, for
the way mpt-train trains (fp32 master weights, ``amp_bf16`` autocast or FSDP2's bf16 compute
copies, per-block ``torch.compile``, the tied head's loss). Nothing here is fitted to a
measurement; ``tests/tools/test_memory.py`` holds the result against every benchmark record
that measured a peak (``torch.cuda.max_memory_allocated``), so a new measurement re-checks it.

When the peak happens: at the start of backward every block's saved activations are alive,
with the loss head's gradient being written. Gradients are freed between steps (Composer zeroes
them with ``set_to_none``), so they add to that peak only while micro batches accumulate;
otherwise they grow as the activations are freed and the end of backward is lower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpt_train.callbacks.accounting import get_gpu, shape_model
from mpt_train.config.schema import train_seq_len

if TYPE_CHECKING:
    from mpt_train.config import RunConfig
    from mpt_train.model import MPTConfig, MPTModel

__all__ = [
    "MemoryPlan",
    "activation_bytes",
    "estimate_memory",
    "format_memory",
    "meta_model",
]

GB = 1e9  # the unit of the benchmark records' peak_memory_gb (max_memory_allocated / 1e9)

# --- model state, bytes per parameter --------------------------------------------------------
#: Parameters are stored in fp32 (master weights); gradients take the parameters' dtype.
MASTER_WEIGHT_BYTES = 4
GRAD_BYTES = 4
#: Optimizer state: AdamW keeps two fp32 moments, Lion one.
OPTIMIZER_BYTES = {"decoupled_adamw": 8, "adamw": 8, "decoupled_lionw": 4}
#: Without FSDP, ``amp_bf16`` runs every matmul on a bf16 cast of its fp32 weight; the casts
#: made in forward are kept for backward (autocast's weight cache; compiled blocks save them
#: too), so one bf16 copy of the whole model is alive through the step.
AUTOCAST_WEIGHT_COPY_BYTES = 2
#: FSDP2 all-gathers parameters in ``param_dtype`` and reduce-scatters in ``reduce_dtype``,
#: per Composer's mixed-precision modes: (gather bytes, reduce bytes).
FSDP_DTYPE_BYTES = {"PURE": (2, 2), "DEFAULT": (2, 4), "FULL": (4, 4)}

# --- activations, bytes per token --------------------------------------------------------------
#: What one compiled block keeps for backward, per token, in units of d_model (M) or the MLP
#: width (F = expansion_ratio * M); bf16 is 2 bytes, the residual stream is fp32 (the
#: embedding's output is fp32 and every residual add keeps it so). Eager blocks come to the
#: same sum: LPLayerNorm saves its bf16 cast of the block input (2 bytes, not 4) and out_proj
#: its own contiguous copy of the attention output (2 more).
BLOCK_SAVED = (
    ("block input (fp32 residual stream, norm_1's input)", 4, "M"),
    ("norm_1 output (Wqkv's input)", 2, "M"),
    ("fused q, k, v", 6, "M"),
    ("attention output (out_proj's input)", 2, "M"),
    ("residual after attention, as norm_2's bf16 input", 2, "M"),
    ("norm_2 output (up_proj's input)", 2, "M"),
    ("up_proj output (GELU's input)", 2, "F"),
    ("GELU output (down_proj's input)", 2, "F"),
)
#: The attention kernel's softmax statistics: one fp32 log-sum-exp per head per token.
ATTN_LSE_BYTES_PER_HEAD = 4
#: ``impl: sdpa`` folds ALiBi into 8 extra dims per head: q and k are saved as widened copies.
SDPA_FOLD_COPIES = 2  # q and k, bf16, each (M + 8 H) wide
SDPA_FOLD_DIMS_PER_HEAD = 8
#: The loss head per token and vocabulary entry. Compiled (``compile.loss``): bf16 logits are
#: saved and their gradient is written over them. Eager: the fp32 log-probabilities are saved
#: (4), and backward holds the NLL gradient (4) and the log-softmax gradient (4) at once.
LOSS_BYTES_PER_VOCAB_COMPILED = 2
LOSS_BYTES_PER_VOCAB_EAGER = 12
#: The final norm's output (the head's bf16 input) is saved per token.
HEAD_INPUT_BYTES_PER_M = 2
#: With activation checkpointing a block keeps only its fp32 input; backward recomputes one
#: block at a time, so one block's full activations exist at once on top.
AC_SAVED_BYTES_PER_M = 4

# --- what the allocator does not count -------------------------------------------------------
#: CUDA context, cuBLAS/cuDNN workspaces and kernels loaded by the process: outside
#: ``max_memory_allocated`` but on the card (about 0.5 GB on CUDA 12 with lazy loading).
CUDA_CONTEXT_GB = 0.5
#: NCCL's communicator buffers per process on more than one rank.
NCCL_BUFFERS_GB = 0.5
#: The caching allocator reserves more than it hands out (block rounding, fragmentation).
ALLOCATOR_SLACK = 0.05
#: A card reports slightly less than its nominal GiB (81,559 MiB on an H100 80GB).
USABLE_FRACTION = 0.99


@dataclass
class MemoryPlan:
    """Per-rank peak memory of a spec on a GPU type; ``--json`` carries these fields (GB)."""

    gpu: str
    capacity_gb: float
    sharding: str
    shard_ranks: int
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    compiled: bool
    compiled_loss: bool
    chunk_tokens: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    #: bf16 weight copies (one rank) or the FSDP working set of gathered parameters/gradients.
    compute_copies_gb: float
    activations_gb: float
    activations_no_ac_gb: float
    activations_ac_gb: float
    loss_gb: float
    framework_overhead_gb: float
    #: Predicted ``torch.cuda.max_memory_allocated`` (what the benchmark records measure).
    peak_allocated_gb: float
    #: What the card must hold: the peak, allocator slack and the framework overhead.
    total_gb: float
    fits: bool
    #: Largest micro batch that divides the per-rank batch and fits, as configured / with AC.
    max_micro_batch: int
    max_micro_batch_ac: int


@dataclass(frozen=True)
class _Shape:
    params: int
    block_params: int
    root_params: int
    d_model: int
    ffn: int
    n_heads: int
    n_layers: int
    vocab: int
    seq_len: int


_MODELS: dict[str, MPTModel] = {}


def meta_model(model_cfg: MPTConfig) -> MPTModel:
    """The model on the meta device, built once per architecture (plans ask many times)."""
    key = repr(model_cfg)
    if key not in _MODELS:
        _MODELS[key] = shape_model(model_cfg)
    return _MODELS[key]


def _shape(cfg: RunConfig) -> _Shape:
    model = meta_model(cfg.model)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    params = model.num_params()
    m = cfg.model
    return _Shape(
        params=params,
        block_params=block,
        root_params=params - block * m.n_layers,
        d_model=m.d_model,
        ffn=m.expansion_ratio * m.d_model,
        n_heads=m.n_heads,
        n_layers=m.n_layers,
        vocab=m.vocab_size,
        seq_len=train_seq_len(cfg),
    )


def _block_bytes_per_token(cfg: RunConfig, s: _Shape) -> float:
    """Bytes one block saves for backward per token, without activation checkpointing."""
    unit = {"M": s.d_model, "F": s.ffn}
    total = sum(b * unit[u] for _, b, u in BLOCK_SAVED) + ATTN_LSE_BYTES_PER_HEAD * s.n_heads
    if cfg.model.attn_config.impl == "sdpa" and cfg.model.attn_config.alibi:
        width = s.d_model + SDPA_FOLD_DIMS_PER_HEAD * s.n_heads
        total += SDPA_FOLD_COPIES * 2 * width
    if cfg.precision == "fp32":
        total *= 2  # every bf16 activation is fp32 instead
    return total


def activation_bytes(cfg: RunConfig, micro_batch: int, ac: bool) -> tuple[float, float]:
    """(blocks + head input, loss head) bytes at the start of backward for one micro batch."""
    return _activations(cfg, _shape(cfg), micro_batch, ac)


def _activations(cfg: RunConfig, s: _Shape, micro_batch: int, ac: bool) -> tuple[float, float]:
    tokens = micro_batch * s.seq_len
    per_block = _block_bytes_per_token(cfg, s)
    if ac:
        blocks = (AC_SAVED_BYTES_PER_M * s.d_model * s.n_layers + per_block) * tokens
    else:
        blocks = per_block * s.n_layers * tokens
    blocks += HEAD_INPUT_BYTES_PER_M * s.d_model * tokens
    compiled_loss = cfg.compile.enabled and cfg.compile.loss
    per_vocab = LOSS_BYTES_PER_VOCAB_COMPILED if compiled_loss else LOSS_BYTES_PER_VOCAB_EAGER
    chunk = cfg.loss.chunk_tokens
    loss_tokens = min(chunk, tokens) if chunk > 0 else tokens
    return blocks, per_vocab * s.vocab * loss_tokens


def _state_bytes(cfg: RunConfig, s: _Shape, sharding: str, shard: int) -> dict[str, float]:
    """Weights, gradients, optimizer state and compute copies per rank."""
    opt = OPTIMIZER_BYTES.get(cfg.optimizer.name, 8)
    amp = cfg.precision.startswith("amp")
    if sharding == "NONE":  # one rank, or NO_SHARD (DDP): a whole replica
        copies = AUTOCAST_WEIGHT_COPY_BYTES * s.params if amp else 0.0
        return {
            "weights": MASTER_WEIGHT_BYTES * s.params,
            "gradients": GRAD_BYTES * s.params,
            "optimizer": opt * s.params,
            "copies": copies,
        }
    gather, reduce = FSDP_DTYPE_BYTES[cfg.fsdp.mixed_precision if cfg.fsdp else "DEFAULT"]
    if sharding == "SHARD_GRAD_OP":  # gathered once per forward, kept through backward
        working = gather * s.params + reduce * s.block_params
    else:  # the root stays gathered; one block computes while the next is prefetched
        working = gather * (s.root_params + 2 * s.block_params) + reduce * (
            s.root_params + s.block_params
        )
    return {
        "weights": MASTER_WEIGHT_BYTES * s.params / shard,
        "gradients": GRAD_BYTES * s.params / shard,
        "optimizer": opt * s.params / shard,
        "copies": working,
    }


def sharding_of(cfg: RunConfig, gpus: int, gpus_per_node: int) -> tuple[str, int]:
    """The strategy in effect and how many ranks share one copy of the model state."""
    strategy = cfg.fsdp.sharding_strategy if cfg.fsdp else "NO_SHARD"
    if gpus == 1 or strategy == "NO_SHARD":
        return "NONE", 1
    if strategy == "HYBRID_SHARD":
        return strategy, min(gpus, gpus_per_node)
    return strategy, gpus


def _peak(state: dict[str, float], acts: float, accumulating: bool) -> float:
    """Start of backward (activations alive) against end of step (all gradients alive)."""
    base = state["weights"] + state["optimizer"] + state["copies"]
    backward = base + acts + (state["gradients"] if accumulating else 0.0)
    return max(backward, base + state["gradients"])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def estimate_memory(
    cfg: RunConfig,
    *,
    gpus: int,
    gpu: str,
    gpus_per_node: int = 8,
    micro_batch: int | None = None,
) -> MemoryPlan:
    """Per-rank peak memory of ``cfg`` on ``gpus`` GPUs of type ``gpu``."""
    s = _shape(cfg)
    spec = get_gpu(gpu, "gpu")
    sharding, shard = sharding_of(cfg, gpus, gpus_per_node)
    state = _state_bytes(cfg, s, sharding, shard)
    per_rank = max(1, cfg.global_train_batch_size // gpus)
    mb_cfg = cfg.device_train_microbatch_size
    ac = bool(cfg.fsdp and cfg.fsdp.activation_checkpointing)
    capacity = spec.memory_gb * 2**30 * USABLE_FRACTION
    overhead = (CUDA_CONTEXT_GB + (NCCL_BUFFERS_GB if gpus > 1 else 0.0)) * GB

    def total(mb: int, with_ac: bool) -> tuple[float, float]:
        blocks, loss = _activations(cfg, s, mb, with_ac)
        peak = _peak(state, blocks + loss, per_rank // mb > 1)
        return peak, peak * (1 + ALLOCATOR_SLACK) + overhead

    def largest(with_ac: bool) -> int:
        fitting = [d for d in _divisors(per_rank) if total(d, with_ac)[1] <= capacity]
        return fitting[-1] if fitting else 0

    best, best_ac = largest(ac), largest(True)
    mb = micro_batch or (mb_cfg if isinstance(mb_cfg, int) else max(best, 1))
    peak, need = total(mb, ac)
    blocks, loss = _activations(cfg, s, mb, ac)
    no_ac, ac_only = (sum(_activations(cfg, s, mb, flag)) for flag in (False, True))
    return MemoryPlan(
        gpu=spec.name,
        capacity_gb=capacity / GB,
        sharding=sharding,
        shard_ranks=shard,
        micro_batch=mb,
        grad_accum=max(1, per_rank // mb),
        activation_checkpointing=ac,
        compiled=cfg.compile.enabled,
        compiled_loss=cfg.compile.enabled and cfg.compile.loss,
        chunk_tokens=cfg.loss.chunk_tokens,
        weights_gb=state["weights"] / GB,
        gradients_gb=state["gradients"] / GB,
        optimizer_gb=state["optimizer"] / GB,
        compute_copies_gb=state["copies"] / GB,
        activations_gb=(blocks + loss) / GB,
        activations_no_ac_gb=no_ac / GB,
        activations_ac_gb=ac_only / GB,
        loss_gb=loss / GB,
        framework_overhead_gb=(need - peak) / GB,
        peak_allocated_gb=peak / GB,
        total_gb=need / GB,
        fits=need <= capacity,
        max_micro_batch=best,
        max_micro_batch_ac=best_ac,
    )


def format_memory(m: MemoryPlan) -> list[str]:
    """The plan's memory lines (per rank, GB)."""
    ac = "on" if m.activation_checkpointing else "off"
    loss = "compiled" if m.compiled_loss else "eager"
    chunk = f", chunks of {m.chunk_tokens} tokens" if m.chunk_tokens else ""
    verdict = "fits" if m.fits else "DOES NOT FIT"
    return [
        f"  memory      per rank, {m.sharding} over {m.shard_ranks}, micro batch {m.micro_batch}"
        f" x {m.grad_accum}, activation checkpointing {ac}, loss {loss}{chunk}",
        f"              weights {m.weights_gb:.2f} GB, gradients {m.gradients_gb:.2f}, "
        f"optimizer {m.optimizer_gb:.2f}, compute copies {m.compute_copies_gb:.2f}",
        f"              activations {m.activations_gb:.2f} GB per micro batch (loss head "
        f"{m.loss_gb:.2f}; {m.activations_no_ac_gb:.2f} without and {m.activations_ac_gb:.2f} "
        "with activation checkpointing)",
        f"              peak {m.peak_allocated_gb:.1f} GB allocated + {m.framework_overhead_gb:.1f}"
        f" framework overhead = {m.total_gb:.1f} of {m.capacity_gb:.1f} GB: {verdict}",
        f"              largest micro batch that fits: {m.max_micro_batch or 'none'} "
        f"({m.max_micro_batch_ac or 'none'} with activation checkpointing)",
    ]
