"""The describe sentence speaks the training captions' vocabulary and states exactly what it says it states."""

from __future__ import annotations

import pytest

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.errors import DataError
from hemaclip.text import captions
from hemaclip.text.sentences import NOTHING_STATED, attribute_sentence, sayable_statements

# attribute -> the caption table whose first word the sentence uses for it
TABLES = {
    "cell_size": captions.CELL_SIZE_WORDS, "cell_shape": captions.CELL_SHAPE_WORDS, "nucleus_shape": captions.NUCLEUS_PRE,
    "chromatin_density": captions.CHROMATIN_WORDS, "nuclear_cytoplasmic_ratio": captions.RATIO_WORDS,
    "cytoplasm_colour": captions.CYTOPLASM_COLOUR_WORDS, "cytoplasm_texture": captions.TEXTURE_WORDS,
    "cytoplasm_vacuole": captions.VACUOLE_OBJECT,
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_one_attribute_is_said_in_the_captions_first_word_and_read_back(name: str) -> None:
    for value in ATTRIBUTES[name]:
        sentence, stated = attribute_sentence({name: value})
        assert TABLES[name][value][0] in sentence.lower(), sentence
        assert stated == {name: value} == sayable_statements({name: value}), sentence


def test_granules_are_said_only_with_granularity_and_unknown_values_are_refused() -> None:
    kind_only = {"granule_type": "coarse", "granule_colour": "red"}
    assert attribute_sentence(kind_only) == (NOTHING_STATED, {}) and sayable_statements(kind_only) == {}
    none = {"granularity": "no", "granule_type": captions.NIL, "granule_colour": captions.NIL, "cytoplasm_vacuole": "no"}
    sentence, stated = attribute_sentence(none)
    assert captions.NOTHING_IN_CYTOPLASM[0] in sentence and stated == none
    with pytest.raises(DataError, match="unknown value"):
        attribute_sentence({"cell_size": "huge"})
