"""The planner reproduces MPT-7B's published 9.5 days and ~$200k, and its arithmetic holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpt_train.callbacks.accounting import duration_tokens, get_gpu, price_per_gpu_hour
from mpt_train.config import ConfigError, load_config, load_config_dict
from mpt_train.tools.plan import MPT_7B_PUBLISHED, PUBLISHED_MFU, implied_mfu, main, make_plan

ROOT = Path(__file__).resolve().parents[2]
SPEC_7B_1T = ROOT / "yamls" / "mpt-7b-1t.yaml"

# MPT-7B's published shape (d_model 4096, 32 heads, 32 layers, vocab 50432, seq 2048).
MPT_7B = {
    "max_duration": "1000000000000tok",
    "global_train_batch_size": 1760,
    "model": {"d_model": 4096, "n_heads": 32, "n_layers": 32, "max_seq_len": 2048},
    "train_loader": {"dataset": {"local": "/unused", "max_seq_len": 2048}},
    "scheduler": {"t_warmup": "7208960000tok"},
}


def test_published_mfu_is_what_mpt7b_implies() -> None:
    plan = make_plan(load_config_dict(MPT_7B), gpus=440, gpu="a100_40gb")
    assert plan.params == 6_649_286_656
    assert plan.flops == pytest.approx(4.3117e22, rel=1e-3)
    assert implied_mfu(plan.flops, MPT_7B_PUBLISHED) == pytest.approx(PUBLISHED_MFU, rel=5e-3)


def test_plan_of_the_mpt7b_spec_reproduces_published_time_and_cost() -> None:
    cfg = load_config(SPEC_7B_1T)
    plan = make_plan(cfg, gpus=440, gpu="a100_40gb", price=2.0, mfu=PUBLISHED_MFU)
    assert plan.tokens == 10**12
    assert plan.days == pytest.approx(9.5, rel=0.10)
    assert plan.cost_usd == pytest.approx(200_000, rel=0.10)
    assert plan.gpu_hours == pytest.approx(440 * 24 * plan.days)


def test_deadline_gives_the_smallest_gpu_count_that_meets_it_and_runs() -> None:
    """Compute alone sets a minimum; the answer is the smallest count at or above it that
    the global batch splits across (the trainer refuses any other)."""
    cfg = load_config_dict({**MPT_7B, "device_train_microbatch_size": 4})
    plan = make_plan(cfg, gpus=440, gpu="a100_40gb", deadline_days=12.0)
    least, need = plan.min_gpus_for_deadline, plan.gpus_for_deadline
    assert least is not None and need is not None and plan.nodes_for_deadline == -(-need // 8)
    assert make_plan(cfg, gpus=need, gpu="a100_40gb").days <= 12.0
    with pytest.raises(ConfigError):  # 349 GPUs would do by compute, but 1760 does not split
        make_plan(cfg, gpus=least, gpu="a100_40gb")
    assert need == 440 and plan.microbatch_for_deadline is None  # 4 per rank: as written
    # GPU count changes the time, not the GPU-hours (at a fixed MFU).
    assert make_plan(cfg, gpus=need, gpu="a100_40gb").gpu_hours == pytest.approx(plan.gpu_hours)
    # Faster than 440 allows at microbatch 4: 880 GPUs with 2 samples each, microbatch 2.
    fast = make_plan(cfg, gpus=440, gpu="a100_40gb", deadline_days=7.0)
    assert (fast.gpus_for_deadline, fast.microbatch_for_deadline) == (880, 2)
    assert make_plan(cfg, gpus=440, gpu="a100_40gb").days * 440 / 880 <= 7.0
    with pytest.raises(ConfigError, match="deadline_days"):
        make_plan(cfg, gpus=440, gpu="a100_40gb", deadline_days=1.0)  # > 1760 GPUs


def test_a_gpu_count_the_batch_does_not_split_across_is_refused() -> None:
    cfg = load_config_dict({**MPT_7B, "device_train_microbatch_size": 4})
    with pytest.raises(ConfigError, match=r"gpus: 512 GPUs: .*nearest GPU counts that fit: 440$"):
        make_plan(cfg, gpus=512, gpu="h100")
    # 880 splits the batch (2 per rank) but not the microbatch: the error says what would,
    # as the deadline plan does (test above).
    with pytest.raises(
        ConfigError, match=r"4 must divide.* or keep 880 with device_train_microbatch_size=2$"
    ):
        make_plan(cfg, gpus=880, gpu="h100")
    assert (
        make_plan(
            load_config_dict({**MPT_7B, "device_train_microbatch_size": 2}), gpus=880, gpu="h100"
        ).gpus
        == 880
    )


def test_faster_gpu_and_defaults_from_the_table() -> None:
    cfg = load_config_dict(MPT_7B)
    a100 = make_plan(cfg, gpus=88, gpu="a100_40gb")
    h100 = make_plan(cfg, gpus=88, gpu="h100")
    assert a100.days / h100.days == pytest.approx(989 / 312)
    assert a100.price_per_gpu_hour == get_gpu("a100_40gb").price_per_hour
    assert price_per_gpu_hour("h100", 1.25) == 1.25
    assert price_per_gpu_hour(None, None) is None


def test_durations_in_batches_and_bad_inputs_name_the_key() -> None:
    assert duration_tokens("63900ba", 1024, 2048) == 63900 * 1024 * 2048
    assert duration_tokens("10sp", 8, 128) == 1280
    with pytest.raises(ConfigError, match="max_duration"):
        duration_tokens("2ep", 8, 128)
    with pytest.raises(ConfigError, match="gpu: unknown GPU type 'v100'"):
        make_plan(load_config_dict(MPT_7B), gpus=8, gpu="v100")
    with pytest.raises(ConfigError, match="mfu"):
        make_plan(load_config_dict(MPT_7B), gpus=8, gpu="h100", mfu=1.5)


def test_cli_json_has_the_contract_fields(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    spec = tmp_path / "mpt7b.yaml"
    spec.write_text(yaml.safe_dump(MPT_7B))
    args = [str(spec), "--gpus", "440", "--gpu", "a100_40gb", "--price", "2", "--json"]
    assert main([*args, "--deadline-days", "7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"tokens", "flops", "days", "gpu_hours", "cost_usd", "gpus_for_deadline"} <= set(out)
    assert out["days"] == pytest.approx(9.5, rel=0.10)
    # The thin script runs the same code (one subprocess: imports torch once).
    text = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plan.py"), *args[:-1]],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    days = re.search(r"wall time\s+([\d.]+) days", text)
    assert days is not None and float(days.group(1)) == pytest.approx(9.5, rel=0.10)
    assert "$200," in text


def test_cli_bad_spec_exits_2_with_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "max_duration: 2ep\nglobal_train_batch_size: 8\n"
        "model: {d_model: 64, n_heads: 4, n_layers: 2}\n"
        "train_loader: {dataset: {local: /x}}\n"
    )
    assert main([str(spec), "--gpus", "8", "--gpu", "h100"]) == 2
    assert "max_duration" in capsys.readouterr().err


def test_flex_kernel_options_do_not_stop_planning_or_counting_flops() -> None:
    """Planning counts parameters and FLOPs on a reference-kernel copy of the model: options for
    FlexAttention's kernel must not make that copy invalid (they change no shape or FLOP)."""
    from mpt_train.callbacks.accounting import flops_per_token

    root = Path(__file__).resolve().parents[2]
    plain = load_config(root / "yamls/mpt-125m.yaml")
    tuned = load_config(
        root / "yamls/mpt-125m.yaml", ["model.attn_config.flex_kernel_options={BLOCK_M: 64}"]
    )
    assert tuned.model.attn_config.flex_kernel_options == {"BLOCK_M": 64}
    assert flops_per_token(tuned.model, 2048) == flops_per_token(plain.model, 2048)
    assert make_plan(tuned, gpus=8, gpu="h100").gpus == 8
