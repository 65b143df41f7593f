"""Word-piece stems: does an evaluation-only word share a stem with training text, as the text tower reads it?

Comparing whole words misses what a WordPiece tokenizer sees. "basophile" is bas ##op ##hil ##e: the training
word "basophil" (bas ##op ##hil) plus one piece, so a "held-out" synonym spelt that way is read almost as the
trained name. The held-out wording of the prompt file is checked with :func:`stem_clash` against every word of
the training text, both split by the text tower's own tokenizer (passed in as a function, so this layer does not
load models; `tests/test_text_heldout.py` passes the MiniLM tokenizer of the shipped model).

The rule (one function, :func:`stem_clash`). Write a word as its word pieces with the "##" marks removed. A
held-out word and a training word share a stem when any of these holds:

1. ``same``: the pieces are equal (the same word, whatever the case or hyphenation around it);
2. ``suffix``: one word, less its last piece, is the leading pieces of the other, and that last piece is no
   longer than the rest (a suffix or a truncation, not most of the word): "basophile" = basophil + e; "baso" =
   bas + o against bas ##op ##hil; "eosinophile" e ##osi ##no ##phile against e ##osi ##no ##phi ##l; "eo" = e + o
   against eosinophil (but "cleft", cl ##eft, is no relative of "clotting", cl ##otti ##ng: eft is longer than cl);
3. ``stem``: their common leading pieces spell at least :data:`MIN_STEM_LETTERS` letters ("mono" is
   monocyte's first piece; "monocytoid" and "mononuclear" share mono; "polylobated" and "polymorphonuclear"
   share poly);
4. ``variant``: a spelling variant: the same number of pieces (at least :data:`MIN_VARIANT_PIECES`), the same
   first piece, and exactly one other piece different ("leucocyte" le ##uc ##oc ##yte against "leukocyte"
   le ##uk ##oc ##yte).

Words that share only a trailing part (acid ##op ##hil against bas ##op ##hil) do not clash: a common ending
is a suffix, not a stem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Tokenize = Callable[[str], list[str]]  # text -> word pieces, continuation pieces marked "##" (BERT WordPiece)
Pieces = tuple[str, ...]

MIN_STEM_LETTERS = 4  # shorter common beginnings ("bi", "pre", "non") are prefixes shared by unrelated words
MIN_VARIANT_PIECES = 3  # two-piece words differing in one piece share only one piece: too little to call a variant
CONTINUATION = "##"


def piece_words(text: str, tokenize: Tokenize) -> list[Pieces]:
    """The words of `text` as the tokenizer splits them (a word starts at every piece without "##"), "##" removed;
    punctuation-only words are dropped ("mast-cell-like" is three words: mast, cell, like)."""
    words: list[list[str]] = []
    for piece in tokenize(text):
        if piece.startswith(CONTINUATION) and words:
            words[-1].append(piece[len(CONTINUATION):])
        else:
            words.append([piece])
    return [tuple(w) for w in words if any(ch.isalnum() for ch in "".join(w))]


def _letters(pieces: Pieces) -> int:
    return sum(len(p) for p in pieces)


def stem_clash(held: Pieces, trained: Pieces) -> str | None:
    """Why two words (word pieces, "##" removed) share a stem: "same", "suffix", "stem" or "variant"; None when
    they do not. The rule is the module docstring's."""
    if held == trained:
        return "same"
    for short, long in ((held, trained), (trained, held)):
        rest, last = short[:-1], short[-1]
        if rest and long[: len(rest)] == rest and len(last) <= _letters(rest):
            return "suffix"
    common = 0
    for a, b in zip(held, trained):
        if a != b:
            break
        common += 1
    if _letters(held[:common]) >= MIN_STEM_LETTERS:
        return "stem"
    if (len(held) == len(trained) >= MIN_VARIANT_PIECES and held[0] == trained[0]
            and sum(a != b for a, b in zip(held, trained)) == 1):
        return "variant"
    return None


def stem_clashes(held_texts: Iterable[str], training_texts: Iterable[str], tokenize: Tokenize,
                 allowed: Iterable[str] = ()) -> dict[str, list[tuple[str, str]]]:
    """{held-out word: [(training word, reason), ...]} for every held-out word (outside `allowed`, the declared
    shared words) that shares a stem with a word of the training texts; empty when the wording is clean."""
    allowed_pieces = {p for word in allowed for p in piece_words(word, tokenize)}
    held = {w for t in held_texts for w in piece_words(t, tokenize)} - allowed_pieces
    trained = {w for t in dict.fromkeys(training_texts) for w in piece_words(t, tokenize)}
    by_first: dict[str, list[Pieces]] = {}
    for word in trained:
        by_first.setdefault(word[0], []).append(word)
    found: dict[str, list[tuple[str, str]]] = {}
    for word in sorted(held):
        hits = []
        for other in by_first.get(word[0], []):  # every rule needs the same first piece
            reason = stem_clash(word, other)
            if reason:
                hits.append(("".join(other), reason))
        if hits:
            found["".join(word)] = sorted(hits)
    return found
