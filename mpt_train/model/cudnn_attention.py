"""cuDNN's fused attention with ALiBi inside the kernel (``attn_config.impl: cudnn``).

On Hopper, cuDNN's causal flash-attention kernel is the fastest SDPA has, and cuDNN can add the
ALiBi bias inside it (its graph API's ``use_alibi_mask``): ALiBi then costs a few pointwise
operations per score instead of a wider head (impl ``sdpa``) or a generated kernel
(impl ``flex``). The kernel is reached through the cuDNN frontend's Python graph API
(the ``nvidia-cudnn-frontend`` package), wrapped here as two torch custom ops with fake
(meta) implementations, so compiled blocks keep them as single opaque calls.

cuDNN derives the slopes from the head count itself, with the ALiBi paper's formula; these
equal MPT's for ``alibi_bias_max: 8`` at any head count (``MPTConfig`` refuses other values
with this kernel). Positions are those of whole sequences (queries = keys, causal): decoding
over a cache, a single query and fp32 inputs take the SDPA path instead
(:func:`mpt_train.model.attention.attend`). At each call the frontend copies the slopes from
host memory into the workspace, which a captured CUDA graph cannot hold (the trainer refuses
the compile modes that capture them).

On one H100 at MPT-1B's attention shape, inputs laid out as the model's, forward + backward
take 1.22 ms of GPU time against 1.14 ms for SDPA's causal kernel without ALiBi, and 1.74 ms for
FlexAttention with ALiBi (``scripts/bench_attention.py``). Each call also spends host time in
the frontend's Python: timed one call at a time, each waiting for the GPU, the kernel without
ALiBi took 1.96 ms against 1.30 ms through SDPA. A training step queues its kernels ahead of
the GPU, which hides that time (MPT-1B trains faster on this kernel than on FlexAttention's).

The built graphs are cached per shape, strides, dtype and device, so a training run builds one
forward and one backward graph, on its first step.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from typing import Any

import torch

__all__ = ["cudnn_alibi_slopes", "cudnn_attend", "cudnn_attention_missing"]

logger = logging.getLogger(__name__)

_MIN_BACKEND = 90000  # cuDNN 9.0: fused flash attention with ALiBi, forward and backward
_graphs: dict[tuple, tuple[Any, ...]] = {}
_graphs_lock = threading.Lock()
_handles = threading.local()  # cuDNN handles may not be shared between threads


def cudnn_alibi_slopes(n_heads: int) -> list[float]:
    """The slopes cuDNN applies for ``n_heads`` query heads (the ALiBi paper's: the
    power-of-two grid below ``n_heads``, then every other slope of the next grid)."""
    n = 1
    while n * 2 <= n_heads:
        n *= 2
    steps = [i + 1.0 for i in range(n)] + [(i + 1) * 0.5 for i in range(0, 2 * (n_heads - n), 2)]
    return [2.0 ** (-8.0 * s / n) for s in steps]


def cudnn_attention_missing() -> str | None:
    """Why impl ``cudnn`` cannot run on this machine, or None."""
    if importlib.util.find_spec("cudnn") is None:
        return "the nvidia-cudnn-frontend package (module 'cudnn') is not installed"
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is available"
    if torch.cuda.get_device_capability() < (8, 0):
        return "cuDNN's fused attention needs an Ampere or newer GPU (sm80+)"
    try:
        import cudnn

        version = int(cudnn.backend_version())
    except Exception as err:  # a frontend that cannot find or load libcudnn
        return f"the cuDNN frontend cannot load the cuDNN library ({type(err).__name__}: {err})"
    if version < _MIN_BACKEND:
        return f"cuDNN {version} is too old: ALiBi in fused attention needs cuDNN >= 9.0"
    return None


def _handle(device: torch.device) -> Any:
    import cudnn

    per_device = getattr(_handles, "by_device", None)
    if per_device is None:
        per_device = _handles.by_device = {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in per_device:
        with torch.cuda.device(index):
            per_device[index] = cudnn.create_handle()
    handle = per_device[index]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(index).cuda_stream)
    return handle


def _bshd_empty(batch: int, heads: int, seq: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` laid out as ``[B, S, H, D]``: what the output projection reads, and
    the layout cuDNN's kernels prefer."""
    return torch.empty(batch, seq, heads, dim, dtype=like.dtype, device=like.device).transpose(1, 2)


def _cudnn_type(dtype: torch.dtype) -> Any:
    import cudnn

    types = {
        torch.bfloat16: cudnn.data_type.BFLOAT16,
        torch.float16: cudnn.data_type.HALF,
        torch.float32: cudnn.data_type.FLOAT,  # the softmax stats
    }
    return types[dtype]


def _finish(graph: Any) -> int:
    import cudnn

    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return int(graph.get_workspace_size())


def _new_graph(dtype: torch.dtype, handle: Any) -> Any:
    import cudnn

    return cudnn.pygraph(
        io_data_type=_cudnn_type(dtype),
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )


def _operand(graph: Any, name: str, t: torch.Tensor) -> Any:
    return graph.tensor(
        name=name, dim=list(t.shape), stride=list(t.stride()), data_type=_cudnn_type(t.dtype)
    )


def _bind_output(node_output: Any, t: torch.Tensor) -> None:
    """Make a node's result a graph output written into ``t`` (its shape, strides, dtype)."""
    node_output.set_output(True).set_dim(list(t.shape)).set_stride(list(t.stride()))
    node_output.set_data_type(_cudnn_type(t.dtype))


def _mask_args(scale: float, alibi: bool) -> dict[str, Any]:
    """Scale, causal mask (top-left: queries are the keys) and ALiBi: one definition, so the
    forward and backward graphs cannot disagree."""
    import cudnn

    return {
        "attn_scale": scale,
        "use_alibi_mask": alibi,
        "diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT,
        "diagonal_band_right_bound": 0,
    }


def _cached(key: tuple, build: Any) -> tuple[Any, ...]:
    hit = _graphs.get(key)
    if hit is None:
        with _graphs_lock:
            hit = _graphs.get(key)
            if hit is None:
                logger.debug("building cuDNN attention graph %s", key[0])
                try:
                    hit = _graphs[key] = build()
                except Exception as err:
                    raise RuntimeError(
                        f"cuDNN cannot run attn_config.impl 'cudnn' for {key[0]} inputs "
                        f"{key[1]} (shape, strides) {key[-1]} ({type(err).__name__}: {err}); "
                        "use model.attn_config.impl flex or sdpa"
                    ) from err
    return hit


def _layout_key(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), tuple(t.stride())) for t in tensors)


def _execute(graph: Any, pack: dict, workspace_size: int, device: torch.device, handle: Any):
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device)
    graph.execute(pack, workspace, handle=handle)


def _dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mpt_train::cudnn_attention", mutates_args=())
def _cudnn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, alibi: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention ``[B,H,S,D]`` over ``[B,G,S,D]`` keys -> (output, softmax stats)."""

    q, k, v = (_dense_last_dim(t) for t in (q, k, v))
    batch, heads, seq, _ = q.shape
    out = _bshd_empty(batch, heads, seq, v.shape[-1], q)
    stats = torch.empty(batch, heads, seq, 1, dtype=torch.float32, device=q.device)
    handle = _handle(q.device)

    def build() -> tuple[Any, ...]:
        g = _new_graph(q.dtype, handle)
        q_t, k_t, v_t = (_operand(g, n, t) for n, t in (("q", q), ("k", k), ("v", v)))
        o_t, stats_t = g.sdpa(
            name="mpt_attention",
            q=q_t,
            k=k_t,
            v=v_t,
            generate_stats=True,
            **_mask_args(scale, alibi),
        )
        _bind_output(o_t, out)
        _bind_output(stats_t, stats)
        return g, _finish(g), (q_t, k_t, v_t, o_t, stats_t)

    key = ("forward", q.dtype, q.device, scale, alibi, _layout_key(q, k, v, out))
    g, workspace_size, (q_t, k_t, v_t, o_t, stats_t) = _cached(key, build)
    pack = {q_t: q, k_t: k, v_t: v, o_t: out, stats_t: stats}
    _execute(g, pack, workspace_size, q.device, handle)
    return out, stats


@_cudnn_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, alibi: bool):
    batch, heads, seq, _ = q.shape
    out = _bshd_empty(batch, heads, seq, v.shape[-1], q)
    return out, q.new_empty(batch, heads, seq, 1, dtype=torch.float32)


@torch.library.custom_op("mpt_train::cudnn_attention_backward", mutates_args=())
def _cudnn_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
    alibi: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:

    q, k, v = (_dense_last_dim(t) for t in (q, k, v))
    if grad_out.stride() != out.stride():  # the graph reads both in one layout
        grad_out = torch.empty_like(out).copy_(grad_out)
    dq, dk, dv = (_bshd_empty(*t.shape, t) for t in (q, k, v))
    handle = _handle(q.device)

    def build() -> tuple[Any, ...]:
        g = _new_graph(q.dtype, handle)
        names = ("q", "k", "v", "o", "dO", "stats")
        q_t, k_t, v_t, o_t, do_t, stats_t = (
            _operand(g, n, t) for n, t in zip(names, (q, k, v, out, grad_out, stats), strict=True)
        )
        dq_t, dk_t, dv_t = g.sdpa_backward(
            name="mpt_attention_backward",
            q=q_t,
            k=k_t,
            v=v_t,
            o=o_t,
            dO=do_t,
            stats=stats_t,
            **_mask_args(scale, alibi),
        )
        for node_output, t in ((dq_t, dq), (dk_t, dk), (dv_t, dv)):
            _bind_output(node_output, t)
        return g, _finish(g), (q_t, k_t, v_t, o_t, do_t, stats_t, dq_t, dk_t, dv_t)

    key = ("backward", q.dtype, q.device, scale, alibi, _layout_key(q, k, v, out, grad_out, stats))
    g, workspace_size, handles = _cached(key, build)
    tensors = (q, k, v, out, grad_out, stats, dq, dk, dv)
    _execute(g, dict(zip(handles, tensors, strict=True)), workspace_size, q.device, handle)
    return dq, dk, dv


@_cudnn_attention_backward.register_fake
def _(grad_out, q, k, v, out, stats, scale, alibi):
    return tuple(_bshd_empty(*t.shape, t) for t in (q, k, v))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, scale, alibi = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats)
    ctx.scale, ctx.alibi = scale, alibi


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_stats: torch.Tensor | None) -> tuple:
    q, k, v, out, stats = ctx.saved_tensors
    dq, dk, dv = _cudnn_attention_backward(grad_out, q, k, v, out, stats, ctx.scale, ctx.alibi)
    return dq, dk, dv, None, None


_cudnn_attention.register_autograd(_backward, setup_context=_setup_context)


def cudnn_attend(
    q_BHSD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    alibi: bool,
    softmax_scale: float,
) -> torch.Tensor:
    """Causal attention of S queries over the same S keys, ALiBi added by cuDNN when ``alibi``
    (its slopes, which the model config has checked equal MPT's) -> ``[B,H,S,D]``."""
    out, _ = _cudnn_attention(q_BHSD, k_BGSD, v_BGSD, float(softmax_scale), bool(alibi))
    return out
