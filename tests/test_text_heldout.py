"""The prompt file's held-out wording never reaches training: no held-out prompt is a training sentence, no held-out
frame occurs in any training sentence, and no held-out word shares a word-piece stem with a training word as the
shipped model's tokenizer splits them (`hemaclip.text.wordpieces.stem_clash`; training text = the sentence bank the
default recipe builds for WBCAtt train, every dataset's training prompts and sentences, and the caption lexicon)."""

from __future__ import annotations

import dataclasses

import pytest

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import load_dataset
from hemaclip.models.config import get_model_config
from hemaclip.models.text import resolve_text_source
from hemaclip.text import captions
from hemaclip.text.prompts import DATASET_CLASSES, PLACEHOLDER, PromptSet, load_prompts, words_of
from hemaclip.train.config import load_train_config
from hemaclip.text.wordpieces import Tokenize, piece_words, stem_clash, stem_clashes
from hemaclip.train.texts import build_text_bank

# The generator's tables (what captions are made of); the parser's extra words are not training text.
LEXICON = ("CELL_NOUNS", "CELL_SIZE_WORDS", "CELL_SHAPE_WORDS", "OUTLINE_SHAPE_WORDS", "NUCLEUS_PRE", "NUCLEUS_PRED",
           "NUCLEUS_POST", "CHROMATIN_WORDS", "RATIO_NOUNS", "RATIO_WORDS", "CYTOPLASM_AMOUNT", "CYTOPLASM_COLOUR_WORDS",
           "TEXTURE_WORDS", "VACUOLE_ADJ", "VACUOLE_OBJECT", "GRANULE_TYPE_WORDS", "GRANULE_COLOUR_WORDS", "GRANULE_NIL_TYPE",
           "GRANULE_NIL_COLOUR", "GRANULE_NIL_BOTH", "GRANULES_NONE", "GRANULES_NONE_PREDICATE", "GRANULES_SPARSE",
           "NOTHING_IN_CYTOPLASM", "CONTENT_VERBS", "CONTENT_PARTICIPLES")
HELD_OUT_DATASETS = ("wbcatt", "pbc", "pbc11")


def lexicon_texts() -> list[str]:
    texts: list[str] = []
    for name in LEXICON:
        table = getattr(captions, name)
        for item in table.values() if isinstance(table, dict) else [table]:
            texts += [item] if isinstance(item, str) else list(item)
    return texts


@pytest.fixture(scope="module")
def tokenize() -> Tokenize:
    """The word-piece tokenizer of the text tower the shipped recipe trains (all-MiniLM-L6-v2)."""
    from transformers import AutoTokenizer

    tower = get_model_config(load_train_config("default").model).text_tower
    return AutoTokenizer.from_pretrained(resolve_text_source(tower), local_files_only=True).tokenize


@pytest.fixture(scope="module")
def prompts() -> PromptSet:
    return load_prompts()


@pytest.fixture(scope="module")
def training_bank(data_root, prompts: PromptSet) -> list[str]:
    """Every sentence the shipped recipe (`train --config default`) may pair with an image (class texts, attribute
    prompts, all `captions_per_image` captions of every training image), plus the captions of every WBCAtt train row."""
    config = load_train_config("default")
    texts: list[str] = []
    for name in (config.dataset, "wbcatt"):
        dataset = load_dataset(name, data_root=data_root, seed=config.seed)
        records = dataset.split("train")
        bank = build_text_bank(records, dataset.classes, prompts, name, config.captions_per_image, config.seed)
        assert sum(1 for c in bank.candidates if "caption" in c) >= 6100  # WBCAtt train (less PBC's duplicates) is in
        texts += bank.texts
    return texts


def heldout_prompts(prompts: PromptSet) -> list[str]:
    texts = [t for d in HELD_OUT_DATASETS for ts in prompts.class_prompts(d, "heldout").values() for t in ts]
    return texts + [t for values in prompts.attribute_prompts("heldout").values() for ts in values.values() for t in ts]


def test_heldout_wording_covers_classes_and_every_attribute_value(prompts: PromptSet) -> None:
    for dataset in HELD_OUT_DATASETS:
        assert prompts.has_wording("heldout", dataset)
        held, trained = prompts.class_prompts(dataset, "heldout"), prompts.class_prompts(dataset)
        assert list(held) == list(DATASET_CLASSES[dataset])
        for cls, texts in held.items():
            assert len(texts) >= 12 and not set(texts) & set(trained[cls]), cls
    assert not prompts.has_wording("heldout", "all")  # the ALL subtypes have no other names; said in the file
    table = prompts.attribute_prompts("heldout")
    assert list(table) == list(ATTRIBUTES)
    for name, values in ATTRIBUTES.items():
        assert tuple(table[name]) == values
        for value in values:
            assert len(table[name][value]) >= 12, (name, value)  # 3 phrases x 4 frames
            assert all(PLACEHOLDER not in t for t in table[name][value])


def test_no_heldout_prompt_is_a_training_sentence(prompts: PromptSet, training_bank: list[str]) -> None:
    held = heldout_prompts(prompts)
    assert len(held) > 800
    training = set(training_bank) | set(prompts.training_texts())
    assert not set(held) & training


def training_texts(prompts: PromptSet, training_bank: list[str]) -> list[str]:
    return [*training_bank, *prompts.training_texts(), *lexicon_texts()]


def test_stem_rule_catches_spelling_variants_and_derivatives(tokenize: Tokenize) -> None:
    """The rule at the tokenizer level: each kind of relative is caught, unrelated words sharing an ending are not."""
    word = lambda w: piece_words(w, tokenize)[0]  # noqa: E731
    assert word("basophile") == ("bas", "op", "hil", "e")  # the training name plus one piece
    assert stem_clash(word("basophile"), word("basophil")) == "suffix"
    assert stem_clash(word("baso"), word("basophil")) == "suffix"
    assert stem_clash(word("eosinophile"), word("eosinophil")) == "suffix"
    assert stem_clash(word("monocytoid"), word("mononuclear")) == "stem"
    assert stem_clash(word("mono"), word("monocyte")) == "stem"
    assert stem_clash(word("leucocyte"), word("leukocyte")) == "variant"
    assert stem_clash(word("acidophil"), word("basophil")) is None  # a shared ending is not a stem
    assert stem_clash(word("cleft"), word("clotting")) is None
    assert piece_words("mast-cell-like", tokenize) == [("mast",), ("cell",), ("like",)]


def test_stem_check_would_catch_basophile(prompts: PromptSet, tokenize: Tokenize) -> None:
    """Put the old spelling variant back among the held-out synonyms: the check this file runs reports it."""
    held = prompts.heldout
    planted = dataclasses.replace(held, synonyms={**held.synonyms, "basophil": ("basophile", *held.synonyms["basophil"])})
    found = stem_clashes(planted.texts(), prompts.training_texts(), tokenize, planted.shared_words)
    assert ("basophil", "suffix") in found["basophile"]
    assert "basophile" not in stem_clashes(held.texts(), prompts.training_texts(), tokenize, held.shared_words)


def test_no_heldout_word_shares_a_word_piece_stem_with_training_text(prompts: PromptSet, training_bank: list[str],
                                                                     tokenize: Tokenize) -> None:
    held_words = {"".join(w) for t in prompts.heldout.texts() for w in piece_words(t, tokenize)}
    assert {"sizeable", "immunocyte", "acidophil", "foamy", "pmn"} <= held_words  # the check sees real words
    training = training_texts(prompts, training_bank)
    training_words = {"".join(w) for t in training for w in piece_words(t, tokenize)}
    assert {"large", "neutrophil", "basophil", "leukocyte", "vacuoles"} <= training_words
    assert stem_clashes(prompts.heldout.texts(), training, tokenize, prompts.heldout.shared_words) == {}


def test_no_heldout_frame_occurs_in_any_training_sentence(prompts: PromptSet, training_bank: list[str]) -> None:
    assert not prompts.heldout_words() & prompts.heldout.shared_words
    training_text = "\n".join(t.lower() for t in [*training_bank, *prompts.training_texts()])
    frames = [*prompts.heldout.attribute_frames, *(f for fs in prompts.heldout.templates.values() for f in fs)]
    for frame in frames:
        for piece in frame.lower().split(PLACEHOLDER):
            piece = piece.strip(" .,:;")
            if len(words_of(piece)) >= 2:
                assert piece not in training_text, frame


def test_training_reads_only_the_training_wording(data_root, prompts: PromptSet) -> None:
    """Replace every held-out text: the training sentence bank does not change by one sentence."""
    held = prompts.heldout
    swapped = dataclasses.replace(held, synonyms={c: ("zzz",) for c in held.synonyms},
                                  attribute_frames=("zzz {}",), attributes={a: {v: ("zzz",) for v in vs} for a, vs in held.attributes.items()})
    other = dataclasses.replace(prompts, heldout=swapped)
    dataset = load_dataset("pbc", data_root=data_root)
    records = dataset.split("train")[:300]
    first = build_text_bank(records, dataset.classes, prompts, "pbc", 2, 0)
    second = build_text_bank(records, dataset.classes, other, "pbc", 2, 0)
    assert first.texts == second.texts and first.candidates == second.candidates
    none = build_text_bank(records, dataset.classes, dataclasses.replace(prompts, heldout=None), "pbc", 2, 0)
    assert none.texts == first.texts
