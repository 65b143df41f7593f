"""Prompt file: loads, covers every class of every dataset, and rejects broken files with one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.errors import DataError
from hemaclip.text.captions import parse_caption
from hemaclip.text.prompts import DATASET_CLASSES, PromptSet, build_prompts, fill_template, load_prompts

MIN_TEMPLATES = 6
MIN_ATTRIBUTE_PROMPTS = 3


@pytest.fixture(scope="module")
def prompts() -> PromptSet:
    return load_prompts()


@pytest.fixture(scope="module")
def packaged_doc(prompts: PromptSet) -> dict:
    return yaml.safe_load(Path(prompts.source).read_text(encoding="utf-8"))


def test_packaged_file_covers_every_dataset_and_class(prompts: PromptSet) -> None:
    assert set(prompts.datasets) == set(DATASET_CLASSES)
    for dataset, vocabulary in DATASET_CLASSES.items():
        assert prompts.classes(dataset) == vocabulary
        assert len(prompts.templates(dataset)) >= MIN_TEMPLATES
        class_prompts = prompts.class_prompts(dataset)
        sentences = prompts.class_sentences(dataset)
        assert list(class_prompts) == list(vocabulary) == list(sentences)
        for cls in vocabulary:
            synonyms = prompts.synonyms(dataset)[cls]
            assert len(class_prompts[cls]) >= MIN_TEMPLATES * len(synonyms) * 0.9  # dedup may merge a few
            assert len(sentences[cls]) >= 2
            for prompt in class_prompts[cls]:
                assert "{}" not in prompt and any(s in prompt for s in synonyms), prompt
                assert not re.search(r"\ba [aeiou]", prompt, re.IGNORECASE), prompt


def test_prompts_are_distinct_between_classes(prompts: PromptSet) -> None:
    for dataset in DATASET_CLASSES:
        seen: dict[str, str] = {}
        for cls, texts in prompts.class_sentences(dataset).items():
            for text in texts:
                assert seen.setdefault(text, cls) == cls, f"{dataset}: {text!r} used for two classes"


def test_key_descriptions_present(prompts: PromptSet) -> None:
    pbc = prompts.class_sentences("pbc")
    assert any("bilobed" in s and "orange-red granules" in s for s in pbc["eosinophil"])
    assert any("anucleate" in s for s in pbc["platelet"])
    assert any("nucleated red blood cell" in s for s in pbc["erythroblast"])
    assert any("promyelocytes, myelocytes, metamyelocytes" in s for s in pbc["ig"])
    all_sentences = prompts.class_sentences("all")
    assert any("hematogones" in s for s in all_sentences["benign"])
    assert any("fast-growing immature lymphocyte cells in the blood" in s for s in all_sentences["early"])
    eosinophil = prompts.class_prompts("pbc")["eosinophil"]
    assert "an eosinophil in a blood film stained with May-Grünwald-Giemsa." in eosinophil


def test_attribute_prompts_cover_every_value_and_say_it(prompts: PromptSet) -> None:
    table = prompts.attribute_prompts()
    assert list(table) == list(ATTRIBUTES)
    for name, values in ATTRIBUTES.items():
        assert tuple(table[name]) == values
        for value in values:
            assert len(table[name][value]) >= MIN_ATTRIBUTE_PROMPTS
            for prompt in table[name][value]:
                assert parse_caption(prompt).get(name) == value, (name, value, prompt)


def test_wordings_train_by_default_and_heldout_on_request(prompts: PromptSet) -> None:
    trained, held = prompts.class_prompts("wbcatt"), prompts.class_prompts("wbcatt", "heldout")
    assert trained == prompts.class_prompts("wbcatt", "train") and "an image of a basophil." in trained["basophil"]
    assert "oil-immersion view of one mast-cell-like cell." in held["basophil"]
    assert "here we have a sizeable cell at 1000x magnification." in prompts.attribute_prompts("heldout")["cell_size"]["big"]
    with pytest.raises(DataError, match="no heldout wording for dataset 'all'"):
        prompts.class_prompts("all", "heldout")
    with pytest.raises(DataError, match="unknown wording 'test'"):
        prompts.attribute_prompts("test")


def test_build_prompts_accepts_strings_and_callables() -> None:
    built = build_prompts(["band_neutrophil", "eosinophil"], ["a photo of a {}.", lambda c: f"{c}, stained."])
    assert built == {
        "band_neutrophil": ["a photo of a band neutrophil.", "band neutrophil, stained."],
        "eosinophil": ["a photo of an eosinophil.", "eosinophil, stained."],
    }
    assert fill_template("A {} cell", "immature") == "An immature cell"
    assert build_prompts({"x": ["lymphocyte", "lymphocyte"]}, ["a {}."]) == {"x": ["a lymphocyte."]}


def test_json_prompt_file_loads(tmp_path: Path, packaged_doc: dict) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(packaged_doc), encoding="utf-8")
    loaded = load_prompts(path)
    assert loaded.class_prompts("pbc11") == load_prompts().class_prompts("pbc11")


def test_subset_of_datasets_and_unquoted_yes_no(tmp_path: Path, packaged_doc: dict) -> None:
    doc = {**packaged_doc, "datasets": {"wbcatt": packaged_doc["datasets"]["wbcatt"]}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc).replace("'yes':", "yes:").replace("'no':", "no:"), encoding="utf-8")
    loaded = load_prompts(path)
    assert loaded.datasets == ("wbcatt",)
    assert set(loaded.attribute_prompts()["granularity"]) == {"yes", "no"}
    with pytest.raises(DataError, match=r"no prompts for dataset 'pbc'"):
        loaded.class_prompts("pbc")


def _broken(doc: dict, case: str) -> dict:
    doc = json.loads(json.dumps(doc))  # deep copy without anchors
    if case == "unknown dataset":
        doc["datasets"]["pbc12"] = doc["datasets"]["pbc"]
    elif case == "missing class":
        del doc["datasets"]["pbc"]["classes"]["platelet"]
    elif case == "class not in vocabulary":
        doc["datasets"]["wbcatt"]["classes"]["erythroblast"] = doc["datasets"]["pbc"]["classes"]["erythroblast"]
    elif case == "template without placeholder":
        doc["templates"]["cell"].append("a photo of a cell.")
    elif case == "unknown template set":
        doc["datasets"]["all"]["templates"] = "smears"
    elif case == "empty synonyms":
        doc["datasets"]["pbc"]["classes"]["ig"]["synonyms"] = []
    elif case == "missing attribute value":
        del doc["attributes"]["cytoplasm_colour"]["purple blue"]
    elif case == "unknown attribute value":
        doc["attributes"]["granule_colour"]["green"] = ["a cell with green granules."]
    elif case == "typo in key":
        doc["datasets"]["pbc"]["classes"]["ig"]["sentence"] = doc["datasets"]["pbc"]["classes"]["ig"].pop("sentences")
    elif case == "held-out class unknown":
        doc["heldout"]["classes"]["blast"] = ["myeloblast"]
    elif case == "held-out frame without placeholder":
        doc["heldout"]["attribute_frames"].append("a leucocyte.")
    elif case == "held-out template set unknown":
        doc["heldout"]["templates"]["cells"] = doc["heldout"]["templates"].pop("cell")
    elif case == "held-out value missing":
        del doc["heldout"]["attributes"]["granularity"]["no"]
    return doc


BROKEN = {
    "unknown dataset": "pbc12",
    "missing class": "platelet",
    "class not in vocabulary": "erythroblast",
    "template without placeholder": "exactly one",
    "unknown template set": "smears",
    "empty synonyms": "synonyms",
    "missing attribute value": "purple blue",
    "unknown attribute value": "green",
    "typo in key": "sentence",
    "held-out class unknown": "blast",
    "held-out frame without placeholder": "heldout.attribute_frames",
    "held-out template set unknown": "cells",
    "held-out value missing": "heldout.attributes.granularity",
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_prompt_file_is_a_one_line_data_error(tmp_path: Path, packaged_doc: dict, case: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(_broken(packaged_doc, case), allow_unicode=True), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    assert BROKEN[case] in message, message


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("bad.yaml", "datasets: [unclosed\n", "not valid YAML"),
        ("bad.json", "{", "not valid JSON"),
        ("list.yaml", "- a\n- b\n", "must be a mapping"),
        ("empty.yaml", "", "must be a mapping"),
    ],
)
def test_unreadable_prompt_file(tmp_path: Path, name: str, content: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "nope.yaml")
