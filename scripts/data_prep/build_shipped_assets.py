"""Regenerate the shipped corpus and tokenizer in ``mpt_train/assets/`` (offline, deterministic).

Tests and the quickstart need a tokenizer and some English text without any network access, so
the repository ships both, built from text that is already on every machine with Python: the
docstrings of the CPython standard library and the language-reference topics in
``pydoc_data/topics.py``, all under the PSF License (see ``mpt_train/assets/README.md``).

Sources are read with ``ast`` (never imported, so no module side effects), in sorted path order,
de-duplicated; the gzip stream has a zero mtime; the BPE trainer is fed in a fixed order. The
same CPython version therefore regenerates byte-identical files (the committed ones came from
the version recorded in ``mpt_train/assets/README.md``; other versions give different text).

Usage::

    python scripts/data_prep/build_shipped_assets.py [--out mpt_train/assets] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

__all__ = ["build_corpus", "build_tokenizer", "iter_stdlib_documents", "main"]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
CORPUS_FILE = "corpus/stdlib_docs.jsonl.gz"
TOKENIZER_DIR = "tiny-bpe"

# Directories whose docstrings are test scaffolding or near-duplicates, not prose.
_SKIP_DIRS = {
    "__pycache__",
    "site-packages",
    "test",
    "tests",
    "idle_test",
    "lib2to3",
    "turtledemo",
    "ensurepip",
}
_MIN_DOC_CHARS = 120


def _docstrings(path: Path, module: str) -> Iterator[tuple[str, str]]:
    """Yield (qualified name, cleaned docstring) of a module, its classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return

    def visit(node: ast.AST, qual: str) -> Iterator[tuple[str, str]]:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            yield qual, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, f"{qual}.{child.name}")

    yield from visit(tree, module)


def _pydoc_topics(stdlib: Path) -> Iterator[tuple[str, str]]:
    """The language-reference topics (English prose) that ``help('topic')`` shows."""
    path = stdlib / "pydoc_data" / "topics.py"
    if not path.exists():
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield f"pydoc_data.topics:{name}", topics[name].strip()


def iter_stdlib_documents(stdlib: Path | None = None) -> Iterator[dict[str, str]]:
    """Yield ``{"text", "source"}`` records from the standard library, deterministically."""
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()

    def keep(text: str) -> bool:
        if len(text) < _MIN_DOC_CHARS or text in seen:
            return False
        seen.add(text)
        return True

    for source, text in _pydoc_topics(stdlib):
        if keep(text):
            yield {"text": text, "source": source}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        rel = Path(dirpath).relative_to(stdlib)
        for name in sorted(filenames):
            if not name.endswith(".py") or rel.parts[:1] == ("pydoc_data",):
                continue
            parts = [*rel.parts, name[:-3]]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            module = ".".join(parts) or "__init__"
            for qual, text in _docstrings(Path(dirpath) / name, module):
                if keep(text):
                    yield {"text": text, "source": qual}


def build_corpus(out_file: Path) -> list[str]:
    """Write the corpus as gzip'd JSONL (mtime 0, so byte-identical on rebuild); return texts."""
    records = list(iter_stdlib_documents())
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(buf.getvalue())
    log.info(
        "corpus: %d documents, %d chars -> %s",
        len(records),
        sum(len(r["text"]) for r in records),
        out_file,
    )
    return [r["text"] for r in records]


def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> None:
    """Train a GPT-NeoX-like byte-level BPE (``<|endoftext|>`` = id 0 = BOS/EOS/UNK)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    log.info("tokenizer: vocab %d -> %s", len(fast), out_dir)


def main(argv: list[str] | None = None) -> int:
    """Build both assets into ``--out``."""
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=repo / "mpt_train" / "assets")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # deterministic merges order
    log.info("python %s, stdlib %s", sys.version.split()[0], sysconfig.get_paths()["stdlib"])
    texts = build_corpus(args.out / CORPUS_FILE)
    build_tokenizer(texts, args.out / TOKENIZER_DIR, args.vocab_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
