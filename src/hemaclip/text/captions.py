"""Captions for the 11 WBCAtt attributes of one white blood cell, and a parser that reads them back.

Why both halves live together: a caption is only useful as a training target if it states the
annotation faithfully. The generator draws from several sentence structures and synonym tables; the
parser is a rule-based reader keyed on *words next to their head noun* ("... granules",
"nucleus is ...", "... cytoplasm"), not on the templates, so it also reads paraphrases that use the
same vocabulary. `parse_caption(c) == attributes` for every generated caption is the contract the
tests check on all WBCAtt rows.

Granule attributes need care because the published annotation has combinations such as
granule_type="small" with granule_colour="nil": "nil" is said explicitly ("of indeterminate colour"),
and granularity="no" is said as "no granules" / "agranular" (which implies type and colour "nil"
unless granules are still described, e.g. "no appreciable granularity beyond a few small granules").
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hemaclip.data.attributes import ATTRIBUTE_NAMES, validate_attributes

NIL = "nil"

# --------------------------------------------------------------------------------------------------
# Lexicon used by the generator. Every word here is also understood by the parser (tables below are
# built from these), so adding a synonym in one place keeps generation and parsing in step.
# --------------------------------------------------------------------------------------------------

CELL_NOUNS: tuple[str, ...] = ("white blood cell", "leukocyte", "white cell", "cell")
CELL_SIZE_WORDS: dict[str, tuple[str, ...]] = {"big": ("large", "big"), "small": ("small",)}
CELL_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "round": ("round", "rounded"),
    "irregular": ("irregular", "irregularly shaped"),
}
# Shape words that read well before "outline" ("an irregularly shaped outline" does not).
OUTLINE_SHAPE_WORDS: dict[str, tuple[str, ...]] = {"round": ("round",), "irregular": ("irregular",)}

# Nucleus, as an adjective phrase before "nucleus".
NUCLEUS_PRE: dict[str, tuple[str, ...]] = {
    "unsegmented-band": ("band-shaped, unsegmented", "unsegmented, band-shaped", "band-shaped"),
    "unsegmented-round": ("round, unsegmented", "unsegmented, round", "round"),
    "unsegmented-indented": ("indented, unsegmented", "unsegmented, indented", "indented"),
    "segmented-bilobed": ("bilobed", "two-lobed", "segmented, bilobed"),
    "segmented-multilobed": ("multilobed", "segmented, multilobed"),
    "irregular": ("irregular", "irregularly shaped"),
}
# Nucleus, as a predicate after "the nucleus is".
NUCLEUS_PRED: dict[str, tuple[str, ...]] = {
    "unsegmented-band": ("band-shaped and unsegmented", "unsegmented and band-shaped"),
    "unsegmented-round": ("round and unsegmented", "round"),
    "unsegmented-indented": ("indented but unsegmented", "indented"),
    "segmented-bilobed": ("bilobed", "segmented into two lobes"),
    "segmented-multilobed": ("multilobed", "segmented into several lobes", "segmented into three or more lobes"),
    "irregular": ("irregular in shape", "irregularly shaped"),
}
# Nucleus, as a post-modifier directly after the noun ("a nucleus ...").
NUCLEUS_POST: dict[str, tuple[str, ...]] = {
    "unsegmented-band": ("that is band-shaped and unsegmented", "that is unsegmented and band-shaped"),
    "unsegmented-round": ("that is round and unsegmented",),
    "unsegmented-indented": ("that is indented but unsegmented",),
    "segmented-bilobed": ("with two lobes", "segmented into two lobes"),
    "segmented-multilobed": ("of three or more lobes", "segmented into several lobes", "with three or more lobes"),
    "irregular": ("of irregular shape", "that is irregular in shape"),
}

CHROMATIN_WORDS: dict[str, tuple[str, ...]] = {
    "densely": ("densely packed", "dense", "condensed"),
    "loosely": ("loosely packed", "loose", "open"),
}

RATIO_NOUNS: tuple[str, ...] = ("nuclear-to-cytoplasmic ratio", "nuclear-cytoplasmic ratio", "N:C ratio")
RATIO_WORDS: dict[str, tuple[str, ...]] = {"low": ("low",), "high": ("high",)}
# The amount of cytoplasm relative to the nucleus states the N:C ratio without naming it.
CYTOPLASM_AMOUNT: dict[str, tuple[str, ...]] = {"low": ("relatively abundant", "ample"), "high": ("scant", "scanty")}

CYTOPLASM_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "light blue": ("light blue", "pale blue"),
    "blue": ("blue",),
    "purple blue": ("purple-blue", "purplish-blue"),
}
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {"clear": ("clear",), "frosted": ("frosted",)}

VACUOLE_ADJ: dict[str, tuple[str, ...]] = {"yes": ("vacuolated",), "no": ("non-vacuolated",)}
VACUOLE_OBJECT: dict[str, tuple[str, ...]] = {
    "yes": ("a few vacuoles", "some vacuoles", "vacuoles"),
    "no": ("no vacuoles",),
}

GRANULE_TYPE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "fine"),
    "round": ("round",),
    "coarse": ("coarse",),
}
GRANULE_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "pink": ("pink", "pinkish"),
    "purple": ("purple", "dark purple"),
    "red": ("red", "orange-red"),
}
# How a "nil" granule type / colour is said when granules are otherwise described.
GRANULE_NIL_TYPE = "of indeterminate type"
GRANULE_NIL_COLOUR = "of indeterminate colour"
GRANULE_NIL_BOTH = "of indeterminate type and colour"
GRANULES_NONE: tuple[str, ...] = ("no granules", "no visible granules")
GRANULES_NONE_PREDICATE: tuple[str, ...] = ("is free of granules", "lacks granules", "is agranular")
# granularity "no" although a type or colour is annotated (rare in the data, but allowed).
GRANULES_SPARSE = "no appreciable granularity beyond a few {}"
NOTHING_IN_CYTOPLASM: tuple[str, ...] = (
    "neither granules nor vacuoles",
    "no granules or vacuoles",
    "no vacuoles or granules",
)
CONTENT_VERBS: tuple[str, ...] = ("shows", "contains", "holds")
CONTENT_PARTICIPLES: tuple[str, ...] = ("showing", "containing", "holding")

# --------------------------------------------------------------------------------------------------
# Parser tables: for each head noun, the words that may modify it and what they mean.
# A value of None marks a word that may sit in the phrase but states nothing by itself.
# --------------------------------------------------------------------------------------------------

_Meaning = tuple[str, str] | None


def _words(attribute: str, table: Mapping[str, Iterable[str]]) -> dict[str, _Meaning]:
    return {word: (attribute, value) for value, words in table.items() for word in words}


_NEUTRAL_MODIFIERS: dict[str, _Meaning] = {w: None for w in ("relatively", "very", "fairly", "moderately", "somewhat")}

_CELL_TOKENS: dict[str, _Meaning] = {
    **_words("cell_size", CELL_SIZE_WORDS),
    **_words("cell_shape", CELL_SHAPE_WORDS),
    **_words("cell_shape", {"irregular": ("irregularly outlined",)}),
    **_NEUTRAL_MODIFIERS,
}
_OUTLINE_TOKENS: dict[str, _Meaning] = {**_words("cell_shape", CELL_SHAPE_WORDS), **_NEUTRAL_MODIFIERS}
_NUCLEUS_TOKENS: dict[str, _Meaning] = {
    **_words(
        "nucleus_shape",
        {
            "unsegmented-band": ("band-shaped", "band"),
            "unsegmented-round": ("round", "rounded"),
            "unsegmented-indented": ("indented", "kidney-shaped", "reniform", "horseshoe-shaped"),
            "segmented-bilobed": ("bilobed", "bilobate", "two-lobed"),
            "segmented-multilobed": ("multilobed", "multilobated", "multilobular"),
            "irregular": ("irregular", "irregularly shaped", "irregular in shape"),
        },
    ),
    **{w: None for w in ("unsegmented", "non-segmented", "segmented")},
    **_NEUTRAL_MODIFIERS,
}
_CHROMATIN_TOKENS: dict[str, _Meaning] = {
    **_words("chromatin_density", CHROMATIN_WORDS),
    **_words("chromatin_density", {"densely": ("clumped",), "loosely": ("finely dispersed",)}),
    **_NEUTRAL_MODIFIERS,
}
_RATIO_TOKENS: dict[str, _Meaning] = {**_words("nuclear_cytoplasmic_ratio", RATIO_WORDS), **_NEUTRAL_MODIFIERS}
_CYTOPLASM_TOKENS: dict[str, _Meaning] = {
    **_words("cytoplasm_colour", CYTOPLASM_COLOUR_WORDS),
    **_words(
        "cytoplasm_colour",
        {"light blue": ("light-blue", "pale-blue"), "purple blue": ("purple blue", "purplish blue")},
    ),
    **_words("cytoplasm_texture", TEXTURE_WORDS),
    **_words("cytoplasm_texture", {"frosted": ("ground-glass",)}),
    **_words("nuclear_cytoplasmic_ratio", CYTOPLASM_AMOUNT),
    **_words("nuclear_cytoplasmic_ratio", {"low": ("abundant", "plentiful")}),
    # Vacuoles and granularity are read from the whole text (with negation); here they only keep the
    # adjective run together ("pale blue, clear, non-vacuolated cytoplasm").
    **{w: None for w in ("vacuolated", "non-vacuolated", "agranular", "granular", "non-granular")},
    **_NEUTRAL_MODIFIERS,
}
_GRANULE_TOKENS: dict[str, _Meaning] = {
    **_words("granule_type", GRANULE_TYPE_WORDS),
    **_words("granule_colour", GRANULE_COLOUR_WORDS),
    **{w: None for w in ("numerous", "many", "scattered", "prominent", "several", "cytoplasmic")},
    **_NEUTRAL_MODIFIERS,
}

_HEADS: dict[str, str] = {
    "cell": r"white blood cell|white cell|leukocyte|leucocyte|cell",
    "outline": r"outline|contour",
    "nucleus": r"nucleus",
    "chromatin": r"chromatin",
    "ratio": r"(?:nuclear-to-cytoplasmic|nuclear-cytoplasmic|nucleus-to-cytoplasm|nuclear:cytoplasmic|n:c|n/c) ratio",
    "cytoplasm": r"cytoplasm",
    "granules": r"granules?",
}
_HEAD_TOKENS: dict[str, dict[str, _Meaning]] = {
    "cell": _CELL_TOKENS,
    "outline": _OUTLINE_TOKENS,
    "nucleus": _NUCLEUS_TOKENS,
    "chromatin": _CHROMATIN_TOKENS,
    "ratio": _RATIO_TOKENS,
    "cytoplasm": _CYTOPLASM_TOKENS,
    "granules": _GRANULE_TOKENS,
}

# Separators inside an adjective run, and the links between a head noun and a predicate run.
_SEP = r"(?:\s*,\s*(?:and\s+)?|\s+(?:and|but)\s+|\s+)"
_LINK = r"(?:\s*,?\s+(?:(?:which|that)\s+)?(?:is|are|appears?|stains?|looks?)\s+|\s*:\s*)"


def _token_pattern(tokens: Iterable[str]) -> str:
    alternation = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return rf"(?<![\w-])(?:{alternation})(?![\w-])"


def _compile_head(head: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    tok = _token_pattern(_HEAD_TOKENS[head])
    run = rf"(?P<run>{tok}(?:{_SEP}{tok})*)"
    noun = rf"(?<![\w-])(?:{_HEADS[head]})(?![\w-])"
    pre = re.compile(rf"{run}\s+{noun}")
    post = re.compile(rf"{noun}{_LINK}{run}")
    return pre, post, re.compile(tok)


_HEAD_PATTERNS = {head: _compile_head(head) for head in _HEADS}

# Phrases that name a value wherever they occur (their words belong to one attribute only).
_IDIOMS: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(pattern), attribute, value)
    for pattern, attribute, value in (
        (r"\b(?:two|2)[ -]lobe(?:s|d)?\b|\bbilob(?:ed|ate)\b", "nucleus_shape", "segmented-bilobed"),
        (
            r"\b(?:three or more|3 or more|several|multiple|many|three to five|3-5)\s+lobes\b"
            r"|\bmultilob(?:ed|ated|ular)\b",
            "nucleus_shape",
            "segmented-multilobed",
        ),
        (r"\b(?:3|4|5|three|four|five)\s+lobes\b", "nucleus_shape", "segmented-multilobed"),
        (r"\bband-shaped\b|\bband form\b", "nucleus_shape", "unsegmented-band"),
        (r"\bindented\b|\bkidney-shaped\b|\breniform\b|\bhorseshoe-shaped\b", "nucleus_shape", "unsegmented-indented"),
        (r"\b(?:scant|scanty|thin|narrow)\s+rim\s+of\b(?:\s+\S+){0,3}\s+cytoplasm\b|\bvery little cytoplasm\b",
         "nuclear_cytoplasmic_ratio", "high"),
        (r"\bground-glass\b", "cytoplasm_texture", "frosted"),
        (
            r"\bnucleus\s+(?:(?:that|which)\s+is\s+)?of\s+(?:an?\s+)?irregular\s+(?:shape|outline)\b",
            "nucleus_shape",
            "irregular",
        ),
        (r"\bclear\s+(?:in\s+)?texture\b|\btexture\s+(?:is\s+)?clear\b", "cytoplasm_texture", "clear"),
        (r"\bfrosted\s+(?:in\s+)?texture\b|\btexture\s+(?:is\s+)?frosted\b", "cytoplasm_texture", "frosted"),
        (r"\bindeterminate\s+(?:type|form)\b", "granule_type", NIL),
        (r"\bindeterminate\s+(?:(?:type|form)\s+and\s+)?colou?r\b", "granule_colour", NIL),
    )
)

_NEGATORS = r"(?:no|without|free of|lacking|lacks|lack of|absence of|neither|nor)"
# Words allowed between a negator and its noun ("no visible cytoplasmic granules"); kept to a closed list
# so that "no vacuoles and small pink granules" is not read as "no granules".
_NEG_FILLER = r"(?:\s+(?:visible|apparent|any|obvious|appreciable|discernible|evident|cytoplasmic)){0,2}"
_GRANULES_ABSENT: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"(?<![\w-])(?:a|non-)granular\b",
        rf"\b{_NEGATORS}{_NEG_FILLER}\s+(?:vacuoles\s+(?:or|nor|and)\s+)?granul(?:es|e|ation|arity)\b",
        r"\bgranules?\s+(?:are|is)\s+(?:absent|not seen)\b",
    )
)
_VACUOLES_ABSENT: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"\bnon-vacuolated\b",
        r"\bnot\s+vacuolated\b",
        rf"\b{_NEGATORS}{_NEG_FILLER}\s+(?:granules\s+(?:or|nor|and)\s+)?vacuol",
        r"\bvacuoles?\s+(?:are|is)\s+(?:absent|not seen)\b",
    )
)
_GRANULES_MENTIONED = re.compile(r"granul")
_VACUOLES_MENTIONED = re.compile(r"(?<!non-)vacuol")
_DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u00a0": " "})


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.translate(_DASHES).lower()).strip()


def parse_caption(text: str) -> dict[str, str]:
    """Read the attribute values a sentence states; attributes it does not mention are left out.

    Contradictory statements of one attribute (e.g. "round" and "irregular" for the same nucleus)
    count as not stated, so a faithfulness check on a paraphrase fails instead of guessing.
    """
    t = _normalise(text)
    found: dict[str, set[str]] = {}

    def add(attribute: str, value: str) -> None:
        found.setdefault(attribute, set()).add(value)

    for head, (pre, post, token) in _HEAD_PATTERNS.items():
        table = _HEAD_TOKENS[head]
        for pattern in (pre, post):
            for match in pattern.finditer(t):
                for word in token.findall(match.group("run")):
                    meaning = table[word]
                    if meaning is not None:
                        add(*meaning)
    for pattern, attribute, value in _IDIOMS:
        if pattern.search(t):
            add(attribute, value)

    if any(p.search(t) for p in _GRANULES_ABSENT):
        add("granularity", "no")
        # No granules: type and colour are "nil" unless the text still describes a few.
        for attribute in ("granule_type", "granule_colour"):
            found.setdefault(attribute, {NIL})
    elif _GRANULES_MENTIONED.search(t):
        add("granularity", "yes")
    if any(p.search(t) for p in _VACUOLES_ABSENT):
        add("cytoplasm_vacuole", "no")
    elif _VACUOLES_MENTIONED.search(t):
        add("cytoplasm_vacuole", "yes")

    return {name: next(iter(found[name])) for name in ATTRIBUTE_NAMES if len(found.get(name, ())) == 1}


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (N:C is read "en-cee"): the one rule of captions,
    prompts and describe sentences."""
    return "an" if word[:1].lower() in "aeiou" or word.startswith("N:C") else "a"


def with_article(phrase: str) -> str:
    """`phrase` with 'a' or 'an' before it ("an eosinophil", "a band-shaped nucleus")."""
    return f"{article(phrase)} {phrase}"


class _Phrases:
    """Draws the wording for one caption: each call picks a synonym with the caption's own RNG."""

    def __init__(self, attributes: Mapping[str, str], rng: random.Random) -> None:
        self.a = attributes
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return options[self.rng.randrange(len(options))]

    # cell
    def size(self) -> str:
        return self.pick(CELL_SIZE_WORDS[self.a["cell_size"]])

    def shape(self) -> str:
        return self.pick(CELL_SHAPE_WORDS[self.a["cell_shape"]])

    def outline_shape(self) -> str:
        return self.pick(OUTLINE_SHAPE_WORDS[self.a["cell_shape"]])

    def noun(self) -> str:
        return self.pick(CELL_NOUNS)

    # nucleus
    def nucleus_pre(self) -> str:
        return self.pick(NUCLEUS_PRE[self.a["nucleus_shape"]])

    def nucleus_pred(self) -> str:
        return self.pick(NUCLEUS_PRED[self.a["nucleus_shape"]])

    def nucleus_post(self) -> str:
        return self.pick(NUCLEUS_POST[self.a["nucleus_shape"]])

    def chromatin(self) -> str:
        return self.pick(CHROMATIN_WORDS[self.a["chromatin_density"]])

    # ratio
    def ratio(self) -> str:
        return self.pick(RATIO_WORDS[self.a["nuclear_cytoplasmic_ratio"]])

    def ratio_noun(self) -> str:
        return self.pick(RATIO_NOUNS)

    def amount(self) -> str:
        return self.pick(CYTOPLASM_AMOUNT[self.a["nuclear_cytoplasmic_ratio"]])

    # cytoplasm
    def colour(self) -> str:
        return self.pick(CYTOPLASM_COLOUR_WORDS[self.a["cytoplasm_colour"]])

    def texture(self) -> str:
        return self.pick(TEXTURE_WORDS[self.a["cytoplasm_texture"]])

    def vacuole_adj(self) -> str:
        return self.pick(VACUOLE_ADJ[self.a["cytoplasm_vacuole"]])

    def vacuole_object(self) -> str:
        return self.pick(VACUOLE_OBJECT[self.a["cytoplasm_vacuole"]])

    # granules
    @property
    def granule_state(self) -> str:
        """'present', 'none' (no granules at all) or 'sparse' (granularity no, but a type/colour is annotated)."""
        if self.a["granularity"] == "yes":
            return "present"
        if self.a["granule_type"] == NIL and self.a["granule_colour"] == NIL:
            return "none"
        return "sparse"

    def granule_np(self) -> str:
        """Noun phrase for the granules themselves, saying "nil" type/colour explicitly."""
        kind, colour = self.a["granule_type"], self.a["granule_colour"]
        if kind != NIL and colour != NIL:
            joiner = self.pick((" ", ", "))  # "small pink granules" / "coarse, dark purple granules"
            return f"{self.pick(GRANULE_TYPE_WORDS[kind])}{joiner}{self.pick(GRANULE_COLOUR_WORDS[colour])} granules"
        if kind != NIL:
            return f"{self.pick(GRANULE_TYPE_WORDS[kind])} granules {GRANULE_NIL_COLOUR}"
        if colour != NIL:
            return f"{self.pick(GRANULE_COLOUR_WORDS[colour])} granules {GRANULE_NIL_TYPE}"
        return f"granules {GRANULE_NIL_BOTH}"

    def granules_with(self) -> str:
        """Granules as the object of 'with' / 'shows' (no vacuoles)."""
        state = self.granule_state
        if state == "present":
            return self.granule_np()
        if state == "none":
            return self.pick(GRANULES_NONE)
        return GRANULES_SPARSE.format(self.granule_np())

    def contents(self) -> str:
        """Granules and vacuoles together as the object of 'shows' / 'with'."""
        state, vac = self.granule_state, self.a["cytoplasm_vacuole"]
        if state == "none" and vac == "no":
            return self.pick(NOTHING_IN_CYTOPLASM)
        if state == "none":
            return f"{self.vacuole_object()} but {self.pick(GRANULES_NONE)}"
        if state == "sparse":  # vacuoles first: "no ... granularity beyond a few X granules and vacuoles" is ambiguous
            return f"{self.vacuole_object()} and {self.granules_with()}"
        if vac == "no":
            return f"{self.granule_np()} {self.pick(('and', 'but'))} no vacuoles"
        first, second = self.granule_np(), self.vacuole_object()
        if self.rng.random() < 0.5:
            first, second = second, first
        return f"{first} and {second}"

    def contents_verb(self) -> str:
        return "shows" if self.granule_state == "sparse" else self.pick(CONTENT_VERBS)

    def contents_participle(self) -> str:
        return "showing" if self.granule_state == "sparse" else self.pick(CONTENT_PARTICIPLES)


# Each template is one sentence structure: a different clause order or a different way of attaching
# the attributes (pre-modifiers, predicates, post-modifiers, a structured report, implicit N:C ratio).


def _t_cell_first(p: _Phrases) -> str:
    size, nuc, ratio = p.size(), p.nucleus_pre(), p.ratio()
    return (
        f"{with_article(size)}, {p.shape()} {p.noun()} with {with_article(nuc)} nucleus, {p.chromatin()} chromatin and "
        f"{with_article(ratio)} {p.ratio_noun()}; its {p.colour()}, {p.texture()} cytoplasm {p.contents_verb()} {p.contents()}."
    )


def _t_in_this_cell(p: _Phrases) -> str:
    return (
        f"In this {p.size()}, {p.shape()} {p.noun()}, the nucleus is {p.nucleus_pred()} "
        f"with {p.chromatin()} chromatin, "
        f"the {p.ratio_noun()} is {p.ratio()}, and the {p.texture()}, {p.colour()} cytoplasm "
        f"{p.contents_verb()} {p.contents()}."
    )


def _t_predicates(p: _Phrases) -> str:
    return (
        f"This {p.noun()} is {p.size()} and {p.shape()}. Its nucleus is {p.nucleus_pred()} and its chromatin is "
        f"{p.chromatin()}. The cytoplasm is {p.colour()} and {p.texture()}, and the {p.ratio_noun()} is {p.ratio()}. "
        f"It {p.contents_verb()} {p.contents()}."
    )


def _t_report(p: _Phrases) -> str:
    return (
        f"{p.size()}, {p.shape()} {p.noun()}. Nucleus: {p.nucleus_pre()}; chromatin: {p.chromatin()}; "
        f"{p.ratio_noun()}: {p.ratio()}. Cytoplasm: {p.colour()}, {p.texture()}, with {p.contents()}."
    )


def _t_granules_first(p: _Phrases) -> str:
    state = p.granule_state
    if state == "present":
        opening = f"{p.granule_np()} are scattered through the"
    elif state == "none":
        opening = p.pick(("no granules are seen in the", "there are no granules in the"))
    else:
        opening = f"only a few {p.granule_np()} are seen in the otherwise agranular,"
    nuc, ratio = p.nucleus_pre(), p.ratio()
    return (
        f"{opening} {p.colour()}, {p.texture()} cytoplasm of this {p.size()}, {p.shape()} {p.noun()}, which has "
        f"{with_article(nuc)} nucleus with {p.chromatin()} chromatin, {with_article(ratio)} {p.ratio_noun()} and {p.vacuole_object()}."
    )


def _t_outline(p: _Phrases) -> str:
    shape, ratio = p.outline_shape(), p.ratio()
    return (
        f"This {p.size()} {p.noun()} has {with_article(shape)} outline and {with_article(ratio)} {p.ratio_noun()}. "
        f"Its {p.nucleus_pre()} nucleus contains {p.chromatin()} chromatin, and its {p.texture()} cytoplasm stains "
        f"{p.colour()} and {p.contents_verb()} {p.contents()}."
    )


def _t_amount(p: _Phrases) -> str:
    size, nuc = p.size(), p.nucleus_pre()
    return (
        f"{with_article(size)}, {p.shape()} {p.noun()} with {p.amount()}, {p.colour()}, {p.texture()} cytoplasm around "
        f"{with_article(nuc)} nucleus of {p.chromatin()} chromatin; the cytoplasm {p.contents_verb()} {p.contents()}."
    )


def _t_whose(p: _Phrases) -> str:
    state = p.granule_state
    if state == "present":
        granules = f"{p.pick(('contains', 'holds'))} {p.granule_np()}"
    elif state == "none":
        granules = p.pick(GRANULES_NONE_PREDICATE)
    else:
        granules = f"shows {p.granules_with()}"
    size = p.size()
    return (
        f"{with_article(size)}, {p.shape()} {p.noun()} whose {p.nucleus_pre()} nucleus has {p.chromatin()} chromatin and whose "
        f"{p.colour()}, {p.texture()}, {p.vacuole_adj()} cytoplasm {granules}; the {p.ratio_noun()} is {p.ratio()}."
    )


def _t_chromatin_first(p: _Phrases) -> str:
    if p.granule_state == "none" and p.rng.random() < 0.5:
        cytoplasm = f"{p.colour()}, {p.texture()}, {p.vacuole_adj()} and agranular"
    else:
        cytoplasm = f"{p.colour()}, {p.texture()} and {p.vacuole_adj()}, with {p.granules_with()}"
    return (
        f"{p.chromatin()} chromatin fills the {p.nucleus_pre()} nucleus of this {p.size()}, {p.shape()} {p.noun()}; "
        f"the {p.ratio_noun()} is {p.ratio()}, and the cytoplasm is {cytoplasm}."
    )


def _t_nucleus_post(p: _Phrases) -> str:
    size, shape, ratio = p.size(), p.outline_shape(), p.ratio()
    return (
        f"This is {with_article(size)} {p.noun()} with {with_article(shape)} outline. It has a nucleus {p.nucleus_post()}, "
        f"{p.chromatin()} chromatin, {with_article(ratio)} {p.ratio_noun()}, and {p.colour()} cytoplasm of {p.texture()} texture "
        f"{p.contents_participle()} {p.contents()}."
    )


def _t_smear(p: _Phrases) -> str:
    return (
        f"On a stained blood film this {p.noun()} appears {p.size()} and {p.shape()}, with a nucleus "
        f"{p.nucleus_post()}, {p.chromatin()} chromatin, {p.amount()} {p.colour()} cytoplasm of {p.texture()} "
        f"texture, {p.contents()}."
    )


def _t_nucleus_first(p: _Phrases) -> str:
    nuc, ratio = p.nucleus_pre(), p.ratio()
    return (
        f"{with_article(nuc)} nucleus with {p.chromatin()} chromatin lies within the {p.colour()}, {p.texture()} cytoplasm "
        f"of this {p.size()}, {p.shape()} {p.noun()}, giving {with_article(ratio)} {p.ratio_noun()}; the cytoplasm "
        f"{p.contents_verb()} {p.contents()}."
    )


CAPTION_TEMPLATES: dict[str, Callable[[_Phrases], str]] = {
    "cell_first": _t_cell_first,
    "in_this_cell": _t_in_this_cell,
    "predicates": _t_predicates,
    "report": _t_report,
    "granules_first": _t_granules_first,
    "outline": _t_outline,
    "amount": _t_amount,
    "whose": _t_whose,
    "chromatin_first": _t_chromatin_first,
    "nucleus_post": _t_nucleus_post,
    "smear": _t_smear,
    "nucleus_first": _t_nucleus_first,
}

# Extra draws per caption when a synonym choice happens to repeat an earlier caption.
_MAX_REDRAWS = 8


@dataclass(frozen=True)
class Caption:
    """One generated caption and the sentence structure it came from."""

    text: str
    template: str


def _rng(attributes: Mapping[str, str], seed: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and PYTHONHASHSEED.
    return random.Random(f"{seed}|" + "|".join(attributes[name] for name in ATTRIBUTE_NAMES))


def capitalise(text: str) -> str:
    """`text` with its first letter upper-case (the rest untouched: "N:C ratio" stays): captions and describe sentences."""
    return text[:1].upper() + text[1:]


def caption_records(attributes: Mapping[str, str], n: int = 8, seed: int = 0) -> list[Caption]:
    """`n` captions of one cell with the template each came from (see `caption_variants`)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    attrs = validate_attributes(dict(attributes), source="caption attributes")
    rng = _rng(attrs, seed)
    phrases = _Phrases(attrs, rng)
    names = list(CAPTION_TEMPLATES)
    order: list[str] = []
    while len(order) < n:  # each template once before any repeats
        order += rng.sample(names, len(names))
    records: list[Caption] = []
    seen: set[str] = set()
    for name in order[:n]:
        for _ in range(_MAX_REDRAWS):
            text = capitalise(CAPTION_TEMPLATES[name](phrases))
            if text not in seen:
                break
        seen.add(text)
        records.append(Caption(text, name))
    return records


def caption_variants(attributes: Mapping[str, str], n: int = 8, seed: int = 0) -> list[str]:
    """`n` different English captions that each state all 11 attribute values of one cell.

    Deterministic given (attributes, seed); up to len(CAPTION_TEMPLATES) captions use distinct sentence
    structures. Raises DataError for an unknown attribute value.
    """
    return [record.text for record in caption_records(attributes, n=n, seed=seed)]

