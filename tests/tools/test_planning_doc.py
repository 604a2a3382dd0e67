"""docs/planning.md is what the planner and the benchmark records give now."""

from __future__ import annotations

from mpt_train.tools.planning_doc import PAGE, PUBLISHED, generated_part, render


def test_planning_page_equals_the_generators_output() -> None:
    text = render()
    part = generated_part(PAGE.read_text(encoding="utf-8"))
    assert part == text, "run python scripts/planning_doc.py"
    # Every published llm-foundry row is on the page with its difference.
    for p in PUBLISHED:
        assert f"| {p.model} | {p.gpus} x {p.gpu} |" in text and f"{p.mfu:.2f}%" in text
