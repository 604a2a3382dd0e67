"""What each attention kernel (``model.attn_config.impl``) supports: one table, read by the
spec checks (:mod:`mpt_train.config.checks`, :class:`mpt_train.model.config.AttentionConfig`),
the model build (:func:`mpt_train.model.attention.check_attention_impl`) and the docs
(``docs/attention.md``, written by ``make docs``).

A spec asking a kernel for what it cannot do is refused before any process starts, with the
kernels that can. Pure data, no torch: the config layer reads it without importing a GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KERNELS", "AttentionKernel", "kernel", "kernels_with", "markdown_table"]


@dataclass(frozen=True)
class AttentionKernel:
    """One attention kernel and what it can run. Every kernel applies the causal mask and
    MPT's ALiBi bias; the fields say what else it takes."""

    name: str
    summary: str
    #: packed documents attend only within themselves (``attn_uses_sequence_id``)
    document_masking: bool
    #: attention dropout (``attn_pdrop`` > 0)
    dropout: bool
    #: fp32 activations (``precision: fp32``, the CPU default); False: bf16/fp16 only
    fp32: bool
    #: how decoding over a KV cache (one new query, many keys) runs: "kernel" or "sdpa"
    decode: str
    #: runs inside captured CUDA graphs (``compile.mode`` reduce-overhead / max-autotune)
    cuda_graphs: bool
    #: the ``alibi_bias_max`` values it applies exactly; None: any
    alibi_bias_max: tuple[int, ...] | None
    #: where it runs: "cpu", "gpu"
    devices: tuple[str, ...]
    #: torch.compile with Inductor works on CPU ranks too
    compiles_on_cpu: bool
    #: what must be installed beyond mpt-train's own dependencies (``pip install 'mpt-train[gpu]'``)
    packages: tuple[str, ...] = ()


KERNELS: dict[str, AttentionKernel] = {
    k.name: k
    for k in (
        AttentionKernel(
            name="torch",
            summary="explicit matmul + fp32 softmax; the readable reference",
            document_masking=True,
            dropout=True,
            fp32=True,
            decode="kernel",
            cuda_graphs=True,
            alibi_bias_max=None,
            devices=("cpu", "gpu"),
            compiles_on_cpu=True,
        ),
        AttentionKernel(
            name="sdpa",
            summary="F.scaled_dot_product_attention, ALiBi folded into the heads",
            document_masking=True,
            dropout=True,
            fp32=True,
            decode="kernel",
            cuda_graphs=True,
            alibi_bias_max=None,
            devices=("cpu", "gpu"),
            compiles_on_cpu=True,
        ),
        AttentionKernel(
            name="flex",
            summary="FlexAttention with an ALiBi score_mod, compiled",
            document_masking=True,
            dropout=False,
            fp32=True,
            decode="sdpa",
            cuda_graphs=True,
            alibi_bias_max=None,
            devices=("cpu", "gpu"),
            compiles_on_cpu=False,
        ),
        AttentionKernel(
            name="flash",
            summary="flash-attn 2 with alibi_slopes",
            document_masking=False,
            dropout=True,
            fp32=False,
            decode="kernel",
            cuda_graphs=True,
            alibi_bias_max=None,
            devices=("gpu",),
            compiles_on_cpu=False,
            packages=("flash-attn>=2.4",),
        ),
        AttentionKernel(
            name="cudnn",
            summary="cuDNN's fused attention with ALiBi inside the kernel (sm80+)",
            document_masking=False,
            dropout=False,
            fp32=False,
            decode="sdpa",
            cuda_graphs=False,
            alibi_bias_max=(8,),
            devices=("gpu",),
            compiles_on_cpu=False,
            packages=("nvidia-cudnn-frontend", "cuDNN>=9.0"),
        ),
    )
}


def kernel(impl: str) -> AttentionKernel:
    """The table's row for ``impl`` (``AttentionConfig`` has checked the name)."""
    return KERNELS[impl]


def kernels_with(field: str, value: object = True) -> list[str]:
    """Names of the kernels whose ``field`` is ``value`` (for "use one of ..." hints)."""
    return [k.name for k in KERNELS.values() if getattr(k, field) == value]


def _cell(value: object) -> str:
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value is None:
        return "any"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "-"
    return "via SDPA" if value == "sdpa" else ("yes" if value == "kernel" else str(value))


_COLUMNS = (
    ("impl", "name"),
    ("document masking", "document_masking"),
    ("dropout", "dropout"),
    ("fp32", "fp32"),
    ("decode", "decode"),
    ("CUDA graphs", "cuda_graphs"),
    ("alibi_bias_max", "alibi_bias_max"),
    ("devices", "devices"),
    ("compiled on CPU", "compiles_on_cpu"),
    ("packages", "packages"),
)


def markdown_table() -> str:
    """The table as markdown, as ``docs/attention.md`` shows it."""
    head = "| " + " | ".join(title for title, _ in _COLUMNS) + " |"
    rule = "|" + " --- |" * len(_COLUMNS)
    rows = [
        "| "
        + " | ".join(f"`{k.name}`" if f == "name" else _cell(getattr(k, f)) for _, f in _COLUMNS)
        + " |"
        for k in KERNELS.values()
    ]
    return "\n".join([head, rule, *rows]) + "\n"
