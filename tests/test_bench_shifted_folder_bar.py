"""bench/shifted_folder_bar.py's rule: a quantile that leaves no cell unflagged cannot be judged, so it never meets
the target by default (the leave-one-lab-out check was vacuous before)."""

from __future__ import annotations

from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.fixture(scope="module")
def bar():
    from bench import shifted_folder_bar  # imports torch (through its helpers): only when a test needs it

    return shifted_folder_bar


def _row(bar, counts: dict[float, tuple[int, int]]) -> dict:
    return {"by_quantile": {str(q): {"unflagged": counts.get(q, (0, 0))[0], "right": counts.get(q, (0, 0))[1]}
                            for q in bar.QUANTILES}}


def test_zero_unflagged_cells_is_not_meeting_the_target(bar) -> None:
    strict, loose = bar.QUANTILES[2], bar.QUANTILES[0]
    # Only the loosest bar leaves cells unflagged, and they are read wrong: nothing can be chosen.
    assert bar.choose([_row(bar, {loose: (10, 3)})]) is None
    # A stricter bar with cells that are right is chosen; an empty one in between is skipped, not taken.
    rows = [_row(bar, {loose: (10, 3), strict: (4, 4)})]
    assert bar.choose(rows) == strict
    assert bar.choose([_row(bar, {})]) is None


def test_the_committed_choice_says_how_many_val_cells_it_rests_on(bar) -> None:
    import json

    saved = json.loads((RESULTS / "shifted_folder_bar.json").read_text())
    val_rows = [row for key, row in saved["table"].items() if key.endswith("/val")]
    assert saved["chosen_quantile"] == bar.choose(val_rows)
    assert saved["val_cells_unflagged_at_chosen"] == bar._pooled(val_rows, saved["chosen_quantile"])[0] >= 1
