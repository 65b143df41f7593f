"""Held-out classes (`holdout_classes`): checked config values, no sentence naming them in the text bank (class
sentences, prompts, attribute prompts, captions), and a tiny training run that never sees one of their images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import CellRecord, load_dataset
from hemaclip.errors import HemaclipError
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.text.prompts import DATASET_CLASSES, load_prompts, naming_pattern
from hemaclip.train import trainer
from hemaclip.train.config import load_train_config
from hemaclip.train.texts import build_text_bank

BASOPHIL = re.compile(r"\bbasophils?\b|basophilic (granulocyte|leukocyte)", re.IGNORECASE)


def test_holdout_classes_values_are_checked() -> None:
    config = load_train_config("tiny", {"holdout_classes": ["basophil"]})
    assert config.holdout_classes == ["basophil"] and config.to_dict()["holdout_classes"] == ["basophil"]
    assert load_train_config("tiny").holdout_classes == []
    classes = DATASET_CLASSES["pbc"]
    assert config.seen_classes(classes) == [c for c in classes if c != "basophil"]
    # a string or a non-string item fails the type check of every field; an empty name fails the holdout check
    for bad, needle in (("basophil", "holdout_classes must be a list"), ([""], "list of class names"), ([3], "holdout_classes must be a list"),
                        (["basophil", "basophil"], "twice")):
        with pytest.raises(HemaclipError, match=needle):
            load_train_config("tiny", {"holdout_classes": bad})
    with pytest.raises(HemaclipError, match="basophill not a class of dataset 'pbc'"):
        load_train_config("tiny", {"holdout_classes": ["basophill"]}).seen_classes(classes)
    with pytest.raises(HemaclipError, match="at least two classes"):
        load_train_config("tiny", {"holdout_classes": list(classes[1:])}).seen_classes(classes)


def test_naming_pattern_finds_names_not_adjectives() -> None:
    pattern = naming_pattern(load_prompts().class_names(["basophil"]))
    assert pattern.search("Basophils are rare.") and pattern.search("a basophilic granulocyte.")
    assert not pattern.search("a promyelocyte with basophilic cytoplasm") and not pattern.search("a basophile")
    assert naming_pattern([]) is None
    band = naming_pattern(load_prompts().class_names(["band_neutrophil"]))
    assert band.search("a band neutrophil.") and not band.search("a neutrophil with a band-shaped nucleus")


def synthetic_records(classes: tuple[str, ...]) -> list[CellRecord]:
    """Two records per class, each with a different full set of attribute values (captions for every value)."""
    records = []
    for i, label in enumerate(classes * 2):
        attributes = {name: values[i % len(values)] for name, values in ATTRIBUTES.items()}
        records.append(CellRecord(path=Path(f"/nowhere/{label}_{i}.jpg"), label=label, split="train", attributes=attributes))
    return records


def test_text_bank_has_no_sentence_naming_a_held_out_class() -> None:
    prompts = load_prompts()
    classes = DATASET_CLASSES["pbc"]
    seen = [c for c in classes if c != "basophil"]
    records = [r for r in synthetic_records(classes) if r.label != "basophil"]
    full = build_text_bank(records, classes, prompts, "pbc", 8, 0)
    held = build_text_bank(records, seen, prompts, "pbc", 8, 0, holdout=["basophil"])
    assert any(BASOPHIL.search(t) for t in full.texts)  # the check can fail: without the hold-out they are there
    assert not [t for t in held.texts if BASOPHIL.search(t)]
    assert not set(prompts.class_sentences("pbc")["basophil"]) & set(held.texts)
    assert not set(prompts.class_prompts("pbc")["basophil"]) & set(held.texts)
    # Everything else stays: the banks differ only by the basophil's own class texts and sentences naming one.
    own = {*prompts.class_sentences("pbc")["basophil"], *prompts.class_prompts("pbc")["basophil"]}
    assert set(full.texts) - set(held.texts) == own | {t for t in full.texts if BASOPHIL.search(t)}
    assert any("basophilic" in t for t in prompts.class_sentences("pbc11")["promyelocyte"])
    every = [c for c in seen if c in prompts.class_sentences("pbc")]
    for name in every:
        assert prompts.class_sentences("pbc")[name][0] in held.texts, name
    for candidates in held.candidates:
        assert all(candidates[k] for k in candidates), candidates.keys()  # every record keeps sentences of every kind
    assert build_text_bank(records, classes, prompts, "pbc", 8, 0, holdout=[]).texts == full.texts


def test_training_never_sees_a_held_out_class(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny run with basophil held out: no basophil image decoded for training or validation, no sentence naming
    one in the bank, no class-head output for it; the same subset without the hold-out does hold basophils."""
    seen_paths: list[str] = []
    banks = []
    real_decode, real_bank = trainer.decoded_images, trainer.build_text_bank

    def decode(paths, *args, **kwargs):
        seen_paths.extend(str(p) for p in paths)
        return real_decode(paths, *args, **kwargs)

    def bank(*args, **kwargs):
        banks.append(real_bank(*args, **kwargs))
        return banks[-1]

    monkeypatch.setattr(trainer, "decoded_images", decode)
    monkeypatch.setattr(trainer, "build_text_bank", bank)
    config = load_train_config("tiny", {"holdout_classes": ["basophil"], "epochs": 1, "max_train_images": 64, "max_val_images": 40})
    metrics = trainer.train(config, tmp_path / "run", data_root=data_root, progress=False)
    assert 0.0 <= metrics["val_zs_class_macro_f1"] <= 1.0

    pbc, wbcatt = load_dataset("pbc", data_root=data_root), load_dataset("wbcatt", data_root=data_root)
    basophil_paths = {str(r.path) for d in (pbc, wbcatt) for s in ("train", "val", "test") for r in d.split(s) if r.label == "basophil"}
    assert len(seen_paths) == 64 + 40 and not set(seen_paths) & basophil_paths
    without = trainer.stratified_subset(pbc.split("train"), 64, config.seed)
    assert any(r.label == "basophil" for r in without)  # the same subset would have held basophils
    assert not [t for t in banks[0].texts if BASOPHIL.search(t)]
    model, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    assert "basophil" not in model.class_names and len(model.class_names) == len(pbc.classes) - 1
    assert model.class_head.out_features == len(pbc.classes) - 1
