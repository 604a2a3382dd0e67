"""The manual cannot drift: generated parts equal their sources, links resolve, the front page
stays a front page, and no measured figure sits outside a part written from a record."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpt_train.tools.docs import BLOCKS, blocks_in, pages, refresh
from tests.helpers import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
TOPICS = ("specs", "training", "data", "models", "performance", "checkpoints", "reliability",
          "after-training", "planning", "development")  # fmt: skip


@pytest.mark.parametrize("page", pages(REPO), ids=lambda p: p.name)
def test_generated_parts_equal_their_sources(page: Path) -> None:
    text = page.read_text()
    assert text == refresh(text, page.name), f"{page.name} is out of date: run make docs"


def test_every_generated_part_is_shown_somewhere() -> None:
    shown = {name for page in pages(REPO) for name, _ in blocks_in(page.read_text())}
    assert shown == set(BLOCKS)
    assert "spec-reference" in dict(blocks_in((DOCS / "specs.md").read_text()))
    assert "h100-headline" in dict(blocks_in(README.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", pages(REPO), ids=lambda p: p.name)
def test_links_between_pages_resolve(page: Path) -> None:
    for target, anchor in re.findall(
        r"\]\(((?:docs/)?[\w-]+\.md)(?:#([\w-]+))?\)", page.read_text()
    ):
        path = (page.parent / target).resolve()
        assert path.is_file(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(path), f"{page.name} links to {target}#{anchor}: no heading"


def test_readme_is_a_front_page_linking_every_topic() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 220
    first_screen = "\n".join(lines[:25])
    assert "make quickstart" in first_screen and "make test" in first_screen
    first_100 = "\n".join(lines[:100])
    assert "## Train on your own corpus" in first_100 and "composer -n 8 train.py" in first_100
    for topic in TOPICS:
        assert (DOCS / f"{topic}.md").is_file(), topic
        assert f"](docs/{topic}.md" in README.read_text(), f"README does not link {topic}.md"


# A measured figure: a percentage, milliseconds, tokens/s or GB next to a number.
_FIGURE = re.compile(r"(?<![-\w.])\d[\d,]*(\.\d+)?\s?(%|ms\b|k? ?tokens/s|GB\b)")
_NOT_MEASURED = (
    "mfu 41.2%",  # the console line's format, shown as an example
    "38.3%",  # the MFU MosaicML's published MPT-7B run implies: plan.py's default
    "80 GB",  # a card's memory
    "40 GB",
)


@pytest.mark.parametrize("page", pages(REPO), ids=lambda p: p.name)
def test_no_measured_figure_outside_the_parts_written_from_records(page: Path) -> None:
    text = re.sub(
        r"<!-- generated: ([\w-]+) -->.*?<!-- end: \1 -->", "", page.read_text(), flags=re.S
    )
    for phrase in _NOT_MEASURED:
        text = text.replace(phrase, "")
    found = [m.group(0) for m in _FIGURE.finditer(text)]
    assert not found, f"{page.name}: figures not from a record: {found}"
