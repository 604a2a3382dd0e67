"""Export a Composer checkpoint as a transformers MPT folder (no remote code needed to load it).

    python scripts/convert_to_hf.py runs/quickstart/checkpoints/latest-rank0.pt out/quickstart-hf
    python scripts/convert_to_hf.py s3://bucket/ckpts/ep0-ba1000 out/hf --dtype bf16   # sharded
    python scripts/convert_to_hf.py s3://bucket/ckpts out/hf   # a save_folder: its newest checkpoint

The folder loads with ``AutoModelForCausalLM.from_pretrained(out)`` as ``MptForCausalLM``.
A model config transformers' MPT cannot represent (GQA, learned positions, qk_ln, ...) is
refused with the reasons, and nothing is written. Exit status 2 on a refused or unreadable input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

log = logging.getLogger("convert_to_hf")

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help=".pt file, sharded folder, save_folder, or s3:// URI")
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument("--spec", help="run spec YAML when the checkpoint carries none")
    parser.add_argument("--tokenizer", help="tokenizer name/path (default: the spec's)")
    parser.add_argument("--max-seq-len", type=int, help="config.max_seq_len to export")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle a checkpoint holding types outside the safe allow-list (runs its code)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="export into a folder that holds other files (same-named files are replaced)",
    )
    args = parser.parse_args(argv)
    from mpt_train.errors import run_cli
    from mpt_train.export import CheckpointError

    return run_cli(
        lambda: _run(args),
        prefix=f"error: cannot export {args.checkpoint}",
        bad_input=(CheckpointError, ValueError, OSError),
    )


def _run(args: argparse.Namespace) -> int:
    import torch

    from mpt_train.export import export_hf

    out = export_hf(
        args.checkpoint,
        args.out_dir,
        spec_path=args.spec,
        tokenizer=args.tokenizer,
        max_seq_len=args.max_seq_len,
        dtype=getattr(torch, DTYPES[args.dtype]),
        trust=args.trust_checkpoint,
        overwrite=args.overwrite,
    )
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
