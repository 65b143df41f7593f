"""The four question protocols of the cytomorphology LVLM audit, and robust readers of the answers.

Protocols (Buck et al., "Domain specific models outperform large vision language models on cytomorphology
tasks", medRxiv 2025.05.05.25326989; the wording here is hemaclip's own, the structure theirs):

* ``zero-shot``: one image and the list of allowed labels; the model is asked to consider the cell's
  features first, then to name one label.
* ``few-shot``: one labelled example image per class, then the query image, then the same question.
* ``explain``: the label, a free-text justification and a certainty on a 1-5 scale.
* ``features``: the label, then 100 points spread over the 19 morphological features of the audit's
  explainability prompt (:data:`FEATURES`, the list of the authors' published prompts).

Why the readers are rule-based and forgiving: an answer that cannot be read must be counted and shown,
never dropped, so the reader must say "unparseable" only when a person could not tell either. It looks
for an ``Answer:`` line first, then for exactly one cell-type noun anywhere in the reply; two different
cell types with no answer line is ambiguous and unparseable. Readers return ``None`` for what they
cannot read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hemaclip.data.attributes import PBC_CLASSES

__all__ = [
    "FEATURES",
    "LABEL_NAMES",
    "PROTOCOLS",
    "SCRIPTED_FINGERPRINT",
    "Answer",
    "detect_protocol",
    "parse_answer",
    "parse_certainty",
    "parse_features",
    "parse_justification",
    "parse_label",
    "prompt_messages",
]

PROTOCOLS: tuple[str, ...] = ("zero-shot", "few-shot", "explain", "features")
# The system fingerprint of hemaclip's scripted test server: a report labels runs it answered as demonstrations.
SCRIPTED_FINGERPRINT = "hemaclip-scripted-test-server"
# Bumped whenever a prompt's wording changes: it is part of every cache key, so old answers are never
# mistaken for answers to the new wording.
PROMPT_VERSION = 1

# How each PBC class is named to the model (its own label set is the data's folder names).
LABEL_NAMES: dict[str, str] = {
    "basophil": "Basophil",
    "eosinophil": "Eosinophil",
    "erythroblast": "Erythroblast",
    "ig": "Immature granulocyte",
    "lymphocyte": "Lymphocyte",
    "monocyte": "Monocyte",
    "neutrophil": "Neutrophil",
    "platelet": "Platelet",
}
assert tuple(sorted(LABEL_NAMES)) == tuple(sorted(PBC_CLASSES))

# Nouns (singular or plural) that name a class. Adjectives ("eosinophilic granules") never match.
_LABEL_NOUNS: dict[str, str] = {
    "basophil": r"basophils?|basophilic granulocytes?",
    "eosinophil": r"eosinophils?|eosinophilic granulocytes?",
    "erythroblast": r"erythroblasts?|normoblasts?|nucleated red (?:blood )?cells?|nrbcs?",
    "ig": r"immature granulocytes?|igs?|promyelocytes?|metamyelocytes?|myelocytes?",
    "lymphocyte": r"lymphocytes?",
    "monocyte": r"monocytes?",
    "neutrophil": r"(?:segmented |band |segmented or band )?neutrophils?|neutrophilic granulocytes?|pmns?",
    "platelet": r"platelets?|thrombocytes?",
}
_LABEL_PATTERNS = {label: re.compile(rf"(?<![\w-])(?:{nouns})(?![\w-])") for label, nouns in _LABEL_NOUNS.items()}
_ANSWER_LINE = re.compile(r"(?:^|\n)\W*(?:final\s+)?(?:answer|cell\s*type|classification|label|diagnosis)\s*\**\s*[:=\-]\s*(.*)")

# The 19 features of the audit's feature-importance prompt, with the patterns that find each in a reply.
FEATURES: dict[str, tuple[str, str]] = {
    "cell_shape": ("Cell shape", r"\bcell shape\b"),
    "cell_size": ("Cell size", r"\bcell size\b"),
    "nuclear_shape": ("Nuclear shape", r"\bnucle(?:ar|us) shape\b"),
    "nuclear_segmentation": ("Nuclear segmentation", r"\bnucle(?:ar|us) (?:segmentation|lobulation)\b"),
    "nc_ratio": ("Nuclear-to-cytoplasmic ratio",
                 r"\b(?:nuclear[- ]to[- ]cytoplasmic|nuclear[- ]cytoplasmic|nucleus[- ]to[- ]cytoplasm|n\s*[:/]\s*c)\s+ratio\b"),
    "nuclear_membrane": ("Nuclear membrane appearance", r"\bnuclear (?:membrane|envelope)\b"),
    "nucleoli": ("Nucleoli", r"\bnucleol(?:i|us)\b"),
    "chromatin_pattern": ("Chromatin pattern", r"\bchromatin\b"),
    "cytoplasmic_volume": ("Cytoplasmic volume", r"\bcytoplasm(?:ic)? (?:volume|amount)\b"),
    "cytoplasmic_colour": ("Cytoplasmic colour", r"\bcytoplasm(?:ic)? colou?r\b"),
    "cytoplasmic_border": ("Cytoplasmic border", r"\bcytoplasm(?:ic)? (?:border|membrane|margin)\b"),
    "granule_presence": ("Granule presence", r"\bgranule presence\b|\bpresence of granules\b|\bgranularity\b"),
    "granule_type": ("Granule type", r"\bgranule type\b|\btype of granules\b"),
    "inclusions": ("Inclusions (Auer rods, Döhle bodies or other cytoplasmic inclusions)", r"\binclusions?\b"),
    "cytoplasmic_basophilia": ("Cytoplasmic basophilia", r"\bbasophilia\b"),
    "erythrocytes": ("Erythrocytes", r"\berythrocytes?\b|\bred (?:blood )?cells\b"),
    "platelets": ("Platelets (thrombocytes)", r"\bplatelets?\b|\bthrombocytes?\b"),
    "surroundings": ("Surroundings of the cell", r"\bsurrounding"),
    "technical": ("Technical properties of the image (resolution, light, noise)", r"\btechnical\b|\bimage quality\b"),
}
assert len(FEATURES) == 19
_FEATURE_PATTERNS = {key: re.compile(pattern) for key, (_, pattern) in FEATURES.items()}
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")

_CERTAINTY = (
    re.compile(r"certain(?:ty)?(?:\s+level)?\s*\**\s*[:=\-]?\s*\**\s*(?:is\s+)?([1-5])(?:\.0)?(?![\d.])"),
    re.compile(r"(?<![\d.])([1-5])\s*(?:/|out of)\s*5\b"),
)
_SECTION = re.compile(r"(?:^|\n)\W*(answer|justification|reasoning|explanation|certainty|confidence)\s*\**\s*[:=]", re.I)

# Protocol texts. Each ends with the same labelled-line instructions the readers look for.
_SMEAR = "The image shows a cell from a stained peripheral blood smear, centred in the image."
_THINK = "Take a moment to think: first consider which features the cell has (nucleus, chromatin, cytoplasm, granules, size)."
FEW_SHOT_INTRO = "Here is one labelled example image of each cell type. The query image follows after them."
FEATURES_INTRO = "Spread 100 points over the 19 features below"


def _label_list(labels: Sequence[str]) -> str:
    return "\n".join(f"- {LABEL_NAMES.get(label, label)}" for label in labels)


def _question(labels: Sequence[str]) -> str:
    return f"Which of the cell types listed below is it? Choose one, written exactly as in this list:\n{_label_list(labels)}"


def protocol_text(protocol: str, labels: Sequence[str] = PBC_CLASSES) -> str:
    """The instruction text of `protocol` (after the image(s))."""
    if protocol in ("zero-shot", "few-shot"):
        return f"{_SMEAR} {_THINK}\n\n{_question(labels)}\n\nEnd your reply with one line of the form\nAnswer: <cell type>"
    if protocol == "explain":
        return (f"{_SMEAR} {_THINK}\n\n{_question(labels)}\n\nReply in exactly three lines:\n"
                "Answer: <cell type>\n"
                "Justification: <the features you see in this cell that support your answer>\n"
                "Certainty: <a whole number from 1 (a guess) to 5 (certain)>")
    if protocol == "features":
        names = "\n".join(name for name, _ in FEATURES.values())
        return (f"{_SMEAR} {_THINK}\n\n{_question(labels)}\n\nThen think how much each feature listed below contributed to "
                f"your decision. {FEATURES_INTRO}: more points for a feature that mattered more, 0 for one that did not "
                f"matter. The points must sum to 100.\n\n{names}\n\nReply with one line of the form\nAnswer: <cell type>\n"
                "followed by one line per feature of the form\n<feature>: <points>")
    raise ValueError(f"unknown protocol '{protocol}'; choose from {', '.join(PROTOCOLS)}")


def prompt_messages(
    protocol: str,
    query_image: Any,
    examples: Sequence[tuple[str, Any]] = (),
    labels: Sequence[str] = PBC_CLASSES,
) -> list[dict[str, Any]]:
    """OpenAI chat messages for one query. Images are passed through as given (a data URL, or a stand-in
    such as ``sha1:<hex>`` for the cache key), so the same function builds what is sent and what is keyed.

    `examples` ((label, image) pairs, one per class) are used by ``few-shot`` only."""
    def image(ref: Any) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": ref}}

    def text(value: str) -> dict[str, Any]:
        return {"type": "text", "text": value}

    if protocol == "few-shot":
        if not examples:
            raise ValueError("the few-shot protocol needs one example image per class")
        content = [text(FEW_SHOT_INTRO)]
        for i, (label, ref) in enumerate(examples, start=1):
            content += [text(f"Example {i}: {LABEL_NAMES.get(label, label)}"), image(ref)]
        content += [text("Query image:"), image(query_image), text(protocol_text(protocol, labels))]
    else:
        content = [image(query_image), text(protocol_text(protocol, labels))]
    return [{"role": "user", "content": content}]


def detect_protocol(messages: Sequence[Mapping[str, Any]]) -> str:
    """Which protocol a request follows (used by the scripted test server, which only sees requests)."""
    parts = [p for m in messages for p in (m.get("content") if isinstance(m.get("content"), list) else [])]
    texts = " ".join(str(p.get("text", "")) for p in parts if p.get("type") == "text")
    if FEW_SHOT_INTRO in texts:
        return "few-shot"
    if FEATURES_INTRO in texts:
        return "features"
    if "Certainty:" in texts:
        return "explain"
    return "zero-shot"


# ------------------------------------------------------------------------------------------------ #
# readers
# ------------------------------------------------------------------------------------------------ #


def _normalise(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text.replace("\r", "").replace("*", "").lower()).strip()


def _labels_in(text: str) -> list[str]:
    return [label for label, pattern in _LABEL_PATTERNS.items() if pattern.search(text)]


def parse_label(text: str | None) -> str | None:
    """The PBC label a reply gives, or None when it names none or several without an answer line."""
    if not text:
        return None
    t = _normalise(text)
    answers = _ANSWER_LINE.findall(t)
    for line in reversed(answers):  # the last answer line wins ("... so my answer is ... Answer: X")
        found = _labels_in(line.split("\n")[0])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:  # "Answer: neutrophil (not eosinophil)": the first named
            first = min(found, key=lambda label: _LABEL_PATTERNS[label].search(line).start())
            return first
    found = _labels_in(t)
    return found[0] if len(found) == 1 else None


def parse_certainty(text: str | None) -> int | None:
    """The stated certainty (1-5), or None."""
    if not text:
        return None
    t = _normalise(text)
    for pattern in _CERTAINTY:
        match = pattern.search(t)
        if match:
            return int(match.group(1))
    return None


def parse_justification(text: str | None) -> str:
    """The free-text justification: the ``Justification:`` section if there is one, else the reply without
    its answer and certainty lines."""
    if not text:
        return ""
    sections: dict[str, str] = {}
    marks = list(_SECTION.finditer(text))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        sections.setdefault(mark.group(1).lower(), text[mark.end():end].strip())
    for name in ("justification", "reasoning", "explanation"):
        if sections.get(name):
            return sections[name]
    if marks:
        kept = [text[: marks[0].start()]] + [text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))]
                                             for i, m in enumerate(marks) if m.group(1).lower() not in
                                             ("answer", "certainty", "confidence")]
        return " ".join(k.strip() for k in kept if k.strip())
    return text.strip()


def parse_features(text: str | None) -> dict[str, float]:
    """{feature key: points} for each line that names exactly one of the 19 features and gives a number."""
    if not text:
        return {}
    points: dict[str, float] = {}
    for line in _normalise(text).split("\n"):
        head, sep, tail = line.rpartition(":")
        name, value_text = (head, tail) if sep else (line, line)
        numbers = _NUMBER.findall(value_text)
        if not numbers:
            continue
        name = re.sub(r"\(.*?\)", " ", name)  # "inclusions (auer rods, ...)" -> "inclusions"
        hits = [key for key, pattern in _FEATURE_PATTERNS.items() if pattern.search(name)]
        if len(hits) == 1 and hits[0] not in points:
            points[hits[0]] = float(numbers[-1])
    return points


@dataclass(frozen=True)
class Answer:
    """What one reply says, as far as it can be read (None: not stated or not readable)."""

    label: str | None
    certainty: int | None = None
    justification: str = ""
    features: Mapping[str, float] | None = None

    @property
    def parsed(self) -> bool:
        return self.label is not None


def parse_answer(protocol: str, text: str | None) -> Answer:
    """Read a reply of `protocol`."""
    label = parse_label(text)
    if protocol == "explain":
        return Answer(label, parse_certainty(text), parse_justification(text))
    if protocol == "features":
        return Answer(label, features=parse_features(text))
    return Answer(label)
