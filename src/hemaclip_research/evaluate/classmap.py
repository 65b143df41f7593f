"""Class maps for out-of-distribution folders: folder class names onto one prompt-set dataset's classes."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hemaclip.errors import DataError

__all__ = ["ClassMapping", "load_class_map", "resolve_class_map"]

_NO_TARGET = {"", "-", "none", "null", "unmapped", "n/a"}
_HEADER_FIRST = {"folder", "folder_class", "folder class", "source", "from", "name", "folder_name"}
_HEADER_SECOND = {"class", "prompt_class", "prompt class", "target", "to", "label", "maps_to", "dataset_class"}


def load_class_map(path: str | Path) -> tuple[list[tuple[str, str | None]], str | None]:
    """Read a class map: JSON ``{folder_class: prompt_class}`` (or ``{"dataset": "pbc", "classes": {...}}``)
    or a two-column CSV/TSV ``folder_class,prompt_class`` (an optional header row such as
    ``folder,class`` is skipped). A null / empty / "-" target marks a folder
    class as deliberately unmapped. Returns (rows, dataset hint or None); one-line DataError if unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class map file does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: class map cannot be read ({err})") from err
    hint: str | None = None
    rows: list[tuple[str, str | None]] = []
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except ValueError as err:
            raise DataError(f"{path}: class map is not valid JSON ({err})") from err
        if not isinstance(doc, Mapping):
            raise DataError(f"{path}: class map must be a JSON object {{folder_class: prompt_class}}")
        if "classes" in doc or "map" in doc:
            hint = doc.get("dataset")
            if hint is not None and not isinstance(hint, str):
                raise DataError(f"{path}: 'dataset' must be a dataset name string")
            doc = doc.get("classes", doc.get("map"))
            if not isinstance(doc, Mapping):
                raise DataError(f"{path}: 'classes' must be an object {{folder_class: prompt_class}}")
        for key, value in doc.items():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: target of '{key}' must be a class name string or null, got {value!r}")
            rows.append((str(key).strip(), None if value is None else value))
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in text and "," not in text) else ","
        try:
            parsed = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if any(c.strip() for c in r)]
        except csv.Error as err:
            raise DataError(f"{path}: class map is not a valid CSV ({err})") from err
        if parsed and len(parsed[0]) == 2 and (
            parsed[0][0].strip().lower() in _HEADER_FIRST or parsed[0][1].strip().lower() in _HEADER_SECOND
        ):
            parsed = parsed[1:]
        for number, row in enumerate(parsed, start=1):
            if len(row) != 2:
                raise DataError(
                    f"{path}: class map row {number} has {len(row)} columns; need exactly two (folder class, prompt class)"
                )
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise DataError(f"{path}: class map is empty")
    return rows, hint


def _norm_class(name: str) -> str:
    return name.strip().lower()


@dataclass
class ClassMapping:
    """Folder classes resolved onto one prompt-set dataset's classes."""

    prompt_dataset: str
    mapping: dict[str, str]  # folder class -> prompt class
    unmapped: dict[str, str]  # folder class -> reason
    source: str = "identity"
    targets: list[str] = field(default_factory=list)


def resolve_class_map(
    rows: Sequence[tuple[str, str | None]] | None,
    folder_classes: Sequence[str],
    prompt_datasets: Mapping[str, Sequence[str]],
    hint: str | None = None,
    source: str = "class map",
) -> ClassMapping:
    """Map folder classes onto the classes of one prompt-set dataset (see :func:`load_class_map`).

    The dataset is `hint` when given, else the one whose vocabulary contains the most distinct
    targets (ties: the smaller vocabulary, then prompt-file order). Folder classes missing from the
    map, mapped to nothing, or mapped to a name outside that vocabulary are returned in
    ``unmapped`` with the reason. `rows=None` maps every folder class onto itself.
    """
    folder_set = list(folder_classes)
    if rows is None:
        rows = [(c, c) for c in folder_set]
    unknown = [k for k, _ in rows if k not in folder_set]
    if unknown:
        raise DataError(
            f"{source}: names folder class(es) {', '.join(repr(u) for u in unknown)} that the folder does not have "
            f"(folder classes: {', '.join(folder_set)})"
        )
    seen = Counter(k for k, _ in rows)
    twice = [k for k, c in seen.items() if c > 1]
    if twice:
        raise DataError(f"{source}: folder class(es) {', '.join(twice)} mapped more than once")

    def lookup(target: str, vocab: Sequence[str]) -> str | None:
        t = _norm_class(target)
        for cand in (t, t.replace(" ", "_"), t.replace("_", " ")):
            if cand in vocab:
                return cand
        return None

    targets = [v for _, v in rows if v is not None and _norm_class(v) not in _NO_TARGET]
    if hint is not None:
        if hint not in prompt_datasets:
            raise DataError(f"{source}: unknown dataset '{hint}' (prompt datasets: {', '.join(prompt_datasets)})")
        best = hint
    else:
        order = list(prompt_datasets)
        scored = [
            (len({lookup(t, prompt_datasets[d]) for t in targets} - {None}), -len(prompt_datasets[d]), -order.index(d), d)
            for d in order
        ]
        best_score = max(scored)
        if best_score[0] == 0:
            kinds = "; ".join(f"{d}: {', '.join(v)}" for d, v in prompt_datasets.items())
            what = "folder class names" if source == "identity" else "class map targets"
            raise DataError(
                f"{source}: none of the {what} ({', '.join(sorted(set(targets))) or 'none'}) is a prompt class of any dataset "
                f"({kinds}); pass a class map that names them"
            )
        best = best_score[3]
    vocab = list(prompt_datasets[best])
    mapping: dict[str, str] = {}
    unmapped: dict[str, str] = {}
    given = dict(rows)
    for folder_class in folder_set:
        if folder_class not in given:
            unmapped[folder_class] = "not in the class map"
            continue
        target = given[folder_class]
        if target is None or _norm_class(target) in _NO_TARGET:
            unmapped[folder_class] = "mapped to nothing in the class map"
            continue
        hit = lookup(target, vocab)
        if hit is None:
            unmapped[folder_class] = f"'{target}' is not a '{best}' prompt class"
        else:
            mapping[folder_class] = hit
    if not mapping:
        raise DataError(f"{source}: no folder class maps onto a '{best}' prompt class ({', '.join(vocab)})")
    ordered_targets = [c for c in vocab if c in set(mapping.values())]
    return ClassMapping(prompt_dataset=best, mapping=mapping, unmapped=unmapped, source=source, targets=ordered_targets)
