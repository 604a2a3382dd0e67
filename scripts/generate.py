"""Sample text from a checkpoint or HF MPT folder, with a KV cache, and report tokens/s.

    python scripts/generate.py runs/quickstart/checkpoints --prompt "The json module" \\
        --max-new-tokens 64 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
    python scripts/generate.py out/hf-folder --prompts-file prompts.txt   # one prompt a line
    python scripts/generate.py ckpt.pt --chat --prompt "What is a tuple?"  # ChatML-wrapped

Each prompt is generated on its own (no padding), stopping at EOS or ``--max-new-tokens``.
Tokens/s counts new tokens only, over the wall time of the generation call (prompt
processing included), after one warm-up call that is not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from ``--prompt`` (repeatable) and ``--prompts-file`` (text lines or JSONL)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        for line in Path(args.prompts_file).read_text().splitlines():
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                prompts.append(json.loads(line)["prompt"])
            else:
                prompts.append(line)
    if not prompts:
        raise SystemExit("error: give --prompt or --prompts-file")
    return prompts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="checkpoint (.pt, folder, s3://) or HF MPT folder")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or JSONL with 'prompt'")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="re-run the full sequence")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in ChatML turns")
    parser.add_argument("--spec", help="run spec YAML for checkpoints without one")
    parser.add_argument("--tokenizer", help="tokenizer name/path (default: the model's)")
    parser.add_argument("--attn-impl", help="attention kernel (default: as trained)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    prompts = read_prompts(args)
    from mpt_train.errors import ConfigError, run_cli
    from mpt_train.export import CheckpointError

    def run() -> int:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device", f"{args.device} but no CUDA device is visible")
        _generate_all(args, prompts)
        return 0

    return run_cli(run, bad_input=(CheckpointError, ValueError), log_level="WARNING")


def _generate_all(args: argparse.Namespace, prompts: list[str]) -> None:
    import torch

    from mpt_train.data import load_tokenizer
    from mpt_train.export import load_model
    from mpt_train.model import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok_name = load_model(args.model, spec_path=args.spec, impl=args.attn_impl)
    tokenizer = load_tokenizer(args.tokenizer or tok_name or "")
    model = model.to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def run(ids: torch.Tensor, n: int) -> torch.Tensor:
        return generate(
            model,
            ids,
            n,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=not args.no_cache,
            generator=gen,
        )

    total_new, total_s = 0, 0.0
    for i, prompt in enumerate(prompts):
        text = (
            f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            if args.chat
            else prompt
        )
        ids = torch.tensor([tokenizer(text)["input_ids"]], device=args.device)
        if i == 0:
            run(ids, min(4, args.max_new_tokens))  # warm-up (allocations, kernel selection)
        t0 = time.perf_counter()
        out = run(ids, args.max_new_tokens)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        total_new += len(new)
        total_s += dt
        print(f"### prompt {i}: {prompt!r}")
        print(text + tokenizer.decode(new))
        print(f"--- {len(new)} new tokens in {dt:.3f} s: {len(new) / dt:.1f} tokens/s")
    cache = "off" if args.no_cache else "on"
    rate = total_new / total_s if total_s else 0.0
    print(
        f"total: {total_new} new tokens in {total_s:.3f} s: {rate:.1f} tokens/s (KV cache {cache})"
    )


if __name__ == "__main__":
    sys.exit(main())
