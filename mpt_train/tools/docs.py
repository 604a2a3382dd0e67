"""Keep the generated parts of README.md and docs/ equal to their sources.

A generated part sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; NAME
says what writes it: the run-spec reference (from the typed schema) or a table from the
benchmark records. ``python scripts/docs.py`` (``make docs``) rewrites them; ``--check``
fails naming each part that differs, as the test suite does.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mpt_train.config.reference import render_reference
from mpt_train.model.kernels import markdown_table as render_kernels
from mpt_train.tools.records import render_attention, render_headline, render_table

__all__ = ["BLOCKS", "HEADLINE", "REPO", "blocks_in", "main", "pages", "refresh"]

REPO = Path(__file__).resolve().parents[2]

# The front page's few figures: row name -> what a reader is looking at.
HEADLINE = {
    "mpt-1b-spec-mb8-cudnn": "MPT-1B, its spec's batch of 512 in micro batches of 8, `impl: cudnn`",
    "mpt-1b-spec-mb8": "the same on `impl: flex` (no extra package)",
    "mpt-1b": "MPT-1B, one micro batch of 6 per step",
    "mpt-3b": "MPT-3B, one micro batch of 3, chunked loss",
    "mpt-125m": "MPT-125M, one micro batch of 16",
}

BLOCKS: dict[str, Callable[[], str]] = {
    "spec-reference": render_reference,
    "attention-kernels": render_kernels,
    "h100-headline": lambda: render_headline("h100", HEADLINE),
    "h100-table": lambda: render_table("h100"),
    "h100-attention": lambda: render_attention("h100"),
}

_BLOCK = re.compile(r"<!-- generated: ([\w-]+) -->\n(.*?)<!-- end: \1 -->", re.S)


def pages(repo: Path = REPO) -> list[Path]:
    """README.md and every page under docs/."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def blocks_in(text: str) -> list[tuple[str, str]]:
    """(name, body) of every generated part of a page."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def refresh(text: str, where: str = "page") -> str:
    """The page with every generated part rewritten from its source."""

    def body(m: re.Match) -> str:
        name = m.group(1)
        if name not in BLOCKS:
            raise KeyError(f"{where}: unknown generated part {name!r} (known: {sorted(BLOCKS)})")
        return f"<!-- generated: {name} -->\n{BLOCKS[name]().rstrip()}\n<!-- end: {name} -->"

    return _BLOCK.sub(body, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docs.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; fail on a difference")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        old = page.read_text()
        new = refresh(old, str(page.relative_to(REPO)))
        if new != old:
            stale.append(str(page.relative_to(REPO)))
            if not args.check:
                page.write_text(new)
    verb = "out of date (run make docs)" if args.check else "rewritten"
    for name in stale:
        print(f"{name}: {verb}", file=sys.stderr if args.check else sys.stdout)
    return 1 if stale and args.check else 0
