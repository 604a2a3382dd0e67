"""Forward+backward time of each attention kernel at one shape, side by side.

Rows: ``torch`` (reference, ALiBi), ``sdpa+alibi folded`` (ALiBi folded into the heads,
``is_causal``: impl ``sdpa``), ``sdpa+alibi dense bias`` (SDPA given an additive [H, S, S]
ALiBi + causal mask, for comparison), ``sdpa causal`` (``is_causal``, no ALiBi: the floor ALiBi
costs are measured against), ``flex+alibi`` (FlexAttention, ALiBi score_mod, compiled; and
without ALiBi, which separates ALiBi's cost from the kernel's), ``flex+alibi eager`` when
compiling is impossible here, ``flash+alibi`` when flash-attn is importable on a GPU, and
``cudnn+alibi`` (cuDNN's fused kernel adding ALiBi itself, impl ``cudnn``; with its no-ALiBi
twin) when the cuDNN frontend is. On a GPU the folded and causal rows are repeated with SDPA
limited to one kernel each (``[flash]``, ``[cudnn]``, ``[efficient]``:
``attn_config.sdpa_backends``). Every row's output is checked against the torch reference
(with or without ALiBi, as the row computes). Each row gives forward + backward, the forward
alone and their difference (the backward), to show which pass a kernel loses its time in.

    python scripts/bench_attention.py --batch 2 --heads 4 --seq 256 --head-dim 32 --device cpu
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mpt_train.model.alibi import alibi_bias, alibi_slopes
from mpt_train.model.attention import attend, check_attention_impl
from mpt_train.model.flex import flex_attend

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_ms(step: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Mean milliseconds of ``step`` run ``iters`` times back to back, as a training step
    queues its kernels: on a GPU the device time between two CUDA events, so per-call host
    work (Python, graph lookup, kernel launch) counts only where it outlasts the kernels."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    began = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - began) * 1e3 / iters


def time_kernel(
    fn: Kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    warmup: int,
    iters: int,
) -> tuple[float, float]:
    """(forward + backward, forward) mean milliseconds. The forward records autograd as in
    training (the same compiled kernel); the backward returns the input gradients without
    accumulating them anywhere, so only the kernel and its own layout handling are timed."""
    device = q.device

    def both() -> None:
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    return mean_ms(both, device, warmup, iters), mean_ms(lambda: fn(q, k, v), device, 1, iters)


def model_inputs(
    batch: int,
    heads: int,
    seq: int,
    dim: int,
    device: torch.device,
    dtype: torch.dtype,
    packed: bool,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[B, H, S, D]`` and the output's gradient. ``packed``: laid out as the model
    hands them to attention, views of its fused QKV projection ``[B, S, 3, H, D]``, and the
    gradient as the output projection returns it, ``[B, S, H, D]`` transposed; otherwise
    three contiguous ``[B, H, S, D]`` tensors and a contiguous gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if packed:
        qkv = torch.randn(batch, seq, 3, heads, dim, device=device, dtype=dtype, generator=gen)
        qkv.requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        grad = torch.randn(batch, seq, heads, dim, device=device, dtype=dtype, generator=gen)
        return q, k, v, grad.transpose(1, 2)
    shape = (batch, heads, seq, dim)
    q, k, v = (
        torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    )
    return q, k, v, torch.randn(shape, device=device, dtype=dtype, generator=gen)


def _dense_bias_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float
) -> torch.Tensor:
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    bias = alibi_bias(slopes, seq, seq).to(q.dtype).masked_fill(~causal, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=scale)


def kernels(
    heads: int,
    scale: float,
    device: torch.device,
    flex_modes: tuple[str, ...] = (),
    flex_options: tuple[dict, ...] = (),
) -> dict[str, Kernel]:
    slopes = alibi_slopes(heads, device=device)
    rows: dict[str, Kernel] = {
        "torch+alibi": lambda q, k, v: attend(
            "torch", q, k, v, slopes_H=slopes, softmax_scale=scale
        ),
        "sdpa+alibi folded": lambda q, k, v: attend(
            "sdpa", q, k, v, slopes_H=slopes, softmax_scale=scale
        ),
        "sdpa+alibi dense bias": functools.partial(_dense_bias_sdpa, slopes=slopes, scale=scale),
        "sdpa causal (no alibi)": lambda q, k, v: attend(
            "sdpa", q, k, v, slopes_H=None, softmax_scale=scale
        ),
        "flex+alibi compiled": lambda q, k, v: flex_attend(
            q, k, v, slopes_H=slopes, softmax_scale=scale, compiled=True
        ),
        # Plain causal FlexAttention: how much of flex+alibi's gap to SDPA is ALiBi's.
        "flex causal (no alibi) compiled": lambda q, k, v: flex_attend(
            q, k, v, slopes_H=None, softmax_scale=scale, compiled=True
        ),
        "flex+alibi eager": lambda q, k, v: flex_attend(
            q, k, v, slopes_H=slopes, softmax_scale=scale, compiled=False
        ),
    }
    for backend in ("flash", "cudnn", "efficient") if device.type == "cuda" else ():
        rows[f"sdpa+alibi folded [{backend}]"] = functools.partial(
            attend, "sdpa", slopes_H=slopes, softmax_scale=scale, sdpa_backends=[backend]
        )
        rows[f"sdpa causal (no alibi) [{backend}]"] = functools.partial(
            attend, "sdpa", slopes_H=None, softmax_scale=scale, sdpa_backends=[backend]
        )
    for mode in flex_modes:
        # As inside a per-block compiled model: the surrounding compile's mode decides the
        # FlexAttention kernel (max-autotune searches its block sizes; compile.mode in a spec).
        rows[f"flex+alibi {mode}"] = torch.compile(
            lambda q, k, v: flex_attend(
                q, k, v, slopes_H=slopes, softmax_scale=scale, compiled=False
            ),
            mode=mode,
            dynamic=False,
        )
    for opts in flex_options:
        rows[f"flex+alibi {json.dumps(opts, separators=(',', ':'))}"] = functools.partial(
            flex_attend, slopes_H=slopes, softmax_scale=scale, compiled=True, kernel_options=opts
        )
    try:
        check_attention_impl("flash")
        rows["flash+alibi"] = lambda q, k, v: attend(
            "flash", q, k, v, slopes_H=slopes, softmax_scale=scale
        )
    except ValueError as err:
        logger.info("flash row skipped: %s", err)
    try:
        check_attention_impl("cudnn")
        rows["cudnn+alibi"] = lambda q, k, v: attend(
            "cudnn", q, k, v, slopes_H=slopes, softmax_scale=scale
        )
        rows["cudnn causal (no alibi)"] = lambda q, k, v: attend(
            "cudnn", q, k, v, slopes_H=None, softmax_scale=scale
        )
    except ValueError as err:
        logger.info("cudnn rows skipped: %s", err)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--contiguous",
        action="store_true",
        help="three contiguous [B, H, S, D] inputs instead of views of one fused QKV "
        "projection as in the model",
    )
    p.add_argument(
        "--flex-modes",
        nargs="*",
        default=[],
        help="extra compiled-FlexAttention rows, one per torch.compile mode "
        "(e.g. max-autotune-no-cudagraphs); GPU only",
    )
    p.add_argument(
        "--flex-options",
        nargs="*",
        type=json.loads,
        default=[],
        help="extra compiled-FlexAttention rows, one per JSON object of kernel_options "
        '(e.g. \'{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}\'); GPU only',
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    q, k, v, grad_out = model_inputs(
        args.batch, args.heads, args.seq, args.head_dim, device, dtype, not args.contiguous
    )
    scale = args.head_dim**-0.5
    print(
        f"shape B={args.batch} H={args.heads} S={args.seq} D={args.head_dim} "
        f"{args.dtype} on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"{'contiguous inputs' if args.contiguous else 'inputs laid out as in the model'}, "
        f"mean of {args.iters} back to back after {args.warmup} warmup"
    )

    rows = kernels(args.heads, scale, device, tuple(args.flex_modes), tuple(args.flex_options))
    with torch.no_grad():
        ref = rows["torch+alibi"](q, k, v).float()
        ref_causal = attend("torch", q, k, v, slopes_H=None, softmax_scale=scale).float()
    results: dict[str, tuple[float, float] | str] = {}
    for name, fn in rows.items():
        if name == "flex+alibi eager" and device.type == "cuda":
            continue  # the compiled row is the GPU path; eager materialises S x S scores
        if name.startswith(("flex+alibi ", "flex causal")) and name != "flex+alibi eager":
            if device.type != "cuda":
                results[name] = "n/a: compiled FlexAttention needs CUDA here"
                continue
            # Each row compiles its own kernel: past dynamo's limit of 8 recompiles of one
            # function the later rows would silently time the eager fallback instead.
            torch._dynamo.reset()
        try:
            with torch.no_grad():
                out = fn(q, k, v).float()
            err = (out - (ref_causal if "(no alibi)" in name else ref)).abs().max().item()
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            if err > tol:
                raise RuntimeError(f"output differs from torch reference by {err:.2e}")
            results[name] = time_kernel(fn, q, k, v, grad_out, args.warmup, args.iters)
        except Exception as err:  # report the kernel as unavailable, keep benchmarking others
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            results[name] = f"n/a: {type(err).__name__}: {reason[:90]}"

    floor = results.get("sdpa causal (no alibi)")
    width = max(24, *(len(n) for n in results))
    print(
        f"\n{'kernel':<{width}} {'fwd+bwd ms':>11} {'x sdpa-no-alibi':>16} {'fwd ms':>7} {'bwd ms':>7}"
    )
    for name, res in results.items():
        if isinstance(res, str):
            print(f"{name:<{width}} {res}")
            continue
        both, fwd = res
        ratio = f"{both / floor[0]:.2f}" if isinstance(floor, tuple) else "-"
        print(f"{name:<{width}} {both:>11.2f} {ratio:>16} {fwd:>7.2f} {both - fwd:>7.2f}")


if __name__ == "__main__":
    main()
