"""Each GPU variant gets its own peak: an H100 PCIe or NVL is not billed an SXM's 989 TFLOP/s.

MFU divides by the peak, so a PCIe card read as SXM reports 24% less MFU than it achieves and
plans on it come out too optimistic. Names are what ``torch.cuda.get_device_name()`` returns.
"""

from __future__ import annotations

import logging

import pytest
from composer.callbacks.speed_monitor import GPU_AVAILABLE_FLOPS

from mpt_train.callbacks.accounting import GPU_TYPES, detect_gpu_type, get_gpu
from mpt_train.config import load_config_dict
from mpt_train.tools.plan import make_plan
from tests.tools.test_plan import MPT_7B


@pytest.mark.parametrize(
    ("device_name", "gpu_type", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "h100", 989),  # SXM5
        ("NVIDIA H100 PCIe", "h100_pcie", 756),
        ("NVIDIA H100 80GB HBM2e", "h100_pcie", 756),  # PCIe boards report their memory
        ("NVIDIA H100 NVL", "h100_nvl", 835),
        ("NVIDIA H200", "h200", 989),
        ("NVIDIA H200 NVL", "h200_nvl", 835),
        ("NVIDIA A100-SXM4-40GB", "a100_40gb", 312),
        ("NVIDIA A100-SXM4-80GB", "a100_80gb", 312),
        ("NVIDIA A100 80GB PCIe", "a100_80gb", 312),
    ],
)
def test_device_name_maps_to_its_variant_and_peak(
    device_name: str, gpu_type: str, tflops: int
) -> None:
    assert detect_gpu_type(device_name) == gpu_type
    assert get_gpu(gpu_type).peak_flops == tflops * 1e12


@pytest.mark.parametrize("device_name", ["NVIDIA H100", "Tesla T4"])
def test_unknown_variant_gives_no_peak_rather_than_a_wrong_one(
    device_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mpt_train.callbacks.accounting"):
        assert detect_gpu_type(device_name) is None
    assert device_name in caplog.text and "cost.gpu_type" in caplog.text


@pytest.mark.parametrize(
    ("ours", "composers"),
    [("h100", "h100-sxm"), ("h100_pcie", "h100-pcie"), ("h200", "h200-sxm"), ("a100_80gb", "a100")],
)
def test_peaks_agree_with_composers_speed_monitor(ours: str, composers: str) -> None:
    """Composer's own MFU (throughput/device/mfu) and the cost monitor's divide by one peak."""
    assert get_gpu(ours).peak_flops == pytest.approx(
        GPU_AVAILABLE_FLOPS[composers]["amp_bf16"], rel=1e-3
    )


def test_variants_are_spec_and_plan_choices_and_h100_is_still_the_sxm_part() -> None:
    assert {"h100", "h100_pcie", "h100_nvl", "h200", "h200_nvl"} <= set(GPU_TYPES)
    for gpu_type in ("h100", "h100_pcie", "h100_nvl"):
        cfg = load_config_dict({**MPT_7B, "cost": {"gpu_type": gpu_type}})
        assert cfg.cost.gpu_type == gpu_type
    cfg = load_config_dict(MPT_7B)
    sxm = make_plan(cfg, gpus=440, gpu="h100")
    pcie = make_plan(cfg, gpus=440, gpu="h100_pcie")
    nvl = make_plan(cfg, gpus=440, gpu="h100_nvl")
    assert pcie.days / sxm.days == pytest.approx(989 / 756)
    assert nvl.days / sxm.days == pytest.approx(989 / 835)
