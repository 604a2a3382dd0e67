"""Under FSDP's bf16 mixed precision, attention still uses exact fp32 ALiBi slopes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import mpt_train.model.attention as attention
    from mpt_train.model import MPTConfig, build_model
    from mpt_train.model.alibi import alibi_slopes

    dist.init_process_group("gloo")
    seen = []
    real = attention.attend

    def spy(impl, *args, slopes_H=None, **kwargs):
        seen.append(slopes_H)
        return real(impl, *args, slopes_H=slopes_H, **kwargs)

    attention.attend = spy
    # 20 heads (MPT-3B): bf16 would round these slopes by up to 1.4e-3.
    cfg = MPTConfig(d_model=40, n_heads=20, n_layers=2, max_seq_len=16, vocab_size=64,
                    attn_config={"impl": "sdpa"})
    model = build_model(cfg)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model(torch.randint(0, 64, (1, 16)))
    exact = alibi_slopes(20)
    assert len(seen) == 2, len(seen)
    for slopes in seen:
        assert slopes.dtype == torch.float32, slopes.dtype
        assert torch.equal(slopes, exact), (slopes - exact).abs().max()
    print("slopes exact")
    dist.destroy_process_group()
    """
)


def test_sharded_blocks_attend_with_exact_fp32_slopes(tmp_path) -> None:
    """FSDP2 casts a block's floating-point inputs to its compute dtype; slopes passed into
    the blocks arrived in bf16 (a systematic position-penalty error only in sharded runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    script = tmp_path / "sharded_slopes.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "slopes exact" in out.stdout
