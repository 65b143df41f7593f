"""The anchors table of docs/evaluation-protocol.md is the list the reports use: every anchor, with its source, in both."""

from __future__ import annotations

from pathlib import Path

from hemaclip_research.anchors import ANCHORS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "evaluation-protocol.md"


def test_the_documented_anchor_table_is_the_reports_list() -> None:
    text = PAGE.read_text(encoding="utf-8")
    for anchor in ANCHORS:
        row = f"| {anchor.system} | {anchor.value:.4g} | {anchor.metric} | {anchor.split} | {anchor.source}, {anchor.table} |"
        assert row in text, row
    for figure in ("0.98 /", "0.70 |", "0.913;"):  # the old unsourced anchor figures are gone
        assert figure not in text, figure
