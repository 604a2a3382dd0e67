"""Whether this machine can run an attention kernel: packages, libraries, GPU generation.

What each kernel supports is :data:`mpt_train.model.kernels.KERNELS`; this module asks the
machine. The model build calls :func:`check_attention_impl`, and training calls it before any
process group exists, so a node without the package fails in seconds, naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from mpt_train.errors import ConfigError
from mpt_train.model.cudnn_attention import cudnn_attention_missing
from mpt_train.model.flex import flex_attention_available
from mpt_train.model.kernels import kernel, kernels_with

__all__ = ["check_attention_impl", "flash_attn_2_missing"]


def check_attention_impl(
    impl: str,
    sdpa_backends: tuple[str, ...] | list[str] = (),
    flex_kernel_options: dict[str, Any] | None = None,
) -> None:
    """Fail at build time, not at the first step, when a kernel cannot run here."""
    if impl == "sdpa" and torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():
        raise ConfigError(
            "attn_config.impl",
            "'sdpa' folds ALiBi into the heads, which needs SDPA to add up scores in fp32; "
            "torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True) is set, which lets "
            "its math kernel add them in bf16/fp16. Unset it or use impl flex/torch",
        )
    cpu_backends = {"flash", "math"}
    if sdpa_backends and not cpu_backends & set(sdpa_backends) and not torch.cuda.is_available():
        raise ConfigError(
            "attn_config.sdpa_backends",
            f"got {list(sdpa_backends)}, none of which runs without a CUDA GPU; "
            "on CPU SDPA has flash and math",
        )
    k = kernel(impl)
    reason = _MISSING[impl]() if impl in _MISSING else None
    if reason is not None:
        needs = ""
        if k.packages:
            needs = f"install {', '.join(k.packages)} on a {'/'.join(k.devices)} machine, or "
        raise ConfigError(
            "attn_config.impl",
            f"{impl!r} cannot run here: {reason}; {needs}use one of: "
            f"{', '.join(kernels_with('packages', ()))}",
        )
    if "cpu" not in k.devices and not torch.cuda.is_available():
        raise ConfigError(
            "attn_config.impl",
            f"{impl!r} needs a CUDA GPU and none is available; use one of: "
            f"{', '.join(kernels_with('devices', ('cpu', 'gpu')))}",
        )
    if impl == "flex":
        _check_flex_backend((flex_kernel_options or {}).get("BACKEND"))


def _major_minor(version: str) -> tuple[int, int]:
    """``"2.7.4.post1"`` -> ``(2, 7)``; ``(0, 0)`` when there is no such pair."""
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)


def _torch_version() -> tuple[int, int]:
    return _major_minor(torch.__version__)


def _check_flex_backend(backend: Any) -> None:
    """FlexAttention's ``BACKEND`` kernel option (torch 2.9+): ``FLASH`` runs the score_mod on
    FlashAttention-4's CuTe kernels, which need the flash-attn-4 package and a Hopper or newer
    GPU. Without these Inductor fails only when it compiles the first step."""
    if backend is None:
        return
    key = "attn_config.flex_kernel_options"
    if _torch_version() < (2, 9):
        raise ConfigError(
            key, f"BACKEND {backend!r} needs torch >= 2.9; this is torch {torch.__version__}"
        )
    if str(backend).upper() != "FLASH":
        return
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            key,
            f"BACKEND 'FLASH' runs FlashAttention-4's kernels, which need the flash-attn-4 "
            f"package ({err}); install it on a Hopper or newer GPU machine or drop BACKEND",
        ) from None
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise ConfigError(key, "BACKEND 'FLASH' needs a Hopper or newer GPU (sm90+)")


def _flex_missing() -> str | None:
    reason = flex_attention_available()
    return None if reason is None else f"FlexAttention needs torch >= 2.5 ({reason})"


def flash_attn_2_missing() -> str | None:
    """Why flash-attn's ``flash_attn_func`` with ``alibi_slopes`` (2.4+) cannot be used, or None.

    Importing ``flash_attn`` is not enough: flash-attn 4 alone installs only ``flash_attn.cute``,
    which makes ``flash_attn`` an importable namespace package without ``flash_attn_func``.
    """
    try:
        import flash_attn
        from flash_attn import flash_attn_func  # noqa: F401
    except ImportError as err:
        return f"flash_attn_func is not importable ({err})"
    version = str(getattr(flash_attn, "__version__", ""))
    if _major_minor(version) < (2, 4):
        return f"flash-attn {version or '(no version)'} has no alibi_slopes, which came in 2.4"
    return None


#: Why a kernel cannot run on this machine (package, library, GPU generation), or None.
_MISSING: dict[str, Callable[[], str | None]] = {
    "flex": _flex_missing,
    "flash": flash_attn_2_missing,
    "cudnn": cudnn_attention_missing,
}
