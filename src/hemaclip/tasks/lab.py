"""A lab as a named profile: its cells, which of them a person should label first, their labels, and the read-out
fitted on them (:mod:`hemaclip.tasks.onboarding`).

On disk, one folder per lab under the labs folder (``--labs``, else ``$HEMACLIP_LABS``, else
``~/.local/share/hemaclip/labs``)::

    NAME/profile.json   what the profile was built from: folder, model (SHA-1), towers, budget, format
    NAME/cells.npz      every cell read: source, cell number, source-cell group, features per tower, model probabilities
    NAME/to_label.csv   the cells chosen for labelling, in the order a person should label them
    NAME/labels.csv     labels given so far (source, cell, label, origin)
    NAME/head.npz       the fitted read-out (after `hemaclip lab fit`)

Every file is written atomically; a profile made with another model or another profile format is refused in one
line (its features belong to other weights).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.data.datasets import read_csv_rows
from hemaclip.errors import HemaclipError
from hemaclip.io import atomic_write, path_to_text, text_to_path

if TYPE_CHECKING:
    from hemaclip.tasks.describe import CellDescription, Describer
    from hemaclip.tasks.onboarding import LabHead

__all__ = ["LAB_FORMAT", "TOWERS", "LabProfile", "add_lab", "fit_lab", "labs_dir", "read_with_lab"]

LAB_FORMAT = 1
PROFILE, CELLS, TO_LABEL, LABELS, HEAD = "profile.json", "cells.npz", "to_label.csv", "labels.csv", "head.npz"
TUNED_MODEL, TUNED_CELLS = "model.pt", "tuned_cells.npz"  # after `lab fit --fine-tune`
REFERENCE_PER_CLASS = 40  # training-lab (PBC train) cells per class mixed into each fine-tune
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def labs_dir(explicit: str | Path | None = None) -> Path:
    """Where lab profiles live: `explicit`, else $HEMACLIP_LABS, else $XDG_DATA_HOME/hemaclip/labs."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("HEMACLIP_LABS"):
        return Path(os.environ["HEMACLIP_LABS"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "hemaclip" / "labs"


def check_name(name: str) -> str:
    if not name or not set(name) <= NAME_CHARS or name.startswith("."):
        raise HemaclipError(f"lab name '{name}': use letters, digits, '-', '_' and '.' only (not starting with '.')")
    return name


# ---------------------------------------------------------------- feature towers


def _model_tower(descriptions: Sequence[CellDescription], describer: Describer) -> np.ndarray:
    return np.stack([d.embedding for d in descriptions]).astype(np.float32)


def _dinov2_tower(descriptions: Sequence[CellDescription], describer: Describer) -> np.ndarray:
    """Frozen DINOv2 ViT-S/14 features (class token and mean patch token) of each described cell, at 224 px."""
    from hemaclip.data.preprocess import decode_image
    from hemaclip.models.dinov2 import DINOV2_IMAGE_SIZE, frozen_dinov2

    extractor = frozen_dinov2()
    arrays = [describer.preprocess.views(decode_image(d.source), size=DINOV2_IMAGE_SIZE)[d.cell].array for d in descriptions]
    return extractor(arrays)


TOWERS: dict[str, Callable[[Sequence[Any], Any], np.ndarray]] = {"model": _model_tower, "dinov2": _dinov2_tower}


def check_towers(towers: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in towers.split(",")] if isinstance(towers, str) else list(towers)
    unknown = [t for t in names if t not in TOWERS]
    if unknown or not names:
        raise HemaclipError(f"unknown tower(s) {unknown or names}: choose from {', '.join(TOWERS)}")
    return names


def tower_features(towers: Sequence[str], descriptions: Sequence[CellDescription], describer: Describer,
                   batch: int = 64) -> np.ndarray:
    """[N, D] features of `descriptions`: each tower's block, concatenated in `towers` order."""
    blocks = []
    for name in towers:
        parts = [TOWERS[name](descriptions[i:i + batch], describer) for i in range(0, len(descriptions), batch)]
        blocks.append(np.concatenate(parts) if parts else np.zeros((0, 0), np.float32))
    return np.concatenate(blocks, axis=1)


def selection_columns(towers: Sequence[str], width: int, model_width: int) -> np.ndarray:
    """The feature columns `lab add` chooses cells on: the model tower's block when the profile has one, else all.

    Why: the selection rules were compared on the model's own embedding (bench.lab_selection); with DINOv2's 768
    columns beside it, choosing on every tower gave the two-tower read-out a lower mean macro F1 over the labs' val
    parts (bench/results/lab_selection_space.json); the read-out itself still uses every tower."""
    towers = list(towers)
    if "model" not in towers:
        return np.arange(width)
    position = towers.index("model")
    if 0 < position < len(towers) - 1:
        raise HemaclipError(f"towers {','.join(towers)}: the model tower must come first or last")
    start = 0 if position == 0 else width - model_width
    return np.arange(start, start + model_width)


# ---------------------------------------------------------------- the profile


@dataclass
class LabProfile:
    """An opened lab folder (see the module docstring)."""

    root: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.root.name

    @classmethod
    def open(cls, name: str, labs: str | Path | None = None, model_sha1: str | None = None) -> LabProfile:
        root = labs_dir(labs) / check_name(name)
        path = root / PROFILE
        if not path.is_file():
            raise HemaclipError(f"no lab '{name}' in {root.parent} (make one with `hemaclip lab add {name} FOLDER`)")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise HemaclipError(f"{path}: not a lab profile ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != LAB_FORMAT:
            raise HemaclipError(f"{path}: lab profile format {meta.get('format') if isinstance(meta, dict) else '?'} "
                                f"is not this hemaclip's ({LAB_FORMAT}); add the lab again")
        if model_sha1 is not None and meta.get("model_sha1") != model_sha1:
            raise HemaclipError(f"lab '{name}' was built with another model (SHA-1 {str(meta.get('model_sha1'))[:10]}, this one "
                                f"{model_sha1[:10]}); add the lab again with this model")
        return cls(root, meta)

    @property
    def fine_tuned(self) -> bool:
        return bool(self.meta.get("fine_tuned")) and (self.root / TUNED_MODEL).is_file()

    @property
    def model_file(self) -> Path | None:
        """The lab's own fine-tuned model (None: the lab reads with the base model)."""
        return self.root / TUNED_MODEL if self.fine_tuned else None

    def cells(self) -> dict[str, np.ndarray]:
        """Every cell of the profile, with features of the lab's model (the fine-tuned one after --fine-tune)."""
        path = self.root / (TUNED_CELLS if self.fine_tuned else CELLS)
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError) as err:
            raise HemaclipError(f"{path}: cannot be read ({err})") from None

    def chosen(self) -> list[dict[str, str]]:
        return read_csv_rows(self.root / TO_LABEL, ("rank", "source", "cell", "group"))

    def labels(self) -> list[dict[str, str]]:
        path = self.root / LABELS
        return read_csv_rows(path, ("source", "cell", "label", "origin")) if path.is_file() else []

    def head(self) -> LabHead:
        from hemaclip.tasks.onboarding import LabHead

        path = self.root / HEAD
        if not path.is_file():
            raise HemaclipError(f"lab '{self.name}' has no fitted read-out yet (run `hemaclip lab fit {self.name}`)")
        try:
            with np.load(path) as data:
                if str(data["model_sha1"]) != self.meta["model_sha1"]:
                    raise HemaclipError(f"{path}: fitted for another model; run `hemaclip lab fit {self.name}` again")
                return LabHead.from_arrays(data)
        except (OSError, ValueError, KeyError) as err:
            raise HemaclipError(f"{path}: not a lab read-out ({err})") from None

    def write_labels(self, rows: Iterable[dict[str, str]]) -> None:
        _write_csv(self.root / LABELS, ("source", "cell", "label", "origin"), rows)


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def _groups_of(descriptions: Sequence[CellDescription]) -> list[str]:
    """Source-cell group of each described cell: near-duplicate crops of one cell share a group (phase correlation,
    :mod:`hemaclip.data.near_duplicates`); cells of one multi-cell field are distinct cells."""
    from hemaclip.data.near_duplicates import near_duplicate_groups

    singles = sorted({d.source for d in descriptions if d.cell == 0} - {d.source for d in descriptions if d.cell > 0})
    group_of = dict(zip(singles, (f"g{g:05d}" for g in near_duplicate_groups([Path(s) for s in singles])), strict=True))
    return [group_of.get(d.source, f"{path_to_text(d.source)}#{d.cell}") for d in descriptions]


def label_from_folder(source: str, root: Path) -> str:
    """The class a `ROOT/<class>/<image>` layout gives one image: the name of its first folder under `root`."""
    try:
        relative = Path(source).relative_to(root)
    except ValueError:
        try:
            relative = Path(source).resolve().relative_to(root.resolve())
        except ValueError:
            raise HemaclipError(f"{source}: not under {root}") from None
    if len(relative.parts) < 2:
        raise HemaclipError(f"{source}: not inside a class folder of {root} (--labels-from-folders expects ROOT/<class>/<image>)")
    return relative.parts[0]


def add_lab(describer: Describer, model_sha1: str, name: str, folder: Path, *, labs: str | Path | None = None,
            budget: int = 50, towers: Sequence[str] = ("model",), labels_from_folders: bool = False,
            replace: bool = False, progress: bool = False, selection: str | None = None,
            label_reader: Callable[[str, Path], str] = label_from_folder) -> LabProfile:
    """Read every cell of `folder`, choose `budget` cells to label (:func:`hemaclip.tasks.onboarding.select_cells`),
    and write the profile. With `labels_from_folders`, the chosen cells (and only those) take their class from
    their folder name (`label_reader`). `selection`: a rule of :data:`hemaclip.tasks.onboarding.SELECTION_RULES`
    (None: the default, :data:`~hemaclip.tasks.onboarding.DEFAULT_SELECTION`)."""
    from hemaclip.tasks.describe import iter_image_paths
    from hemaclip.tasks.onboarding import SELECTION_RULES, Standardiser, check_selection, select_cells, uncertainty

    selection = check_selection(selection)
    towers = check_towers(towers)
    root = labs_dir(labs) / check_name(name)
    if (root / PROFILE).exists() and not replace:
        raise HemaclipError(f"lab '{name}' exists in {root.parent} (use --replace to build it again; its labels are then lost)")
    if not Path(folder).is_dir():
        raise HemaclipError(f"{folder}: not a folder of cell images")
    if budget < 0:
        raise HemaclipError(f"--budget must be >= 0, got {budget}")
    paths = list(iter_image_paths([folder]))
    if not paths:
        raise HemaclipError(f"no image files found in {folder}")
    described = [d for d in describer.describe_paths(paths, progress=progress) if d.error is None]
    if len(described) < 2:
        raise HemaclipError(f"{folder}: fewer than 2 readable cells ({len(described)})")
    model_classes = list(describer.readout.class_names)
    features = tower_features(towers, described, describer)
    probabilities = np.stack([d.class_probabilities for d in described])
    groups = _groups_of(described)
    on = selection_columns(towers, features.shape[1], len(described[0].embedding))
    z = Standardiser.fit(features[:, on])(features[:, on])
    picked = select_cells(z, uncertainty(probabilities), groups, budget, rule=selection)
    sources = [d.source for d in described]
    chosen_rows = [{"rank": r + 1, "source": path_to_text(sources[i]), "cell": described[i].cell, "group": groups[i]}
                   for r, i in enumerate(picked)]
    label_rows = []
    if labels_from_folders:
        unknown = {}
        for i in picked:  # only the chosen cells' labels are read
            label = label_reader(sources[i], Path(folder))
            if label not in model_classes:
                unknown[label] = sources[i]
            label_rows.append({"source": path_to_text(sources[i]), "cell": described[i].cell, "label": label, "origin": "folder"})
        if unknown:
            raise HemaclipError(f"class folder(s) {sorted(unknown)} are not classes of the model ({', '.join(model_classes)})")
    root.mkdir(parents=True, exist_ok=True)
    for stale in (HEAD, LABELS, TUNED_MODEL, TUNED_CELLS):
        (root / stale).unlink(missing_ok=True)
    with atomic_write(root / CELLS, "wb") as handle:
        np.savez(handle, source=np.array([path_to_text(s) for s in sources]), cell=np.array([d.cell for d in described]),
                 group=np.array(groups), features=features.astype(np.float32), probabilities=probabilities.astype(np.float32),
                 model_classes=np.array(model_classes))
    _write_csv(root / TO_LABEL, ("rank", "source", "cell", "group"), chosen_rows)
    if label_rows:
        _write_csv(root / LABELS, ("source", "cell", "label", "origin"), label_rows)
    meta = {"format": LAB_FORMAT, "name": name, "folder": path_to_text(Path(folder).resolve()), "model_sha1": model_sha1,
            "towers": towers, "budget": budget, "cells": len(described), "source_cells": len(set(groups)),
            "selection": selection, "selection_rule": SELECTION_RULES[selection].description + ", one crop per source cell", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_write(root / PROFILE) as handle:
        json.dump(meta, handle, indent=2)
    return LabProfile(root, meta)


def _cell_key(source: str, cell: Any) -> tuple[str, int]:
    """A cell's identity across a profile and a review of the same files, however the folder was written."""
    return os.path.realpath(text_to_path(str(source))), int(cell)


def fit_lab(profile: LabProfile, *, seed: int = 0) -> tuple[LabHead, dict[str, Any]]:
    """Fit the profile's read-out on its labelled cells and save it; returns the head and a summary."""
    from hemaclip.tasks.onboarding import fit_lab_head

    cells = profile.cells()
    index = {_cell_key(s, c): i for i, (s, c) in enumerate(zip(cells["source"], cells["cell"]))}
    rows = profile.labels()
    if not rows:
        raise HemaclipError(f"lab '{profile.name}' has no labelled cells (label the cells of {profile.root / TO_LABEL} in "
                            f"`hemaclip serve --review`, or add the lab with --labels-from-folders)")
    picked, labels = [], []
    for row in rows:
        key = _cell_key(row["source"], row["cell"])
        if key not in index:
            raise HemaclipError(f"{profile.root / LABELS}: {row['source']} (cell {row['cell']}) is not a cell of this lab")
        picked.append(index[key])
        labels.append(row["label"])
    picked_array = np.array(picked)
    start = time.perf_counter()
    head = fit_lab_head(cells["features"][picked_array], cells["probabilities"][picked_array], labels,
                        [str(g) for g in cells["group"][picked_array]], [str(c) for c in cells["model_classes"]],
                        cells["features"], seed=seed)
    seconds = time.perf_counter() - start
    with atomic_write(profile.root / HEAD, "wb") as handle:
        np.savez(handle, model_sha1=np.array(profile.meta["model_sha1"]), **head.to_arrays())
    summary = {"lab": profile.name, "labelled_cells": head.n_cells, "source_cells": head.n_groups, "classes": head.classes,
               "l2": head.l2, "prior_weight": head.prior_weight, "temperature": round(head.temperature, 4),
               "flag_bar": round(head.flag_bar, 4), "fit_seconds": round(seconds, 2), "cv": head.cv}
    return head, summary


def read_with_lab(head: LabHead, towers: Sequence[str], descriptions: Sequence[CellDescription], describer: Describer,
                  abstain_below: float) -> list[CellDescription]:
    """`descriptions` with their class read by the lab's read-out and flagged by the lab's familiarity bar
    (attributes and sentence stay the model's; error records pass through)."""
    import dataclasses

    ok = [i for i, d in enumerate(descriptions) if d.error is None]
    out = list(descriptions)
    if not ok:
        return out
    cells = [descriptions[i] for i in ok]
    features = tower_features(towers, cells, describer)
    probs = head.probabilities(features, np.stack([d.class_probabilities for d in cells]))
    distance = head.unfamiliarity(features)
    for j, i in enumerate(ok):
        order = np.argsort(-probs[j], kind="stable")
        top = float(probs[j, order[0]])
        flagged = bool(distance[j] > head.flag_bar)
        d = descriptions[i]
        label = head.classes[order[0]]
        values = {k: v["value"] for k, v in d.attributes.items()}
        chances = {k: v["probability"] for k, v in d.attributes.items()}
        sentence, _stated = describer.sentence_for(label, values, chances, flagged)
        out[i] = dataclasses.replace(
            d, label=label, probability=round(top, 4), sentence=sentence,
            runner_up=head.classes[order[1]] if len(order) > 1 else None,
            runner_up_probability=round(float(probs[j, order[1]]), 4) if len(order) > 1 else None,
            abstain=top < abstain_below, unfamiliar=flagged, unfamiliarity=round(float(distance[j]), 4),
            unfamiliar_in_shifted_folder=flagged, sentence_in_shifted_folder=sentence)  # the lab's bar is the lab's own
    return out


def lab_reader(profile: LabProfile, describer: Describer) -> Callable[[list[CellDescription]], list[CellDescription]]:
    """What :meth:`hemaclip.tasks.describe.Describer.use_lab` takes: descriptions -> read by the lab's read-out."""
    head = profile.head()
    if list(head.model_classes) != list(describer.readout.class_names):
        raise HemaclipError(f"lab '{profile.name}' was fitted for other classes than this model's")
    towers = list(profile.meta["towers"])

    def read(descriptions: list[CellDescription]) -> list[CellDescription]:
        return read_with_lab(head, towers, descriptions, describer, describer.abstain_below)

    return read


def checkpoint_for(profile: LabProfile | None, checkpoint: str | Path | None) -> str | Path | None:
    """The checkpoint a lab reads with: its own fine-tuned model if it has one, else `checkpoint`."""
    return profile.model_file if profile is not None and profile.model_file is not None else checkpoint


def open_for_model(name: str, labs: str | Path | None, checkpoint: str | Path | None) -> LabProfile:
    """The profile `name`, refused in one line if it was built with another model than `checkpoint`."""
    from hemaclip.cache import file_sha1
    from hemaclip.models.default import resolve_checkpoint

    return LabProfile.open(name, labs, model_sha1=file_sha1(resolve_checkpoint(checkpoint)))


def read_label_csv(path: Path) -> list[dict[str, str]]:
    """Labels a person gave (columns source, cell, label), e.g. exported from a review."""
    rows = read_csv_rows(Path(path), ("source", "cell", "label"))
    if rows and "reviewed" in rows[0]:  # a review's cells.csv: the cells a person reviewed
        rows = [r for r in rows if str(r["reviewed"]).strip() in ("1", "True", "true")]
    if not rows:
        raise HemaclipError(f"{path}: no labels")
    for line, row in enumerate(rows, start=2):
        if not str(row.get("cell", "")).isdigit() or not row.get("label"):
            raise HemaclipError(f"{path}, line {line}: needs a cell number and a label")
    return [{"source": r["source"], "cell": r["cell"], "label": r["label"], "origin": r.get("origin") or "csv"} for r in rows]


def list_labs(labs: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per readable profile in the labs folder."""
    root = labs_dir(labs)
    rows = []
    for folder in sorted(p for p in root.glob("*") if (p / PROFILE).is_file()) if root.is_dir() else []:
        try:
            profile = LabProfile.open(folder.name, labs)
        except HemaclipError as err:
            rows.append({"name": folder.name, "labs": str(root), "error": str(err), "cells": 0, "chosen": 0, "labelled": 0,
                         "fitted": False, "towers": []})
            continue
        rows.append({"name": folder.name, "labs": str(root), "cells": profile.meta.get("cells", 0), "chosen": len(profile.chosen()),
                     "labelled": len(profile.labels()), "fitted": (folder / HEAD).is_file(), "towers": profile.meta.get("towers", [])})
    return rows


REPORT_SIZES = (10, 20, 50, 100)
REPORT_REPEATS = 5


def lab_learning_curve(profile: LabProfile) -> list[dict[str, Any]]:
    """Accuracy and macro F1 of read-outs fitted on n of the lab's labelled source cells, scored on its other
    labelled source cells (5 random draws per n; the lab's own estimate of what more labels would buy)."""
    from hemaclip.metrics.classification import macro_f1

    from hemaclip.tasks.onboarding import fit_lab_head

    cells = profile.cells()
    index = {_cell_key(s, c): i for i, (s, c) in enumerate(zip(cells["source"], cells["cell"]))}
    rows = [r for r in profile.labels() if _cell_key(r["source"], r["cell"]) in index]
    picked = np.array([index[_cell_key(r["source"], r["cell"])] for r in rows], dtype=int)
    labels = np.array([r["label"] for r in rows])
    groups = np.array([str(g) for g in cells["group"][picked]])
    unique = np.array(sorted(set(groups)))
    curve = []
    for n in [s for s in REPORT_SIZES if s < len(unique) - 4]:
        accuracy, f1 = [], []
        for draw in range(REPORT_REPEATS):
            rng = np.random.default_rng(draw)
            learn_groups = set(rng.permutation(unique)[:n])
            learn = np.array([g in learn_groups for g in groups])
            if len(set(labels[learn])) < 2:
                continue
            head = fit_lab_head(cells["features"][picked[learn]], cells["probabilities"][picked[learn]], list(labels[learn]),
                                list(groups[learn]), [str(c) for c in cells["model_classes"]], cells["features"], seed=draw)
            pred = np.array(head.predict(cells["features"][picked[~learn]], cells["probabilities"][picked[~learn]]))
            accuracy.append(float(np.mean(pred == labels[~learn])))
            f1.append(macro_f1(list(labels[~learn]), list(pred), sorted(set(labels[~learn]))))
        if accuracy:
            curve.append({"n": n, "accuracy": float(np.mean(accuracy)), "macro_f1": float(np.mean(f1)), "draws": len(accuracy),
                          "scored_on": "the lab's other labelled source cells"})
    return curve


def write_lab_report(profile: LabProfile, out: Path) -> dict[str, Any]:
    """report.json, report.md and learning_curve.png: what the read-out learnt, from how many cells, its curve."""
    from collections import Counter

    from hemaclip.io import write_json

    head = profile.head()
    labels = profile.labels()
    curve = lab_learning_curve(profile)
    report = {"lab": profile.name, "profile": profile.meta, "labelled_cells": head.n_cells, "labelled_source_cells": head.n_groups,
              "labels_per_class": dict(Counter(r["label"] for r in labels)), "classes": head.classes, "penalty": head.l2,
              "prior_weight": head.prior_weight, "temperature": head.temperature, "flag_bar": head.flag_bar,
              "cross_validation": head.cv, "learning_curve": curve}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    lines = [f"# Lab '{profile.name}'", "",
             f"{profile.meta['cells']} cells ({profile.meta['source_cells']} source cells) read from `{profile.meta['folder']}` with towers "
             f"{', '.join(profile.meta['towers'])}; {head.n_cells} labelled ({head.n_groups} source cells): "
             + ", ".join(f"{k} {v}" for k, v in sorted(report["labels_per_class"].items())) + ".", "",
             f"Read-out over {', '.join(head.classes)}: penalty {head.l2:g}, weight of the model's prior {head.prior_weight:g} "
             f"(both chosen by cross-validation over source cells), temperature {head.temperature:.2f} (fitted on out-of-fold "
             f"scores), familiarity bar {head.flag_bar:.3f}.", "",
             "| labelled source cells | accuracy | macro F1 | scored on |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['scored_on']} |" for r in curve]
    with atomic_write(out / "report.md") as handle:
        handle.write("\n".join(lines) + "\n")
    _plot_curve(curve, out / "learning_curve.png", profile.name)
    return report


def _plot_curve(curve: list[dict[str, Any]], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot([r["n"] for r in curve], [r["accuracy"] for r in curve], marker="o", label="accuracy")
    ax.plot([r["n"] for r in curve], [r["macro_f1"] for r in curve], marker="s", label="macro F1")
    ax.set_xlabel("labelled source cells")
    ax.set_ylim(0, 1)
    ax.set_title(f"lab '{name}': held-out labelled cells")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def _cell_arrays(describer: Describer, sources: Sequence[str], cells: Sequence[int]) -> list[np.ndarray]:
    """The uint8 arrays the model sees of the given cells (decoded again from their files)."""
    from hemaclip.data.preprocess import decode_image

    return [describer.views(decode_image(text_to_path(str(s))))[int(c)].array for s, c in zip(sources, cells)]


class ReferenceCellsUnavailable(HemaclipError):
    """The training lab's cells (PBC), which a lab fine-tune mixes in, cannot be read here."""


def reference_cells(describer: Describer, data_root: str | Path | None, per_class: int = REFERENCE_PER_CLASS,
                    seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Training-lab cells mixed into a lab fine-tune: `per_class` PBC training cells of each of the model's classes."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.errors import DataError

    classes = list(describer.readout.class_names)
    try:
        pbc = load_dataset("pbc", data_root=data_root)
    except DataError as error:
        raise ReferenceCellsUnavailable(f"the PBC training cells are not readable ({error})") from error
    rng = np.random.default_rng(seed)
    arrays, targets = [], []
    for cls in classes:
        members = [r for r in pbc.split("train") if r.label == cls]
        for i in rng.choice(len(members), min(per_class, len(members)), replace=False) if members else []:
            arrays.append(describer.preprocess.load(members[i].path))
            targets.append(classes.index(cls))
    if not arrays:
        raise ReferenceCellsUnavailable("no PBC training cells of the model's classes were found")
    return arrays, targets


def fine_tune_lab(profile: LabProfile, checkpoint: str | Path | None, *, data_root: str | Path | None = None,
                  settings: Any = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """`lab fit --fine-tune`: train the model's image tower and class head on the lab's labelled cells mixed with PBC
    training cells (:func:`hemaclip.train.finetune.fine_tune_image_tower`), save it in the profile, and read every
    cell of the profile again with it (the read-out is then fitted on the fine-tuned features)."""
    from hemaclip.models.checkpoint import load_checkpoint, save_checkpoint
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.models.inference import prepare_for_inference
    from hemaclip.tasks.describe import Describer
    from hemaclip.train.finetune import FineTuneSettings, fine_tune_image_tower

    settings = settings or FineTuneSettings()
    towers = list(profile.meta["towers"])
    if towers[0] != "model":
        raise HemaclipError(f"lab '{profile.name}': --fine-tune adapts the model's own tower, which must come first in --towers")
    with np.load(profile.root / CELLS) as data:
        base_cells = {k: data[k] for k in data.files}
    rows = profile.labels()
    if not rows:
        raise HemaclipError(f"lab '{profile.name}' has no labelled cells to fine-tune on")
    path = resolve_checkpoint(checkpoint)
    raw, _meta = load_checkpoint(path)
    base = Describer.from_checkpoint(path, index=None)
    classes = list(base.readout.class_names)
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise HemaclipError(f"labels {unknown} are not classes of the model")
    ref_arrays, ref_targets = reference_cells(base, data_root, seed=seed)  # first: without PBC, nothing else is read
    lab_arrays = _cell_arrays(base, [r["source"] for r in rows], [r["cell"] for r in rows])
    start = time.perf_counter()
    tuned = fine_tune_image_tower(raw, lab_arrays, [classes.index(r["label"]) for r in rows], ref_arrays, ref_targets,
                                  settings, seed=seed)
    seconds = time.perf_counter() - start
    save_checkpoint(profile.root / TUNED_MODEL, tuned, extra={"lab": profile.name, "base_model_sha1": profile.meta["model_sha1"]})
    reader = Describer(prepare_for_inference(tuned), uncalibrated_reason=f"fine-tuned for lab '{profile.name}'")
    sources = [text_to_path(str(s)) for s in base_cells["source"]]
    by_source: dict[str, list[Any]] = {}
    for d in reader.describe_paths(sources, progress=progress):
        by_source.setdefault(d.source, []).append(d)
    described = []
    for source, cell in zip(base_cells["source"], base_cells["cell"]):
        found = [d for d in by_source.get(str(text_to_path(str(source))), []) if d.cell == int(cell) and d.error is None]
        if not found:
            raise HemaclipError(f"{source} (cell {cell}) could not be read again; was the lab's folder changed?")
        described.append(found[0])
    tuned_features = np.stack([d.embedding for d in described]).astype(np.float32)
    frozen_rest = base_cells["features"][:, tuned_features.shape[1]:]  # other towers (DINOv2) are frozen: kept as read
    with atomic_write(profile.root / TUNED_CELLS, "wb") as handle:
        np.savez(handle, **{k: base_cells[k] for k in ("source", "cell", "group", "model_classes")},
                 features=np.concatenate([tuned_features, frozen_rest], axis=1),
                 probabilities=np.stack([d.class_probabilities for d in described]).astype(np.float32))
    profile.meta.update({"fine_tuned": True, "fine_tune": {"steps": settings.steps, "seconds": round(seconds, 1),
                                                           "labelled_cells": len(rows), "reference_cells": len(ref_arrays)}})
    with atomic_write(profile.root / PROFILE) as handle:
        json.dump(profile.meta, handle, indent=2)
    return profile.meta["fine_tune"]


def clear_fine_tune(profile: LabProfile) -> None:
    """Back to the base model: the profile forgets its fine-tuned model and features."""
    profile.meta.pop("fine_tune", None)
    profile.meta["fine_tuned"] = False
    with atomic_write(profile.root / PROFILE) as handle:
        json.dump(profile.meta, handle, indent=2)
    for name in (TUNED_MODEL, TUNED_CELLS):
        (profile.root / name).unlink(missing_ok=True)
