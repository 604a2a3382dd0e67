"""Run-spec loading: typed sections, overrides, interpolation, and errors that name the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mpt_train.config import ConfigError, load_config, load_config_dict, redact, to_container
from mpt_train.config.redact import REDACTED
from mpt_train.config.validate import check_batch_split
from tests.helpers import REPO

BASE = {
    "variables": {"seq": 64},
    "max_duration": "10ba",
    "global_train_batch_size": 8,
    "model": {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": "${variables.seq}",
        "vocab_size": 512,
    },
    "train_loader": {"dataset": {"local": "/data/mds", "max_seq_len": "${variables.seq}"}},
}


def write_spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_loads_typed_sections_with_interpolation_and_overrides() -> None:
    cfg = load_config_dict(BASE, ["model.n_layers=3", "optimizer.lr=1e-3", "variables.seq=32"])
    assert cfg.model.n_layers == 3
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.model.max_seq_len == 32 and cfg.train_loader.dataset.max_seq_len == 32
    assert cfg.fsdp is not None and cfg.fsdp.sharding_strategy == "FULL_SHARD"
    assert type(cfg.model.attn_config).__name__ == "AttentionConfig"


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("optimizer.weight_decy=0.1", "optimizer.weight_decy", "optimizer.weight_decay"),
        ("model.attn_config.alibi_bias=4", "model.attn_config.alibi_bias", "alibi_bias_max"),
        ("train_loader.dataset.shuffel=false", "train_loader.dataset.shuffel", "shuffle"),
        ("max_duraton=5ba", "max_duraton", "max_duration"),
    ],
)
def test_unknown_key_at_any_depth_is_named_with_nearest(override: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_dict(BASE, [override])
    assert e.value.key == key
    assert hint in str(e.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.n_layers=many", "model.n_layers"),
        ("optimizer.name=sgd", "optimizer.name"),
        ("max_duration=10", "max_duration"),
        ("scheduler.t_warmup=soon", "scheduler.t_warmup"),
        ("fsdp.sharding_strategy=FULLSHARD", "fsdp.sharding_strategy"),
        ("model.attn_config.impl=xformers", "model.attn_config.impl"),
        ("device_train_microbatch_size=big", "device_train_microbatch_size"),
        ("global_train_batch_size=0", "global_train_batch_size"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_dict(BASE, [override])
    assert e.value.key == key, str(e.value)


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (["max_duration=1e9tok"], "scheduler.t_warmup", "counts batches, but t_max '1dur'"),
        (["scheduler.t_warmup=0.01dur", "scheduler.t_max=5ba"], "scheduler.t_max", "ends before"),
        (["scheduler.t_warmup=0.5dur", "scheduler.t_max=0.9dur"], "scheduler.t_max", "ends before"),
        (["loss.chunk_tokens=64", "loss.train_metrics=true"], "loss.chunk_tokens", "full logits"),
        (["optimizer.eps=-1e-8"], "optimizer.eps", ">= 0"),
        (["optimizer.name=decoupled_lionw", "optimizer.implementation=fused"],
         "optimizer.implementation", "one implementation"),
        (["optimizer.name=adamw", "optimizer.implementation=composer"],
         "optimizer.implementation", "decoupled_adamw"),
        (["compile.mode=fast"], "compile.mode", "max-autotune"),
        (["compile.enabled=true", "compile.backend=tensorrtt"], "compile.backend", "inductor"),
        (["callbacks.speed_monitor.window_size=0"], "callbacks.speed_monitor.window_size", ">= 1"),
        (["reliability.collective_timeout_s=0"], "reliability.collective_timeout_s", "> 0"),
        (["reliability.straggler_timeout_s=400"], "reliability.straggler_timeout_s",
         "not below collective_timeout_s"),
        (["max_duration=0ba"], "max_duration", "expected > 0"),
        (["max_duration=-5ba"], "max_duration", "expected > 0"),
        (["scheduler.t_warmup=-1ba"], "scheduler.t_warmup", "expected >= 0"),
        (["save_num_checkpoints_to_keep=-2"], "save_num_checkpoints_to_keep", "-1 (all)"),
        (["save_folder=/ckpt", "save_num_checkpoints_to_keep=0"],
         "save_num_checkpoints_to_keep", "nothing would be left to resume from"),
        (["save_folder=/ckpt", "save_num_checkpoints_to_keep=1",
          "reliability.on_corrupt_checkpoint=fallback"],
         "reliability.on_corrupt_checkpoint", "never a previous one"),
    ],
)  # fmt: skip
def test_settings_that_would_fail_late_or_be_ignored_are_refused(
    overrides: list[str], key: str, says: str
) -> None:
    """Each of these used to load and then fail inside Composer once the model was built (or
    run with a setting silently dropped)."""
    from mpt_train.config.schema import check_schedule

    with pytest.raises(ConfigError) as e:
        cfg = load_config_dict(BASE, overrides)
        check_schedule(cfg.scheduler, cfg.max_duration)  # where a spec is about to run
    assert e.value.key == key, str(e.value)
    assert says in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["max_duration=1e9tok", "scheduler.t_warmup=1e7tok"],
        ["max_duration=1e9tok", "scheduler.t_warmup=0.01dur"],
        ["max_duration=2ep", "scheduler.t_warmup=10ba"],  # Composer counts epochs in batches
        ["scheduler.t_max=20ba", "scheduler.t_warmup=2ba"],
        [
            "save_folder=s3://bucket/ckpt",
            "save_num_checkpoints_to_keep=0",
            "scheduler.t_warmup=2ba",
        ],
    ],
)
def test_schedules_and_retention_composer_accepts_still_load(overrides: list[str]) -> None:
    from mpt_train.config.schema import check_schedule

    cfg = load_config_dict(BASE, overrides)
    assert check_schedule(cfg.scheduler, cfg.max_duration) is None


def test_a_warmup_as_long_as_the_run_is_a_warning_not_an_error() -> None:
    """A smoke test of a real spec (max_duration=20ba over a 2000ba warmup) must still run."""
    from mpt_train.config.schema import check_schedule

    cfg = load_config_dict(BASE, ["scheduler.t_warmup=10ba"])
    assert "never leaves warmup" in check_schedule(cfg.scheduler, cfg.max_duration)
    cfg = load_config_dict(BASE, ["scheduler.t_warmup=2ba"])
    assert check_schedule(cfg.scheduler, cfg.max_duration) is None


def test_missing_required_section_is_named() -> None:
    spec = {k: v for k, v in BASE.items() if k != "train_loader"}
    with pytest.raises(ConfigError) as e:
        load_config_dict(spec)
    assert e.value.key == "train_loader"


def test_yaml_file_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = write_spec(tmp_path, "model:\n  d_model: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and ":" in str(e.value)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_tags_do_not_construct_objects(tmp_path: Path) -> None:
    evil = write_spec(tmp_path, "seed: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_config(evil)
    assert not Path("pwned").exists()


def test_includes_merge_under_the_spec(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    write_spec(tmp_path, "model:\n  d_model: 64\n  n_heads: 4\n  n_layers: 7\n", "models/m.yaml")
    spec = write_spec(
        tmp_path,
        """
        includes: [models/m.yaml]
        max_duration: 3ba
        global_train_batch_size: 2
        model: {n_layers: 2, vocab_size: 256}
        train_loader: {dataset: {local: /x}}
        """,
    )
    cfg = load_config(spec)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (64, 2, 256)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"a\.b=c"):
        load_config_dict(BASE, ["model.n_layers"])


def test_run_name_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUN_NAME", "from-env")
    assert load_config_dict(BASE).run_name == "from-env"
    assert load_config_dict(BASE, ["run_name=explicit"]).run_name == "explicit"


def test_redaction_masks_secret_keys_and_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-123456")
    spec = dict(
        BASE,
        variables={
            "seq": 64,
            "note": "key=wandb-secret-123456",
            "hf_token": "hf_abcdefgh",
            "eos_token": "<|endoftext|>",
        },
    )
    out = redact(to_container(load_config_dict(spec)))
    text = str(out)
    assert "wandb-secret-123456" not in text and "hf_abcdefgh" not in text
    assert out["variables"]["hf_token"] == REDACTED
    assert out["variables"]["eos_token"] == "<|endoftext|>"


@pytest.mark.parametrize(
    "spec",
    sorted(str(p.relative_to(REPO)) for p in (REPO / "yamls").glob("*.yaml")),
)
def test_every_shipped_spec_loads(spec: str) -> None:
    cfg = load_config(REPO / spec)
    assert cfg.train_loader.dataset.max_seq_len <= cfg.model.max_seq_len
    assert cfg.model.attn_config.alibi and cfg.model.no_bias


def test_mpt_7b_1t_is_the_published_run() -> None:
    cfg = load_config(REPO / "yamls/mpt-7b-1t.yaml")
    assert cfg.max_duration == "1000000000000tok"
    assert cfg.global_train_batch_size == 1760 and cfg.train_loader.dataset.max_seq_len == 2048
    assert cfg.optimizer.name == "decoupled_lionw"
    # The published warmup, 2000 batches, in the unit Composer needs next to max_duration.
    assert cfg.scheduler.t_warmup == f"{2000 * 1760 * 2048}tok"
    check_batch_split(cfg, 440)  # 4 samples per GPU on the published 440 GPUs
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers, cfg.model.vocab_size) == (
        4096,
        32,
        32,
        50432,
    )
    mix = {k: s.proportion for k, s in cfg.train_loader.dataset.streams.items()}
    assert mix["mc4"] == 0.33 and mix["c4"] == 0.299 and mix["stackexchange"] == 0.014
    assert sum(mix.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(s.remote.startswith("s3://") for s in cfg.train_loader.dataset.streams.values())
