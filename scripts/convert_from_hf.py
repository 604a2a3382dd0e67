"""Turn a transformers MPT folder into a weights-only checkpoint to start a fine-tune from.

    python scripts/convert_from_hf.py path/to/mpt-7b-hf checkpoints/mpt-7b.pt

Then in the fine-tune spec: ``load_path: checkpoints/mpt-7b.pt`` and ``load_weights_only: true``
(and ``reliability.trust_checkpoint: true``, as for any checkpoint from outside the run). The
matching ``model:`` section is written to ``<out>.model.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir", help="folder with config.json (model_type mpt) + weights")
    parser.add_argument("out", help="checkpoint file to write (.pt)")
    parser.add_argument("--attn-impl", default="sdpa", help="attention kernel for the model yaml")
    args = parser.parse_args(argv)
    from mpt_train.errors import run_cli
    from mpt_train.export import CheckpointError

    return run_cli(
        lambda: _run(args),
        prefix=f"error: cannot import {args.hf_dir}",
        bad_input=(CheckpointError, OSError, ValueError),
    )


def _run(args: argparse.Namespace) -> int:
    from mpt_train.export import import_hf

    out = import_hf(args.hf_dir, args.out, impl=args.attn_impl)
    print(
        f"wrote {out} and {out}.model.yaml (use load_path + load_weights_only: true; it holds "
        "only tensors, so it loads without reliability.trust_checkpoint)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
