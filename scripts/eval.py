"""Evaluate a checkpoint or HF MPT folder: loss/perplexity per eval set, ICL accuracy per task.

    python scripts/eval.py yamls/eval/quickstart.yaml
    python scripts/eval.py my_eval.yaml model=out/hf-folder --json results.json

See :mod:`mpt_train.eval.spec` for the spec format. Prints one line per metric; exit status 2
on a bad spec (the message names the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="eval spec YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as model=path")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_intermixed_args(argv)
    from mpt_train.errors import run_cli
    from mpt_train.export import CheckpointError

    # ValueError: data that cannot be evaluated as asked (the message names the file).
    return run_cli(
        lambda: _run(args),
        prefix=f"error in eval spec {args.spec}",
        bad_input=(CheckpointError, ValueError),
    )


def _run(args: argparse.Namespace) -> int:
    from mpt_train.eval import load_eval_spec, run_eval

    results = run_eval(load_eval_spec(args.spec, args.overrides))
    for key, value in results.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
