"""Class and attribute prompts for zero-shot evaluation and extra text supervision.

The prompts live in an editable YAML (or JSON) file so that wording can be changed without touching
code; `load_prompts` checks it against the class and attribute vocabularies in
`hemaclip.data.attributes`, because a misspelt class name would otherwise silently drop a class from a
zero-shot classifier. Prompts are built CONCH / open_clip style: every class synonym is put into every
template, and the text embeddings of one class are later averaged.

Two wordings. The file's main sections are the *training* wording: training reads only them. Its
``heldout`` section is an *evaluation-only* wording with other sentence frames and other words for the
same classes and attribute values, so that zero-shot reading can be measured on phrasing the model never
read (`wording="heldout"`). :meth:`PromptSet.heldout_words` lists its words for the check that none of
them occurs in any training sentence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from hemaclip.data.attributes import ALL_CLASSES, ATTRIBUTES, PBC11_CLASSES, PBC_CLASSES, WBCATT_CLASSES
from hemaclip.errors import DataError
from hemaclip.text.captions import article

# Dataset name -> its class vocabulary (the order of classes is the order of logits).
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "wbcatt": WBCATT_CLASSES,
    "pbc": PBC_CLASSES,
    "pbc11": PBC11_CLASSES,
    "all": ALL_CLASSES,
}
PACKAGED_PROMPTS = ("configs", "prompts.yaml")  # inside the hemaclip package
PROMPT_FILE_VERSION = 1
PLACEHOLDER = "{}"
_TOP_LEVEL_KEYS = {"version", "templates", "datasets", "attributes", "shared_classes", "heldout"}
_HELDOUT_KEYS = {"shared_words", "templates", "classes", "attribute_frames", "attributes"}
# The two wordings of a prompt file: what training reads, and what only evaluation reads.
WORDINGS = ("train", "heldout")
WORDING_LABELS = {
    "train": "trained wording (the prompt file's training part: sentences the model was trained on)",
    "heldout": "unseen wording (the prompt file's held-out part: frames and words no training sentence uses)",
}
_WORD = re.compile(r"[a-z0-9][a-z0-9:'-]*")
_DATASET_KEYS = {"templates", "classes"}
_CLASS_KEYS = {"synonyms", "sentences"}
# YAML 1.1 reads unquoted yes/no as booleans; the attribute vocabulary spells them as strings.
_YAML_BOOLEANS = {True: "yes", False: "no"}

Template = str | Callable[[str], str]


# --------------------------------------------------------------------------------------------------
# Building prompts
# --------------------------------------------------------------------------------------------------

_ARTICLE_BEFORE_PLACEHOLDER = re.compile(r"\b([Aa])n? \{\}")


def fill_template(template: Template, phrase: str) -> str:
    """Put `phrase` into a template; "a {}" becomes "an {}" before a vowel ("an eosinophil")."""
    if callable(template):
        return template(phrase)

    def fix(match: re.Match[str]) -> str:
        chosen = article(phrase)
        return f"{chosen.capitalize() if match.group(1) == 'A' else chosen} {PLACEHOLDER}"

    return _ARTICLE_BEFORE_PLACEHOLDER.sub(fix, template).replace(PLACEHOLDER, phrase)


def build_prompts(
    classnames: Mapping[str, Sequence[str]] | Sequence[str], templates: Sequence[Template]
) -> dict[str, list[str]]:
    """Every synonym of every class in every template (open_clip style), duplicates removed.

    `classnames` is either {class: [synonyms]} or a list of class names (underscores read as spaces);
    templates are strings with one "{}" or callables taking the class phrase.
    """
    if not isinstance(classnames, Mapping):
        classnames = {name: [name.replace("_", " ")] for name in classnames}
    return {
        name: list(dict.fromkeys(fill_template(t, synonym) for synonym in synonyms for t in templates))
        for name, synonyms in classnames.items()
    }


# --------------------------------------------------------------------------------------------------
# The prompt set
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassText:
    """Names and descriptions of one class."""

    synonyms: tuple[str, ...]
    sentences: tuple[str, ...]


def words_of(text: str) -> list[str]:
    """Lower-case words of a text as the held-out check compares them ("N:C", "two-lobed", "100x" stay whole)."""
    return _WORD.findall(text.lower())


def naming_pattern(names: Sequence[str]) -> re.Pattern[str] | None:
    """A case-insensitive pattern that finds any of `names` as whole words, plural 's' allowed
    ("basophil" finds "Basophils" but not "basophilic"); None when there is no name."""
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})s?(?![\w-])", re.IGNORECASE)


@dataclass(frozen=True)
class HeldOutWording:
    """The evaluation-only wording: class frames per template set, class synonyms, attribute frames x phrases."""

    shared_words: frozenset[str]  # function words and names of cell parts, allowed on both sides
    templates: Mapping[str, tuple[str, ...]]  # template-set name -> frames
    synonyms: Mapping[str, tuple[str, ...]]  # class name -> synonyms
    attribute_frames: tuple[str, ...]
    attributes: Mapping[str, Mapping[str, tuple[str, ...]]]  # attribute -> value -> phrases

    def texts(self) -> list[str]:
        """Every frame, synonym and phrase (the material of held-out prompts)."""
        parts = [*self.attribute_frames, *(t for ts in self.templates.values() for t in ts)]
        parts += [s for ss in self.synonyms.values() for s in ss]
        parts += [p for values in self.attributes.values() for ps in values.values() for p in ps]
        return parts


@dataclass(frozen=True)
class PromptSet:
    """A validated prompt file: per-dataset templates and class texts, plus attribute prompts.

    Methods that return prompts take `wording`: "train" (default; the only wording training reads) or
    "heldout" (evaluation only).
    """

    source: str
    dataset_templates: Mapping[str, tuple[str, ...]]
    dataset_classes: Mapping[str, Mapping[str, ClassText]]
    attributes: Mapping[str, Mapping[str, tuple[str, ...]]] | None
    dataset_template_sets: Mapping[str, str | None] = field(default_factory=dict)  # named set per dataset, None if inline
    heldout: HeldOutWording | None = None

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(self.dataset_classes)

    def _dataset(self, dataset: str) -> Mapping[str, ClassText]:
        if dataset not in self.dataset_classes:
            known = ", ".join(self.dataset_classes) or "none"
            raise DataError(f"{self.source}: no prompts for dataset '{dataset}' (this file has: {known})")
        return self.dataset_classes[dataset]

    def classes(self, dataset: str) -> tuple[str, ...]:
        """Class names of `dataset` in vocabulary (logit) order."""
        self._dataset(dataset)
        return DATASET_CLASSES[dataset]

    def has_wording(self, wording: str, dataset: str | None = None) -> bool:
        """Whether this file has `wording` for `dataset`'s classes (None: for the attributes).

        Held-out class wording needs held-out frames for the dataset's template set and held-out
        synonyms for every one of its classes.
        """
        if wording not in WORDINGS:
            raise DataError(f"unknown wording '{wording}' (choose from {', '.join(WORDINGS)})")
        if wording == "train":
            return self.attributes is not None if dataset is None else dataset in self.dataset_classes
        if self.heldout is None:
            return False
        if dataset is None:
            return True
        return (dataset in self.dataset_classes and self.dataset_template_sets.get(dataset) in self.heldout.templates
                and all(c in self.heldout.synonyms for c in DATASET_CLASSES[dataset]))

    def _check_wording(self, wording: str, dataset: str | None) -> None:
        if not self.has_wording(wording, dataset):
            what = f"dataset '{dataset}'" if dataset else "the attributes"
            raise DataError(f"{self.source}: no {wording} wording for {what}")

    def templates(self, dataset: str, wording: str = "train") -> list[str]:
        self._dataset(dataset)
        if wording == "train":
            return list(self.dataset_templates[dataset])
        self._check_wording(wording, dataset)
        return list(self.heldout.templates[self.dataset_template_sets[dataset]])

    def synonyms(self, dataset: str, wording: str = "train") -> dict[str, list[str]]:
        table = self._dataset(dataset)
        if wording == "train":
            return {name: list(table[name].synonyms) for name in DATASET_CLASSES[dataset]}
        self._check_wording(wording, dataset)
        return {name: list(self.heldout.synonyms[name]) for name in DATASET_CLASSES[dataset]}

    def class_prompts(self, dataset: str, wording: str = "train") -> dict[str, list[str]]:
        """Full zero-shot prompts per class: synonyms x templates of the chosen wording."""
        return build_prompts(self.synonyms(dataset, wording), self.templates(dataset, wording))

    def class_sentences(self, dataset: str) -> dict[str, list[str]]:
        """Descriptive sentences per class (for training text or zero-shot ensembling)."""
        table = self._dataset(dataset)
        return {name: list(table[name].sentences) for name in DATASET_CLASSES[dataset]}

    def attribute_prompts(self, wording: str = "train") -> dict[str, dict[str, list[str]]]:
        """{attribute: {value: [prompts]}} for every WBCAtt attribute value, in vocabulary order.

        Held-out attribute prompts are every held-out phrase of a value in every held-out attribute frame.
        """
        if wording == "heldout":
            self._check_wording(wording, None)
            held = self.heldout
            return {name: {value: [fill_template(frame, phrase) for phrase in held.attributes[name][value]
                                   for frame in held.attribute_frames] for value in values}
                    for name, values in ATTRIBUTES.items()}
        if wording != "train":
            self._check_wording(wording, None)
        if self.attributes is None:
            raise DataError(f"{self.source}: the prompt file has no 'attributes' section")
        table = self.attributes
        return {name: {value: list(table[name][value]) for value in values} for name, values in ATTRIBUTES.items()}

    def class_names(self, classes: Sequence[str]) -> list[str]:
        """Every training name of `classes`: the class name itself (underscores as spaces) and its synonyms in
        any dataset of the file; what a sentence must not say for those classes to stay unseen in training."""
        names = [c.replace("_", " ") for c in classes]
        for table in self.dataset_classes.values():
            names += [s for c in classes if c in table for s in table[c].synonyms]
        return list(dict.fromkeys(names))

    def training_texts(self) -> list[str]:
        """Every sentence of the training wording, for every dataset: class prompts, class sentences,
        attribute prompts (what training may read from this file; captions come from text.captions)."""
        texts: list[str] = []
        for dataset in self.datasets:
            texts += [t for ts in self.class_prompts(dataset).values() for t in ts]
            texts += [t for ts in self.class_sentences(dataset).values() for t in ts]
        if self.attributes is not None:
            texts += [t for values in self.attribute_prompts().values() for ts in values.values() for t in ts]
        return list(dict.fromkeys(texts))

    def heldout_words(self) -> set[str]:
        """The held-out wording's own words: every word of its frames, synonyms and phrases except the
        declared shared words (articles, prepositions, names of cell parts). None may occur in training text."""
        if self.heldout is None:
            return set()
        words = {w for text in self.heldout.texts() for w in words_of(text.replace(PLACEHOLDER, " "))}
        return words - self.heldout.shared_words


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _read(path: str | Path | None) -> tuple[str, Any]:
    """Return (source name for messages, parsed document)."""
    if path is None:
        resource = resources.files("hemaclip").joinpath(*PACKAGED_PROMPTS)
        source, suffix = str(resource), ".yaml"
        try:
            text = resource.read_text(encoding="utf-8")
        except OSError as err:
            raise DataError(f"{source}: packaged prompt file cannot be read ({err.strerror or err})") from err
    else:
        p = Path(path)
        source, suffix = str(p), p.suffix.lower()
        if not p.is_file():
            raise DataError(f"{source}: prompt file does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{source}: prompt file cannot be read ({err})") from err
    if suffix == ".json":
        try:
            return source, json.loads(text)
        except ValueError as err:  # json.JSONDecodeError
            raise DataError(f"{source}: not valid JSON ({err})") from err
    import yaml

    try:
        return source, yaml.safe_load(text)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())  # PyYAML messages span several lines
        raise DataError(f"{source}: not valid YAML ({detail})") from err


class _Checker:
    """Validation helpers that raise one-line DataErrors naming the file and the offending key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str) -> NoReturn:
        raise DataError(f"{self.source}: {message}")

    def mapping(self, value: Any, where: str) -> Mapping[Any, Any]:
        if not isinstance(value, Mapping):
            self.fail(f"{where} must be a mapping, got {type(value).__name__}")
        return value

    def texts(self, value: Any, where: str, placeholder: bool = False) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            self.fail(f"{where} must be a non-empty list of strings")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                self.fail(f"{where} holds an empty or non-string entry: {item!r}")
            if placeholder and item.count(PLACEHOLDER) != 1:
                self.fail(f"{where}: template {item!r} must contain exactly one '{PLACEHOLDER}'")
        return tuple(s.strip() for s in value)

    def keys(self, table: Mapping[Any, Any], allowed: set[str], where: str) -> None:
        unknown = sorted(str(k) for k in table if k not in allowed)
        if unknown:
            self.fail(f"unknown key(s) {', '.join(unknown)} in {where} (allowed: {', '.join(sorted(allowed))})")


def _templates(check: _Checker, doc: Mapping[Any, Any]) -> dict[str, tuple[str, ...]]:
    sets = check.mapping(doc.get("templates", {}), "'templates'")
    return {str(name): check.texts(items, f"templates.{name}", placeholder=True) for name, items in sets.items()}


def _dataset(
    check: _Checker, name: str, spec: Any, template_sets: Mapping[str, tuple[str, ...]]
) -> tuple[tuple[str, ...], dict[str, ClassText], str | None]:
    spec = check.mapping(spec, f"datasets.{name}")
    check.keys(spec, _DATASET_KEYS, f"datasets.{name}")
    ref = spec.get("templates")
    set_name = ref if isinstance(ref, str) else None
    if isinstance(ref, str):
        if ref not in template_sets:
            defined = ", ".join(template_sets) or "none"
            check.fail(f"datasets.{name}.templates names unknown template set '{ref}' (defined: {defined})")
        templates = template_sets[ref]
    elif ref is None:
        check.fail(f"datasets.{name} has no 'templates' (a template-set name or a list)")
    else:
        templates = check.texts(ref, f"datasets.{name}.templates", placeholder=True)

    vocabulary = DATASET_CLASSES[name]
    classes = check.mapping(spec.get("classes"), f"datasets.{name}.classes")
    extra = [str(c) for c in classes if c not in vocabulary]
    if extra:
        check.fail(
            f"datasets.{name}: class(es) {', '.join(extra)} not in the {name} vocabulary ({', '.join(vocabulary)})"
        )
    missing = [c for c in vocabulary if c not in classes]
    if missing:
        check.fail(f"datasets.{name}: missing class(es) {', '.join(missing)}")
    table: dict[str, ClassText] = {}
    for cls in vocabulary:
        where = f"datasets.{name}.classes.{cls}"
        entry = check.mapping(classes[cls], where)
        check.keys(entry, _CLASS_KEYS, where)
        table[cls] = ClassText(
            synonyms=check.texts(entry.get("synonyms"), f"{where}.synonyms"),
            sentences=check.texts(entry.get("sentences"), f"{where}.sentences"),
        )
    return templates, table, set_name


def _attributes(check: _Checker, spec: Any, where: str = "attributes") -> dict[str, dict[str, tuple[str, ...]]]:
    spec = check.mapping(spec, f"'{where}'")
    check.keys(spec, set(ATTRIBUTES), where)
    result: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, values in ATTRIBUTES.items():
        if name not in spec:
            check.fail(f"{where}: missing attribute '{name}'")
        raw = check.mapping(spec[name], f"{where}.{name}")
        given = {_YAML_BOOLEANS[k] if isinstance(k, bool) else str(k): v for k, v in raw.items()}
        check.keys(given, set(values), f"{where}.{name}")
        missing = [v for v in values if v not in given]
        if missing:
            check.fail(f"{where}.{name}: missing value(s) {', '.join(missing)}")
        result[name] = {v: check.texts(given[v], f"{where}.{name}.{v}") for v in values}
    return result


def _heldout(check: _Checker, spec: Any, template_sets: Mapping[str, tuple[str, ...]]) -> HeldOutWording:
    """The evaluation-only section: frames for named template sets, synonyms of known classes, attribute phrases."""
    spec = check.mapping(spec, "'heldout'")
    check.keys(spec, _HELDOUT_KEYS, "heldout")
    missing = sorted(_HELDOUT_KEYS - set(spec))
    if missing:
        check.fail(f"heldout: missing key(s) {', '.join(missing)}")
    sets = check.mapping(spec["templates"], "heldout.templates")
    unknown = [str(n) for n in sets if n not in template_sets]
    if unknown:
        check.fail(f"heldout.templates: {', '.join(unknown)} not a template set of the file ({', '.join(template_sets)})")
    known_classes = {c for classes in DATASET_CLASSES.values() for c in classes}
    classes = check.mapping(spec["classes"], "heldout.classes")
    unknown = [str(c) for c in classes if c not in known_classes]
    if unknown:
        check.fail(f"heldout.classes: unknown class(es) {', '.join(unknown)}")
    return HeldOutWording(
        shared_words=frozenset(w.lower() for w in check.texts(spec["shared_words"], "heldout.shared_words")),
        templates={str(n): check.texts(items, f"heldout.templates.{n}", placeholder=True) for n, items in sets.items()},
        synonyms={str(c): check.texts(items, f"heldout.classes.{c}") for c, items in classes.items()},
        attribute_frames=check.texts(spec["attribute_frames"], "heldout.attribute_frames", placeholder=True),
        attributes=_attributes(check, spec["attributes"], "heldout.attributes"),
    )


def load_prompts(path: str | Path | None = None) -> PromptSet:
    """Load and validate a prompt file (None = the packaged `configs/prompts.yaml`).

    Raises DataError (one line, naming the file) for an unknown dataset, a missing class, a class outside
    the dataset's vocabulary, a template without exactly one "{}", or missing attribute values.
    """
    source, doc = _read(path)
    check = _Checker(source)
    doc = check.mapping(doc, "the prompt file")
    check.keys(doc, _TOP_LEVEL_KEYS, "the prompt file")
    version = doc.get("version", PROMPT_FILE_VERSION)
    if version != PROMPT_FILE_VERSION:
        check.fail(f"unsupported prompt file version {version!r} (expected {PROMPT_FILE_VERSION})")
    template_sets = _templates(check, doc)
    datasets = check.mapping(doc.get("datasets"), "'datasets'")
    if not datasets:
        check.fail("'datasets' is empty")
    unknown = [str(d) for d in datasets if d not in DATASET_CLASSES]
    if unknown:
        check.fail(f"unknown dataset(s) {', '.join(unknown)} (known: {', '.join(DATASET_CLASSES)})")
    templates: dict[str, tuple[str, ...]] = {}
    classes: dict[str, dict[str, ClassText]] = {}
    set_names: dict[str, str | None] = {}
    for name in DATASET_CLASSES:
        if name in datasets:
            templates[name], classes[name], set_names[name] = _dataset(check, name, datasets[name], template_sets)
    attributes = _attributes(check, doc["attributes"]) if doc.get("attributes") is not None else None
    heldout = _heldout(check, doc["heldout"], template_sets) if doc.get("heldout") is not None else None
    return PromptSet(source=source, dataset_templates=templates, dataset_classes=classes, attributes=attributes,
                     dataset_template_sets=set_names, heldout=heldout)
