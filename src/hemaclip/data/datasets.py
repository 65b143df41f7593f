"""Datasets as lists of records: PBC (8 and 11 classes), WBCAtt, the ALL set, and any user folder.

Every loader returns a `CellDataset` whose records carry the image path, class, split and (where
known) the 11 WBCAtt attributes. Loaders are registered by name in `DATASETS`; add one by
decorating a function with `@register_dataset("name")`.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hemaclip.data.attributes import (
    ALL_CLASSES,
    ALL_FOLDERS,
    ATTRIBUTE_NAMES,
    PBC11_CLASSES,
    PBC11_PREFIXES,
    PBC_CLASSES,
    WBCATT_CLASSES,
    validate_attributes,
)
from hemaclip.data.dedupe import DuplicateReport, deduplicate
from hemaclip.data.preprocess import SKIPPED_NAMES_SHOWN, is_image_file, skipped_files_message
from hemaclip.data.paths import resolve_data_root
from hemaclip.data.splits import SPLIT_NAMES, SplitFractions, saved_or_new_split, stratified_split
from hemaclip.errors import DataError
from hemaclip.log import get_logger

logger = get_logger(__name__)

PBC_DIR = "PBC_dataset_normal_DIB"
WBCATT_DIR = "wbcatt"
ALL_DIR = "all_aria"
WBCATT_CSV = "pbc_attr_v1_{split}.csv"
WBCATT_REQUIRED_COLUMNS = ("img_name", "label", *ATTRIBUTE_NAMES, "path")
# Fractions for PBC classes that WBCAtt does not split: the WBCAtt proportions (about 60/10/30).
PBC_FRACTIONS = SplitFractions(val=0.1, test=0.3)
ALL_FRACTIONS = SplitFractions(val=0.1, test=0.2)
# The datasets found under the data root that `data summary` and the demo list (not 'folder').
BUNDLED_DATASETS: tuple[str, ...] = ("wbcatt", "pbc", "pbc11", "all", "lisc", "zheng1", "zheng2")
# Laboratory of each bundled set (PBC and WBCAtt: Hospital Clinic of Barcelona, CellaVision DM96).
PBC_LAB = "pbc-barcelona"
ALL_LAB = "aria-all"


@dataclass(frozen=True)
class CellRecord:
    """One image: where it is, its class, its split and, if annotated, its 11 WBCAtt attributes.

    `lab` names the laboratory/scanner the image comes from (other-lab studies score a lab only with
    models trained without it); `group` ties near-duplicate crops of one source cell together (they
    never cross splits); `mask_path` points at an expert nucleus/cytoplasm mask where one exists.
    """

    path: Path
    label: str
    split: str
    attributes: dict[str, str] | None = None
    fine_label: str | None = None
    lab: str = ""
    group: str | None = None
    mask_path: Path | None = None


@dataclass
class LoadOptions:
    """What every loader needs: the data root, where to save splits it makes, and the split seed."""

    data_root: Path
    split_dir: Path | None = None
    seed: int = 0
    folder: Path | None = None
    attributes_csv: Path | None = None


@dataclass
class CellDataset:
    """A loaded dataset: its class vocabulary, records, and what loading found (counts, duplicates)."""

    name: str
    classes: tuple[str, ...]
    records: list[CellRecord]
    files_found: int
    duplicates: DuplicateReport | None = None
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[CellRecord]:
        if name not in SPLIT_NAMES and name != "all":
            raise DataError(f"unknown split '{name}' for dataset {self.name}; choose from {', '.join(SPLIT_NAMES)} or all")
        return list(self.records) if name == "all" else [r for r in self.records if r.split == name]

    @property
    def has_attributes(self) -> bool:
        return any(r.attributes is not None for r in self.records)

    def summary(self, root: Path | None = None) -> dict:
        """Counts per split and class, as plain JSON-able data."""
        per_split = {
            split: dict(sorted(Counter(r.label for r in self.records if r.split == split).items())) for split in SPLIT_NAMES
        }
        groups: dict[str, set[str]] = {}
        for record in self.records:
            if record.group is not None:
                groups.setdefault(record.group, set()).add(record.split)
        return {
            "dataset": self.name,
            "labs": dict(sorted(Counter(r.lab for r in self.records).items())),
            "classes": list(self.classes),
            "files_found": self.files_found,
            "records": len(self.records),
            "split_sizes": {split: sum(counts.values()) for split, counts in per_split.items()},
            "per_split_class": per_split,
            "duplicates": self.duplicates.to_dict(root) if self.duplicates else None,
            "has_attributes": self.has_attributes,
            "groups": {"count": len(groups), "split_across": sum(len(s) > 1 for s in groups.values())} if groups else None,
            "notes": self.notes,
        }


Loader = Callable[[LoadOptions], CellDataset]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def decorate(loader: Loader) -> Loader:
        DATASETS[name] = loader
        return loader

    return decorate


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    split_dir: str | Path | None = None,
    seed: int = 0,
    folder: str | Path | None = None,
    attributes_csv: str | Path | None = None,
) -> CellDataset:
    """Load dataset `name` ('pbc', 'pbc11', 'wbcatt', 'all' or 'folder').

    `split_dir` is where splits made here are saved (and reused); None keeps them in memory only.
    For 'folder', `folder` is the ImageFolder root (defaults to `data_root`).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose from {', '.join(sorted(DATASETS))}")
    root = resolve_data_root(folder if (name == "folder" and folder is not None) else data_root)
    options = LoadOptions(
        data_root=root,
        split_dir=Path(split_dir) if split_dir is not None else None,
        seed=seed,
        folder=Path(folder) if folder is not None else None,
        attributes_csv=Path(attributes_csv) if attributes_csv is not None else None,
    )
    return DATASETS[name](options)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def clean_csv_row(row: dict, path: Path, line: int) -> dict[str, str]:
    """Strip keys and values of a DictReader row; a row with more fields than the header is an error
    (its values would be silently misaligned) unless the extra fields are empty (trailing commas)."""
    extra = row.pop(None, None)
    if extra and any((v or "").strip() for v in extra):
        raise DataError(f"{path}:{line}: row has {len(extra)} more field(s) than the header")
    return {(k or "").strip(): (v or "").strip() for k, v in row.items()}


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Read a CSV (BOM tolerated), raising a one-line `DataError` naming the file for missing columns."""
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [clean_csv_row(row, path, reader.line_num) for row in reader]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text CSV") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _wbcatt_rows(root: Path) -> dict[str, list[dict[str, str]]]:
    folder = _require_dir(root / WBCATT_DIR, "WBCAtt")
    return {split: read_csv_rows(folder / WBCATT_CSV.format(split=split), WBCATT_REQUIRED_COLUMNS) for split in SPLIT_NAMES}


def _wbcatt_record(row: dict[str, str], split: str, root: Path, source: str) -> CellRecord:
    label = row["label"].lower()
    if label not in WBCATT_CLASSES:
        raise DataError(f"{source}: unknown label {row['label']!r} (expected one of {', '.join(WBCATT_CLASSES)})")
    return CellRecord(
        path=root / row["path"],
        label=label,
        split=split,
        attributes=validate_attributes(row, source),
        fine_label=row["img_name"].split("_")[0],
        lab=PBC_LAB,
    )


@register_dataset("wbcatt")
def load_wbcatt(options: LoadOptions) -> CellDataset:
    """WBCAtt with its official train/val/test split (5 WBC classes, 11 attributes per image), byte-identical
    copies removed: of a group the copy in the earliest split stays (train, then val, then test), so no val or
    test image is a copy of an image in an earlier split; a group filed under two classes goes entirely."""
    root = options.data_root
    records: list[CellRecord] = []
    for split, rows in _wbcatt_rows(root).items():
        csv_path = root / WBCATT_DIR / WBCATT_CSV.format(split=split)
        for line, row in enumerate(rows, start=2):
            records.append(_wbcatt_record(row, split, root, f"{csv_path}:{line}"))
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: image listed in WBCAtt CSV not found ({len(missing)} missing in all)")
    by_path = {r.path: r for r in records}
    kept, report = deduplicate(by_path, {p: r.label for p, r in by_path.items()}, rank=lambda p: (split_rank(by_path[p].split), p))
    report = dataclasses.replace(report, dropped_by_split=dict(Counter(by_path[p].split for p in report.dropped)))
    note = (f"{len(report.dropped)} byte-identical copies dropped (by split: {report.dropped_by_split}); the copy in the earliest "
            "split is kept, a group filed under two classes is dropped entirely") if report.dropped else "no byte-identical copies"
    kept_set = set(kept)
    return CellDataset(name="wbcatt", classes=WBCATT_CLASSES, records=[r for r in records if r.path in kept_set],
                       files_found=len(records), duplicates=report, notes=[note])


def split_rank(split: str) -> int:
    """Order of splits for keeping one copy of a duplicate: train first, then val, then test."""
    return SPLIT_NAMES.index(split)


def _pbc_files(root: Path) -> dict[Path, str]:
    pbc = _require_dir(root / PBC_DIR, "PBC")
    labels: dict[Path, str] = {}
    for cls in PBC_CLASSES:
        for path in _list_images(_require_dir(pbc / cls, f"PBC class '{cls}'")):
            labels[path] = cls
    return labels


def _pbc_records(options: LoadOptions) -> tuple[list[CellRecord], int, DuplicateReport, list[str]]:
    """Deduplicated PBC records; WBC images keep their WBCAtt split, the rest get a seeded stratified split."""
    root = options.data_root
    labels = _pbc_files(root)
    notes: list[str] = []
    official: dict[Path, tuple[str, dict[str, str]]] = {}
    if (root / WBCATT_DIR).is_dir():
        for split, rows in _wbcatt_rows(root).items():
            for row in rows:
                official[(root / row["path"]).resolve()] = (split, row)
    # Of identical copies, keep one with WBCAtt's earliest split (as the wbcatt loader does), else the first path.
    def rank(path: Path) -> tuple[int, Path]:
        entry = official.get(path.resolve())
        return (split_rank(entry[0]) if entry else len(SPLIT_NAMES), path)

    kept, report = deduplicate(labels, labels, rank=rank)
    if official:
        notes.append("PBC images annotated by WBCAtt keep WBCAtt's official split; the others are split 60/10/30 by class")
    else:
        notes.append("WBCAtt CSVs absent: every PBC class is split 60/10/30 by class")
    unsplit = [p for p in kept if p.resolve() not in official]
    key_of = {p: str(p.relative_to(root)) for p in unsplit}
    split_file = options.split_dir / f"pbc_seed{options.seed}.csv" if options.split_dir else None
    assignment = saved_or_new_split(
        split_file, [key_of[p] for p in unsplit], [labels[p] for p in unsplit], PBC_FRACTIONS, options.seed
    )
    records = []
    for path in kept:
        entry = official.get(path.resolve())
        split = entry[0] if entry else assignment[key_of[path]]
        attributes = validate_attributes(entry[1], str(path)) if entry else None
        records.append(
            CellRecord(path=path, label=labels[path], split=split, attributes=attributes, fine_label=path.name.split("_")[0], lab=PBC_LAB)
        )
    return records, len(labels), report, notes


@register_dataset("pbc")
def load_pbc(options: LoadOptions) -> CellDataset:
    """PBC, 8 classes, byte-identical duplicates removed."""
    records, found, report, notes = _pbc_records(options)
    return CellDataset(name="pbc", classes=PBC_CLASSES, records=records, files_found=found, duplicates=report, notes=notes)


@register_dataset("pbc11")
def load_pbc11(options: LoadOptions) -> CellDataset:
    """PBC, 11 classes from file-name prefixes; images with the unlabelled IG/NEUTROPHIL prefixes are left out."""
    records, found, report, notes = _pbc_records(options)
    fine = [
        CellRecord(
            path=r.path, label=PBC11_PREFIXES[r.fine_label], split=r.split, attributes=r.attributes, fine_label=r.fine_label, lab=r.lab
        )
        for r in records
        if r.fine_label in PBC11_PREFIXES
    ]
    left_out = Counter(r.fine_label for r in records if r.fine_label not in PBC11_PREFIXES)
    notes = [*notes, f"left out (no fine label): {dict(sorted(left_out.items()))}"]
    return CellDataset(name="pbc11", classes=PBC11_CLASSES, records=fine, files_found=found, duplicates=report, notes=notes)


@register_dataset("all")
def load_all(options: LoadOptions) -> CellDataset:
    """The ALL set (benign hematogones, early pre-B, pre-B, pro-B), duplicates removed, seeded 70/10/20 split."""
    root = _require_dir(options.data_root / ALL_DIR, "ALL (all_aria)")
    labels: dict[Path, str] = {}
    for folder, cls in ALL_FOLDERS.items():
        for path in _list_images(_require_dir(root / folder, f"ALL class '{folder}'")):
            labels[path] = cls
    kept, report = deduplicate(labels, labels)
    keys = {p: str(p.relative_to(options.data_root)) for p in kept}
    split_file = options.split_dir / f"all_seed{options.seed}.csv" if options.split_dir else None
    assignment = saved_or_new_split(split_file, list(keys.values()), [labels[p] for p in kept], ALL_FRACTIONS, options.seed)
    records = [CellRecord(path=p, label=labels[p], split=assignment[keys[p]], lab=ALL_LAB) for p in kept]
    return CellDataset(name="all", classes=ALL_CLASSES, records=records, files_found=len(labels), duplicates=report)


@register_dataset("folder")
def load_folder(options: LoadOptions) -> CellDataset:
    """A user folder in ImageFolder layout (`ROOT/<class>/<image>`), with an optional attributes CSV.

    The CSV (default `ROOT/attributes.csv` if present) has `img_name` (file name) or `path` (relative
    to ROOT), the 11 attribute columns and optionally a `split` column; without one a seeded stratified
    70/10/20 split is made and saved.
    """
    root = options.folder or options.data_root
    root = _require_dir(root, "image")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    labels: dict[Path, str] = {}
    skipped: list[Path] = []
    for class_dir in class_dirs:  # a symlinked class folder is a folder too (is_dir follows links)
        for path in _list_images(class_dir):
            labels[path] = class_dir.name
        skipped += sorted(p for p in class_dir.iterdir() if p.is_file() and not is_image_file(p))
    if skipped:
        logger.warning("%s", skipped_files_message(skipped))
    if not labels:
        raise DataError(f"{root}: no images found (expected ROOT/<class>/<image>.jpg)")
    csv_path = options.attributes_csv or (root / "attributes.csv" if (root / "attributes.csv").is_file() else None)
    attributes: dict[Path, dict[str, str]] = {}
    splits: dict[Path, str] = {}
    csv_line: dict[Path, int] = {}
    if csv_path is not None:
        rows = read_csv_rows(csv_path, ATTRIBUTE_NAMES)
        by_name: dict[str, Path] = {p.name: p for p in labels}
        for line, row in enumerate(rows, start=2):
            source = f"{csv_path}:{line}"
            if not (row.get("path") or row.get("img_name")):
                raise DataError(f"{csv_path}: needs an 'img_name' or 'path' column")
            # `path` relative to ROOT wins; else the file name (`img_name`, or the last part of `path`).
            path = root / row["path"] if row.get("path") else None
            if path not in labels:
                name = row.get("img_name") or Path(row["path"]).name
                path = by_name.get(name, root / name)
            if path not in labels:
                raise DataError(f"{source}: image {path.name!r} is not in any class folder of {root}")
            if path in csv_line:  # two rows for one image: which attributes and split hold would be a guess
                raise DataError(f"{source}: image {path.name!r} has a row already (line {csv_line[path]}); "
                                "keep one row per image")
            csv_line[path] = line
            attributes[path] = validate_attributes(row, source)
            if row.get("split"):
                if row["split"] not in SPLIT_NAMES:
                    raise DataError(f"{source}: unknown split {row['split']!r}")
                splits[path] = row["split"]
    kept, report = deduplicate(labels, labels)
    if splits:  # a split column says where each image goes: all of them, or it is a mistake
        missing = [p for p in kept if p not in splits]
        if missing:
            where = [f"line {csv_line[p]}" if p in csv_line else f"{p.name} (no row)" for p in missing[:SKIPPED_NAMES_SHOWN]]
            raise DataError(f"{csv_path}: the 'split' column is filled for {len(kept) - len(missing)} of {len(kept)} images; "
                            f"{len(missing)} have none ({', '.join(where)}{' ...' if len(missing) > len(where) else ''}); "
                            "fill it for every image or leave it empty for a seeded split")
        assignment = {p: splits[p] for p in kept}
    else:
        keys = {p: str(p.relative_to(root)) for p in kept}
        split_file = options.split_dir / f"folder_{root.name}_seed{options.seed}.csv" if options.split_dir else None
        by_key = saved_or_new_split(split_file, list(keys.values()), [labels[p] for p in kept], ALL_FRACTIONS, options.seed)
        assignment = {p: by_key[keys[p]] for p in kept}
    lab = f"folder:{root.name}"
    records = [CellRecord(path=p, label=labels[p], split=assignment[p], attributes=attributes.get(p), lab=lab) for p in kept]
    classes = tuple(d.name for d in class_dirs if any(labels[p] == d.name for p in labels))
    return CellDataset(name="folder", classes=classes, records=records, files_found=len(labels), duplicates=report)


__all__ = [
    "CellDataset",
    "CellRecord",
    "clean_csv_row",
    "DATASETS",
    "LoadOptions",
    "load_dataset",
    "read_csv_rows",
    "register_dataset",
    "stratified_split",
]


# The other laboratories' sets register themselves on import (kept in their own module).
from hemaclip.data import other_labs as _other_labs  # noqa: E402,F401
