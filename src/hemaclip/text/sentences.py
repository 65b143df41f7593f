"""The sentence `hemaclip describe` writes: confident attribute values in the training captions' words.

Why it lives beside :mod:`hemaclip.text.captions`: the sentence a user reads and the captions the model
trained on are built from one vocabulary (the first synonym of each of the captions' word tables), and
what a sentence states is read back with the captions' parser (:func:`parse_caption`), so the
``stated`` flags are the parser's reading of the actual sentence, not a promise. The sentence states
only what it is given: what to give it (the values above a probability threshold) is chosen by
:func:`select_statements`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.errors import DataError
from hemaclip.text.captions import (
    CELL_NOUNS,
    CELL_SHAPE_WORDS,
    CELL_SIZE_WORDS,
    CHROMATIN_WORDS,
    CONTENT_VERBS,
    CYTOPLASM_COLOUR_WORDS,
    GRANULE_COLOUR_WORDS,
    GRANULE_NIL_BOTH,
    GRANULE_NIL_COLOUR,
    GRANULE_NIL_TYPE,
    GRANULE_TYPE_WORDS,
    GRANULES_NONE,
    GRANULES_SPARSE,
    NIL,
    NOTHING_IN_CYTOPLASM,
    NUCLEUS_PRE,
    RATIO_NOUNS,
    RATIO_WORDS,
    TEXTURE_WORDS,
    VACUOLE_OBJECT,
    capitalise,
    parse_caption,
    with_article,
)

__all__ = [
    "NOTHING_STATED",
    "attribute_sentence",
    "sayable_statements",
    "select_statements",
    "statements_for_rows",
]

NOTHING_STATED = "No attribute is stated: none reaches the confidence threshold."
# The one word of each caption table a describe sentence uses (captions draw among all of them).
_SHOWS, _CONTAINS = CONTENT_VERBS[0], CONTENT_VERBS[1]
_GRANULE_ATTRIBUTES = {"granularity", "granule_type", "granule_colour"}


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _granule_np(kind: str | None, colour: str | None) -> str:
    """Granules with the stated type and colour ('nil' said as 'of indeterminate ...')."""
    words = []
    if kind is not None and kind != NIL:
        words.append(GRANULE_TYPE_WORDS[kind][0])
    if colour is not None and colour != NIL:
        words.append(GRANULE_COLOUR_WORDS[colour][0])
    np_ = " ".join([*words, "granules"])
    if kind == NIL and colour == NIL:
        return f"{np_} {GRANULE_NIL_BOTH}"
    if kind == NIL:
        return f"{np_} {GRANULE_NIL_TYPE}"
    if colour == NIL:
        return f"{np_} {GRANULE_NIL_COLOUR}"
    return np_


def _granule_statements(stated: Mapping[str, str]) -> tuple[str | None, str, set[str]]:
    """(granule phrase or None, state, attributes it states).

    Any mention of granules states granularity, and "no granules" also states type and colour "nil"
    to a reader, so granule type/colour are only said together with granularity, and absence only
    when type and colour are confident too; otherwise granules are not mentioned at all.
    """
    granularity = stated.get("granularity")
    kind, colour = stated.get("granule_type"), stated.get("granule_colour")
    if granularity == "yes":
        used = {"granularity"} | {n for n, v in (("granule_type", kind), ("granule_colour", colour)) if v is not None}
        return _granule_np(kind, colour), "present", used
    if granularity == "no" and kind is not None and colour is not None:
        if kind == NIL and colour == NIL:
            return GRANULES_NONE[0], "none", set(_GRANULE_ATTRIBUTES)
        return GRANULES_SPARSE.format(_granule_np(kind, colour)), "sparse", set(_GRANULE_ATTRIBUTES)
    return None, "", set()


def _contents(granules: str | None, state: str, vacuole: str | None) -> str | None:
    """Granules and vacuoles together as the object of 'shows' / 'contains', in the captions' order."""
    if not (granules and vacuole):
        return granules or vacuole
    if state == "none":
        return NOTHING_IN_CYTOPLASM[0] if vacuole == VACUOLE_OBJECT["no"][0] else f"{vacuole} but {GRANULES_NONE[0]}"
    if state == "sparse":  # vacuoles first, as the training captions do
        return f"{vacuole} and {granules}"
    return f"{granules} and {vacuole}"


def attribute_sentence(stated: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """One sentence in the training captions' words stating (a subset of) `stated`; returns it with
    what it states as read back by :func:`parse_caption`.

    Attributes that cannot be said alone without implying another one (granule type/colour without
    granularity) are left out; the returned dict is therefore the truth about the sentence.
    """
    s = {k: v for k, v in stated.items() if k in ATTRIBUTES}
    for name, value in s.items():
        if value not in ATTRIBUTES[name]:
            raise DataError(f"unknown value '{value}' for attribute '{name}'")
    cell_adj = [w for w in (CELL_SIZE_WORDS[s["cell_size"]][0] if "cell_size" in s else None,
                            CELL_SHAPE_WORDS[s["cell_shape"]][0] if "cell_shape" in s else None) if w]
    with_items = []
    if "nucleus_shape" in s:
        with_items.append(f"{with_article(NUCLEUS_PRE[s['nucleus_shape']][0])} nucleus")
    if "chromatin_density" in s:
        with_items.append(f"{CHROMATIN_WORDS[s['chromatin_density']][0]} chromatin")
    if "nuclear_cytoplasmic_ratio" in s:
        with_items.append(f"{with_article(RATIO_WORDS[s['nuclear_cytoplasmic_ratio']][0])} {RATIO_NOUNS[0]}")
    cyto_adj = [w for w in (CYTOPLASM_COLOUR_WORDS[s["cytoplasm_colour"]][0] if "cytoplasm_colour" in s else None,
                            TEXTURE_WORDS[s["cytoplasm_texture"]][0] if "cytoplasm_texture" in s else None) if w]
    granules, state, _ = _granule_statements(s)
    vacuole = VACUOLE_OBJECT[s["cytoplasm_vacuole"]][0] if "cytoplasm_vacuole" in s else None
    contents = _contents(granules, state, vacuole)
    if not cell_adj and not with_items and not cyto_adj and not contents:
        return NOTHING_STATED, {}
    text = with_article(" ".join(filter(None, [", ".join(cell_adj), CELL_NOUNS[0]])))
    if with_items:
        text += f" with {_join(with_items)}"
    if contents:
        verb = _SHOWS if state == "sparse" else _CONTAINS
        subject = f"its {', '.join(cyto_adj)} cytoplasm" if cyto_adj else "its cytoplasm"
        text += f"; {subject} {verb} {contents}"
    elif cyto_adj:
        text += f"; its cytoplasm is {_join(cyto_adj)}"
    sentence = capitalise(text) + "."
    return sentence, parse_caption(sentence)


def sayable_statements(stated: Mapping[str, str]) -> dict[str, str]:
    """The part of `stated` that :func:`attribute_sentence` puts into words (granule type and colour only
    together with granularity): what a reader of the sentence must recover exactly."""
    _, _, used = _granule_statements(stated)
    return {n: v for n, v in stated.items() if n in ATTRIBUTES and (n not in _GRANULE_ATTRIBUTES or n in used)}


def select_statements(
    values: Mapping[str, str], probabilities: Mapping[str, float], threshold: float
) -> dict[str, str]:
    """The predicted attribute values whose calibrated probability exceeds `threshold`."""
    return {n: values[n] for n in ATTRIBUTE_NAMES if n in values and float(probabilities[n]) > threshold}


def statements_for_rows(
    attribute_probs: Mapping[str, np.ndarray],
    attribute_values: Mapping[str, Sequence[str]],
    threshold: float,
    allowed: Sequence[bool] | None = None,
) -> list[dict[str, str]]:
    """What the sentence of each row states, given calibrated attribute probabilities {name: [N, V]}.

    This is exactly what `hemaclip describe` writes (same selection, same sentence, same read-back), so the
    faithfulness check measures the sentences users see. `allowed[i]` False states nothing (the
    predicted class has no WBCAtt attributes).
    """
    names = [n for n in ATTRIBUTE_NAMES if n in attribute_probs]
    n = len(next(iter(attribute_probs.values()))) if attribute_probs else 0
    best = {a: np.argmax(attribute_probs[a], axis=1) for a in names}
    top = {a: np.max(attribute_probs[a], axis=1) for a in names}
    said: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}  # many cells share one selection
    out = []
    for i in range(n):
        if allowed is not None and not allowed[i]:
            out.append({})
            continue
        values = {a: attribute_values[a][int(best[a][i])] for a in names}
        chosen = select_statements(values, {a: float(top[a][i]) for a in names}, threshold)
        key = tuple(chosen.items())
        if key not in said:
            said[key] = attribute_sentence(chosen)[1]
        out.append(dict(said[key]))
    return out
