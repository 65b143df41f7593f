"""Attribute captions: every caption of every WBCAtt row must state all 11 annotated values exactly."""

from __future__ import annotations

import csv
import itertools
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.errors import DataError
from hemaclip.text.captions import CAPTION_TEMPLATES, caption_records, caption_variants, parse_caption

CAPTIONS_PER_ROW = 8
RANDOM_COMBINATIONS = 3000
GRANULE_AND_VACUOLE = ("granule_type", "granule_colour", "granularity", "cytoplasm_vacuole")
GRANULES = ("granule_type", "granule_colour", "granularity")


def data_root() -> Path:
    if os.environ.get("HEMACLIP_DATA"):
        return Path(os.environ["HEMACLIP_DATA"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def wbcatt_rows(split: str) -> list[dict[str, str]]:
    path = data_root() / "wbcatt" / f"pbc_attr_v1_{split}.csv"
    if not path.is_file():
        pytest.skip(f"WBCAtt CSV not found at {path}: set HEMACLIP_DATA or place the data at ../shared/data")
    with path.open(newline="", encoding="utf-8") as handle:
        return [{name: row[name].strip() for name in ATTRIBUTE_NAMES} for row in csv.DictReader(handle)]


def mismatch(caption: str, attributes: dict[str, str]) -> str:
    got = parse_caption(caption)
    wrong = {k: (v, got.get(k)) for k, v in attributes.items() if got.get(k) != v}
    return f"{caption!r}: (expected, parsed) {wrong}"


@pytest.mark.slow
def test_round_trip_every_train_row(record_property: pytest.RecordProperty) -> None:
    rows = wbcatt_rows("train")
    values_total = values_recovered = captions = 0
    failures: list[str] = []
    distinct_texts: list[int] = []
    distinct_templates: list[int] = []
    template_use: Counter[str] = Counter()
    for row in rows:
        records = caption_records(row, n=CAPTIONS_PER_ROW, seed=0)
        distinct_texts.append(len({r.text for r in records}))
        distinct_templates.append(len({r.template for r in records}))
        template_use.update(r.template for r in records)
        for record in records:
            captions += 1
            parsed = parse_caption(record.text)
            values_total += len(row)
            values_recovered += sum(parsed.get(k) == v for k, v in row.items())
            if parsed != row and len(failures) < 5:
                failures.append(mismatch(record.text, row))

    recovered = 100.0 * values_recovered / values_total
    mean_texts = sum(distinct_texts) / len(rows)
    mean_templates = sum(distinct_templates) / len(rows)
    report = (
        f"rows={len(rows)} captions={captions} values recovered={recovered:.3f}% "
        f"mean distinct phrasings/row={mean_texts:.2f} mean distinct structures/row={mean_templates:.2f} "
        f"structures used={len(template_use)}/{len(CAPTION_TEMPLATES)}"
    )
    print(report)
    record_property("round_trip", report)
    assert not failures, "\n".join(failures)
    assert recovered == 100.0, report
    assert mean_texts >= CAPTIONS_PER_ROW, report
    assert min(distinct_templates) == CAPTIONS_PER_ROW, report
    assert set(template_use) == set(CAPTION_TEMPLATES), report


@pytest.mark.parametrize("split", ["val", "test"])
def test_round_trip_other_splits(split: str) -> None:
    combos = {tuple(row.items()) for row in wbcatt_rows(split)}
    for combo in combos:
        attributes = dict(combo)
        for seed in (0, 1):
            for caption in caption_variants(attributes, n=CAPTIONS_PER_ROW, seed=seed):
                assert parse_caption(caption) == attributes, mismatch(caption, attributes)


@pytest.mark.slow
def test_round_trip_random_combinations() -> None:
    """All structures, on combinations the data may never show (e.g. granule_type=small, granularity=no)."""
    rng = random.Random(2024)
    for i in range(RANDOM_COMBINATIONS):
        attributes = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
        for caption in caption_variants(attributes, n=len(CAPTION_TEMPLATES), seed=i):
            assert parse_caption(caption) == attributes, mismatch(caption, attributes)


def test_every_granule_and_vacuole_combination() -> None:
    base = {name: values[0] for name, values in ATTRIBUTES.items()}
    for combo in itertools.product(*(ATTRIBUTES[name] for name in GRANULE_AND_VACUOLE)):
        attributes = {**base, **dict(zip(GRANULE_AND_VACUOLE, combo))}
        for seed in range(4):
            for caption in caption_variants(attributes, n=len(CAPTION_TEMPLATES), seed=seed):
                assert parse_caption(caption) == attributes, mismatch(caption, attributes)


EXAMPLE = {
    "cell_size": "big",
    "cell_shape": "irregular",
    "nucleus_shape": "unsegmented-band",
    "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely",
    "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue",
    "granule_type": "small",
    "granule_colour": "pink",
    "granularity": "yes",
}


def test_deterministic_given_seed_and_seed_changes_captions() -> None:
    assert caption_variants(EXAMPLE, seed=3) == caption_variants(EXAMPLE, seed=3)
    assert caption_variants(EXAMPLE, seed=3) != caption_variants(EXAMPLE, seed=4)
    assert caption_variants(EXAMPLE, n=3, seed=0) == caption_variants(EXAMPLE, n=8, seed=0)[:3]


def test_n_beyond_the_number_of_structures() -> None:
    n = len(CAPTION_TEMPLATES) + 6
    captions = caption_variants(EXAMPLE, n=n, seed=0)
    assert len(captions) == n
    assert len(set(captions)) == n
    assert all(parse_caption(c) == EXAMPLE for c in captions)
    assert caption_variants(EXAMPLE, n=0) == []


def test_captions_read_like_sentences() -> None:
    rng = random.Random(7)
    for i in range(300):
        attributes = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
        for caption in caption_variants(attributes, n=len(CAPTION_TEMPLATES), seed=i):
            assert caption[0].isupper() and caption.endswith("."), caption
            assert "  " not in caption and " ," not in caption and "{" not in caption, caption
            assert not re.search(r"\ba [aeiou]|\ban [b-df-hj-np-tv-z]", caption, re.IGNORECASE), caption
            assert "nil" not in caption and "unsegmented-" not in caption, caption


def test_vocabulary_variety() -> None:
    """The synonyms the captions are meant to use actually appear."""
    small_round = {**EXAMPLE, "cell_size": "small", "cell_shape": "round"}
    texts = " ".join(
        caption
        for nucleus in ("segmented-multilobed", "segmented-bilobed")
        for granules in (("nil", "nil", "no"), ("small", "pink", "yes"))
        for seed in range(6)
        for caption in caption_variants(
            {**small_round, "nucleus_shape": nucleus, **dict(zip(GRANULES, granules))},
            n=len(CAPTION_TEMPLATES),
            seed=seed,
        )
    ).lower()
    for phrase in (
        "multilobed",
        "segmented into several lobes",
        "three or more lobes",
        "bilobed",
        "two-lobed",
        "no visible granules",
        "agranular",
        "neither granules nor vacuoles",
        "a small, round",
        "n:c ratio",
        "relatively abundant",
    ):
        assert phrase in texts, phrase
    eosinophil = caption_variants({**EXAMPLE, "granule_type": "round", "granule_colour": "red"}, n=12)
    assert any("round" in c and "red granules" in c for c in eosinophil)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Small round leukocyte. The nucleus is round and unsegmented, the chromatin is condensed "
            "and the N:C ratio is high. "
            "Scant pale blue cytoplasm, clear in texture, without granules or vacuoles.",
            {
                "cell_size": "small",
                "cell_shape": "round",
                "nucleus_shape": "unsegmented-round",
                "nuclear_cytoplasmic_ratio": "high",
                "chromatin_density": "densely",
                "cytoplasm_vacuole": "no",
                "cytoplasm_texture": "clear",
                "cytoplasm_colour": "light blue",
                "granule_type": "nil",
                "granule_colour": "nil",
                "granularity": "no",
            },
        ),
        (
            "A big irregular white blood cell: its kidney-shaped nucleus has loose chromatin, its cytoplasm, which is "
            "purplish blue and frosted, is vacuolated, and the granules are coarse and purple. "
            "The nuclear-cytoplasmic ratio is low.",
            {
                "cell_size": "big",
                "cell_shape": "irregular",
                "nucleus_shape": "unsegmented-indented",
                "nuclear_cytoplasmic_ratio": "low",
                "chromatin_density": "loosely",
                "cytoplasm_vacuole": "yes",
                "cytoplasm_texture": "frosted",
                "cytoplasm_colour": "purple blue",
                "granule_type": "coarse",
                "granule_colour": "purple",
                "granularity": "yes",
            },
        ),
        ("a cell with pink granules", {"granule_colour": "pink", "granularity": "yes"}),
        ("a nucleus with two lobes", {"nucleus_shape": "segmented-bilobed"}),
        ("a round, irregular nucleus", {}),  # contradictory: not stated
        (
            "no vacuoles and small pink granules",
            {"cytoplasm_vacuole": "no", "granule_type": "small", "granule_colour": "pink", "granularity": "yes"},
        ),
        ("", {}),
    ],
)
def test_parse_paraphrases_independent_of_templates(text: str, expected: dict[str, str]) -> None:
    assert parse_caption(text) == expected


def test_unknown_attribute_value_is_a_data_error() -> None:
    with pytest.raises(DataError, match="cell_size"):
        caption_variants({**EXAMPLE, "cell_size": "huge"})
    with pytest.raises(DataError, match="granularity"):
        caption_variants({k: v for k, v in EXAMPLE.items() if k != "granularity"})
