"""Paraphrase hook: unfaithful paraphrases are rejected, failing commands are clear errors."""

from __future__ import annotations

import sys

import pytest

from hemaclip.text.captions import caption_variants
from hemaclip.text.verbalizer import (
    CallableVerbalizer,
    CommandVerbalizer,
    Verbalizer,
    VerbalizerError,
    checked_paraphrases,
)

NEUTROPHIL = {
    "cell_size": "big",
    "cell_shape": "round",
    "nucleus_shape": "segmented-multilobed",
    "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely",
    "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue",
    "granule_type": "small",
    "granule_colour": "pink",
    "granularity": "yes",
}


def test_unfaithful_paraphrase_is_rejected() -> None:
    caption = caption_variants(NEUTROPHIL, n=1)[0]
    assert "pink" in caption
    others = caption_variants(NEUTROPHIL, n=4, seed=1)
    verbalizer = CallableVerbalizer(lambda text: [text.replace("pink", "red"), *others, text, ""])
    assert isinstance(verbalizer, Verbalizer)
    result = checked_paraphrases(verbalizer, caption, NEUTROPHIL)
    assert list(result) == [o for o in others if o != caption]
    assert result.n_rejected == 1 and "red" in result.rejected[0]


def test_paraphrase_that_drops_a_fact_is_rejected() -> None:
    caption = caption_variants(NEUTROPHIL, n=1)[0]
    dropped = "A large, round white blood cell with a multilobed nucleus and pink granules."
    result = checked_paraphrases(CallableVerbalizer(lambda _: dropped), caption, NEUTROPHIL)
    assert result == [] and result.rejected == [dropped]


def test_command_verbalizer_reads_one_paraphrase_per_line() -> None:
    script = "import sys; t = sys.stdin.read().strip(); print(t.upper()); print(t.replace('pink', 'red'))"
    caption = caption_variants(NEUTROPHIL, n=1)[0]
    result = checked_paraphrases(CommandVerbalizer([sys.executable, "-c", script]), caption, NEUTROPHIL)
    assert result == [caption.upper()] and result.n_rejected == 1


def test_command_verbalizer_shell_string() -> None:
    assert CommandVerbalizer("tr a-z A-Z").paraphrase("a cell") == ["A CELL"]


def test_command_verbalizer_failures_are_clear() -> None:
    with pytest.raises(VerbalizerError, match="timed out"):
        CommandVerbalizer([sys.executable, "-c", "import time; time.sleep(10)"], timeout=0.5).paraphrase("x")
    with pytest.raises(VerbalizerError, match="status 3 .*boom"):
        failing = "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"
        CommandVerbalizer([sys.executable, "-c", failing]).paraphrase("x")
    with pytest.raises(VerbalizerError, match="could not start"):
        CommandVerbalizer(["/nonexistent/paraphraser"]).paraphrase("x")
