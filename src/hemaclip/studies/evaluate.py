"""Evaluate one checkpoint (or another encoder's features) on one dataset split, into a report folder.

:func:`run_evaluation` is the whole protocol behind ``hemaclip evaluate``. It writes
``metrics.json``, ``report.md``, ``report.html`` and PNG figures into `out` (via
:func:`hemaclip.studies.report.write_report`) and returns the metrics dictionary. Parts:

* **Zero-shot classes** (prompt ensembles of the prompt set's classes for the dataset; the model's
  own class vocabulary plays no role): accuracy, balanced accuracy, macro and weighted F1, each
  with a 95 % stratified percentile bootstrap interval; per-class precision/recall/F1; confusion
  matrices (counts and row-normalised).
* **Zero-shot attributes** (when the images carry the 11 WBCAtt attributes): macro F1 with an
  interval per attribute, the WBC-CLIP table and the mean over the 11.
* **Supervised heads** (checkpoints trained with auxiliary heads): the class head, mapped by
  class name onto the evaluated classes when all of them are in the model's vocabulary (else
  reported as not applicable), and the attribute heads, with the same metrics.
* **Calibration** of the zero-shot class probabilities: a temperature fitted on the **val**
  split (never on the evaluated split), ECE (15 bins) before/after, reliability diagrams,
  AUROC and point-biserial correlation of the top probability with correctness, selective
  accuracy at coverage 0.5 ... 1.0.
* **Faithfulness** of the sentences ``hemaclip describe`` writes (when the images carry attributes):
  statement agreement with the annotation and coverage, beside the two WBCAtt annotators' agreement,
  a threshold sweep, and the textbook test on misclassified cells (:mod:`hemaclip.studies.faithfulness`).
* **Retrieval**, both directions, where any relevant item counts: text->image and image->text by
  class and by attribute value, image->image by class and by the full attribute profile;
  Hit@k, Precision@k, MRR@k and Recall@k for k = 1, 3, 5, 10; a retrieval grid figure.
* **Probes** on frozen features (logistic, kNN-1, kNN-20, MLP; train split -> evaluated split),
  **n-shot curves** (1 ... 200 images per class, 3 seeds, mean and range) and the LVLM benchmark
  preset (50 evaluated images per class, weighted F1 next to the GPT-4o numbers QUOTED from the
  published benchmark, not reproduced here).
* **Out of distribution**: ``dataset="folder"`` with a `class_map` that maps the folder's class
  names onto prompt-set class names; folder classes without a usable mapping are listed in
  ``unmapped_classes`` (metrics and report), never silently dropped.
* **Embedding map** of up to 3,000 evaluated image embeddings plus the class prompt embeddings,
  coloured by class, and one coloured by an attribute (default ``nucleus_shape``).

With ``features`` + ``index_csv`` (an external encoder such as DinoBloom or UNI) only the probe,
n-shot, LVLM-probe, image->image retrieval and embedding-map parts apply; the report says so.

Metric conventions. Macro/weighted F1, accuracy and balanced accuracy are computed over the labels
that occur in the ground truth or in the predictions of the evaluated images (scikit-learn's
default), so a class absent from the split and never predicted does not count as F1 = 0; the
confusion matrices always show the full label list. Bootstrap intervals resample images with
replacement within each true class (``n_boot`` resamples, ``numpy`` seed `seed`); ``n_boot=0``
gives point estimates only.

Speed options for tests and quick looks: ``max_per_class`` keeps at most that many images per
class *in every split used* (train, val and the evaluated split; drawn with `seed` after sorting
by path), and ``nshot_shots`` / ``nshot_seeds`` shrink the n-shot grid.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import hemaclip
from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.data.splits import SPLIT_NAMES
from hemaclip.errors import DataError, HemaclipError
from hemaclip.io import display_path
from hemaclip.metrics import calibration as cal
from hemaclip.metrics.classification import attribute_table, macro_f1
from hemaclip.metrics.retrieval import paired_recall_at_k, retrieval_metrics
from hemaclip.metrics.summary import classification_metrics
from hemaclip.studies import plots
from hemaclip.studies.report import Section, Table, write_report

__all__ = [
    "DEFAULT_MAP_ATTRIBUTE",
    "EMBED_MAX_POINTS",
    "NSHOT_SEEDS",
    "NSHOT_SHOTS",
    "RETRIEVAL_KS",
    "classification_metrics",
    "load_class_map",
    "run_evaluation",
]

NSHOT_SHOTS: tuple[int, ...] = (1, 5, 10, 25, 50, 100, 200)
NSHOT_SEEDS: tuple[int, ...] = (0, 1, 2)
NSHOT_KINDS: tuple[str, ...] = ("logistic", "knn1")
PROBE_KINDS: tuple[str, ...] = ("logistic", "knn1", "knn20", "mlp")
RETRIEVAL_KS: tuple[int, ...] = (1, 3, 5, 10)
ECE_BINS = 15
EMBED_MAX_POINTS = 3000
DEFAULT_MAP_ATTRIBUTE = "nucleus_shape"
LVLM_FEW_SHOT = 5
EVAL_SPLITS: tuple[str, ...] = (*SPLIT_NAMES, "all")


# --------------------------------------------------------------------------------------------- #
# class maps (out-of-distribution folders)
# --------------------------------------------------------------------------------------------- #

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


# --------------------------------------------------------------------------------------------- #
# data and features
# --------------------------------------------------------------------------------------------- #


def _check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise HemaclipError(f"unknown split '{split}'; choose from {', '.join(EVAL_SPLITS)}")


def _cap_per_class(records: list[Any], max_per_class: int | None, seed: int) -> list[Any]:
    if max_per_class is None:
        return records
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Any]] = {}
    for r in sorted(records, key=lambda r: str(r.path)):
        by_label.setdefault(r.label, []).append(r)
    keep: set[int] = set()
    for label in sorted(by_label):
        group = by_label[label]
        for i in rng.permutation(len(group))[: int(max_per_class)]:
            keep.add(id(group[i]))
    return [r for r in records if id(r) in keep]


def _split_records(ds: Any, split: str, max_per_class: int | None, seed: int) -> list[Any]:
    return _cap_per_class(ds.split(split), max_per_class, seed)


def _cap_feature_set(fs: Any, max_per_class: int | None, seed: int) -> Any:
    if max_per_class is None:
        return fs
    order = np.argsort(np.asarray(fs.paths, dtype=object), kind="stable")
    rng = np.random.default_rng(seed)
    labels = np.asarray(fs.labels, dtype=object)[order]
    keep = []
    for label in sorted(set(labels.tolist())):
        rows = order[labels == label]
        keep.append(rows[rng.permutation(len(rows))[: int(max_per_class)]])
    return fs.subset(np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64))


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _figure(out: Path, name: str, figures: list[str]) -> Path:
    figures.append(name)
    return out / name


# --------------------------------------------------------------------------------------------- #
# parts of the evaluation
# --------------------------------------------------------------------------------------------- #


def _argmax_labels(logits: np.ndarray, names: Sequence[str]) -> list[str]:
    if len(logits) == 0:
        return []
    return [names[i] for i in np.argmax(np.asarray(logits), axis=1)]


def _head_class_predictions(fs: Any, rows: np.ndarray, classes: Sequence[str]) -> tuple[list[str] | None, str]:
    """Class-head predictions restricted to `classes` (by name), or (None, reason)."""
    if fs.class_logits is None:
        return None, "the checkpoint has no class head"
    vocab = list(fs.meta.get("class_names") or [])
    missing = [c for c in classes if c not in vocab]
    if missing:
        return None, f"class(es) {', '.join(missing)} are not in the model's head vocabulary ({', '.join(vocab)})"
    cols = [vocab.index(c) for c in classes]
    return _argmax_labels(fs.class_logits[rows][:, cols], list(classes)), ""


def _zero_shot_class_part(ctx: _Context) -> None:
    from hemaclip.tasks.zero_shot import zero_shot_classes

    ctx.log("zero-shot classes")
    zs = zero_shot_classes(ctx.model, ctx.eval_zs, ctx.prompt_set, ctx.prompt_dataset, classes=ctx.zs_classes,
                           text_cache=ctx.text_cache)
    if len(zs["y_true"]) == 0:
        raise DataError(
            f"no '{ctx.split}' image of dataset '{ctx.dataset}' has a class with '{ctx.prompt_dataset}' prompts "
            f"(classes {', '.join(ctx.zs_classes)})"
        )
    pred = _argmax_labels(zs["logits"], zs["class_names"])
    ctx.zs = zs
    ctx.zs_pred = pred
    result = classification_metrics(zs["y_true"], pred, zs["class_names"], ctx.n_boot, ctx.seed)
    result["prompt_dataset"] = ctx.prompt_dataset
    result["excluded_images"] = int(zs["missing_labels"])
    result["excluded_label_counts"] = zs["missing_label_counts"]
    ctx.metrics["zero_shot"] = {"classes": result}
    figs = [
        (plots.plot_confusion(result["confusion_matrix"], result["confusion_labels"],
                              _figure(ctx.out, "zero_shot_confusion_counts.png", ctx.figures),
                              title="Zero-shot confusion matrix (counts)"), "Zero-shot classes: confusion matrix (counts)."),
        (plots.plot_confusion(result["confusion_matrix"], result["confusion_labels"],
                              _figure(ctx.out, "zero_shot_confusion_normalized.png", ctx.figures), normalized=True,
                              title="Zero-shot confusion matrix (row-normalised)"),
         "Zero-shot classes: confusion matrix, each row divided by the class's number of images."),
    ]
    text = (
        f"Prompt ensembles of the '{ctx.prompt_dataset}' classes in the prompt file ({display_path(ctx.prompt_set.source)}); "
        f"{result['n']} images scored."
    )
    if result["excluded_images"]:
        text += f" {result['excluded_images']} image(s) whose class has no prompt were left out: {result['excluded_label_counts']}."
    ctx.sections.append(
        Section("Zero-shot classification", text, [_overall_table(result, "Zero-shot classes"), _per_class_table(result)], figs)
    )


def _overall_table(result: Mapping[str, Any], caption: str) -> Table:
    return Table(
        ["Images", "Accuracy", "Balanced accuracy", "Macro F1", "Weighted F1"],
        [[result["n"], result["accuracy"], result["balanced_accuracy"], result["macro_f1"], result["weighted_f1"]]],
        caption=f"{caption} (95 % bootstrap intervals)",
    )


def _per_class_table(result: Mapping[str, Any]) -> Table:
    rows = [[name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in result["per_class"].items()]
    return Table(["Class", "Precision", "Recall", "F1", "Images"], rows, caption="Per class")


def _attribute_block(y_true: Sequence[str], y_pred: Sequence[str], values: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    res = classification_metrics(y_true, y_pred, values, n_boot, seed, cis=("macro_f1",))
    return {
        "n": res["n"],
        "n_choices": len(values),
        "values": list(values),
        "values_evaluated": res["labels_evaluated"],
        "macro_f1": res["macro_f1"],
        "accuracy": res["accuracy"]["point"],
        "per_value": res["per_class"],
    }


def _attribute_summary(blocks: Mapping[str, Mapping[str, Any]]) -> tuple[list[dict[str, Any]], float | None]:
    rows = attribute_table([{"name": k, "n_choices": v["n_choices"], "macro_f1": v["macro_f1"]} for k, v in blocks.items()])
    mean = float(np.mean([r["macro_f1"] for r in rows])) if rows else None
    return rows, mean


def _attribute_section(title: str, blocks: Mapping[str, Mapping[str, Any]], mean: float | None, fig: Path, text: str) -> Section:
    rows = [[k, v["n_choices"], v["macro_f1"], v["accuracy"], v["n"]] for k, v in blocks.items()]
    rows.append(["mean over attributes", None, mean, None, None])
    table = Table(["Attribute", "Choices", "Macro F1", "Accuracy", "Images"], rows,
                  caption="WBC-CLIP table: macro F1 per attribute (95 % bootstrap interval)")
    return Section(title, text, [table], [(fig, f"{title}: macro F1 per attribute; dashed line: human inter-annotator agreement.")])


def _zero_shot_attribute_part(ctx: _Context) -> None:
    from hemaclip.tasks.zero_shot import zero_shot_attributes

    if not any(a is not None for a in ctx.eval_fs.attributes):
        return
    ctx.log("zero-shot attributes")
    zsa = zero_shot_attributes(ctx.model, ctx.eval_fs, ctx.prompt_set, text_cache=ctx.text_cache)
    blocks = {}
    for name, part in zsa.items():
        pred = _argmax_labels(part["logits"], part["values"])
        blocks[name] = _attribute_block(part["y_true"], pred, part["values"], ctx.n_boot, ctx.seed)
        ctx.zs_attr_pred[name] = (part["indices"], part["y_true"], pred)
    rows, mean = _attribute_summary(blocks)
    missing = next(iter(zsa.values()))["missing_attributes"] if zsa else 0
    ctx.metrics["zero_shot"]["attributes"] = blocks
    ctx.metrics["zero_shot"]["attribute_table"] = rows
    ctx.metrics["zero_shot"]["attribute_mean_macro_f1"] = mean
    ctx.metrics["zero_shot"]["attribute_images_without_annotation"] = int(missing)
    fig = plots.plot_per_attribute_f1(rows, _figure(ctx.out, "zero_shot_attributes_f1.png", ctx.figures),
                                      reference=plots.HUMAN_INTER_ANNOTATOR_F1, title="Zero-shot macro F1 per attribute")
    text = (
        "Each attribute value is a prompt ensemble from the prompt file; an image takes the best-scoring value. "
        "Macro F1 is averaged over the values that occur in the truth or the predictions."
    )
    if missing:
        text += f" {missing} image(s) without attribute annotations were left out."
    ctx.sections.append(_attribute_section("Zero-shot attributes", blocks, mean, fig, text))


def _heads_part(ctx: _Context) -> None:
    fs = ctx.eval_fs
    if fs.class_logits is None and not fs.attribute_logits:
        ctx.metrics["heads"] = {"available": False}
        return
    ctx.log("supervised heads")
    heads: dict[str, Any] = {"available": True}
    tables, figs, text = [], [], []
    rows = np.asarray(ctx.zs["indices"])
    y_true = ctx.zs["y_true"]
    pred, reason = _head_class_predictions(ctx.eval_zs, rows, ctx.zs["class_names"])
    if pred is None:
        heads["class"] = {"applicable": False, "reason": reason}
        text.append(f"Class head not applicable: {reason}.")
    else:
        result = classification_metrics(y_true, pred, ctx.zs["class_names"], ctx.n_boot, ctx.seed)
        result["applicable"] = True
        heads["class"] = result
        ctx.head_pred = pred
        tables += [_overall_table(result, "Class head"), _per_class_table(result)]
        figs.append((plots.plot_confusion(result["confusion_matrix"], result["confusion_labels"],
                                          _figure(ctx.out, "head_confusion_normalized.png", ctx.figures), normalized=True,
                                          title="Class head confusion matrix (row-normalised)"),
                     "Class head: row-normalised confusion matrix."))
        text.append("The class head's logits are restricted to the evaluated classes by name.")
    ctx.sections.append(Section("Supervised class head", " ".join(text), tables, figs))
    attr_logits = fs.attribute_logits or {}
    vocab = fs.meta.get("attributes") or {}
    annotated = np.array([i for i, a in enumerate(fs.attributes) if a is not None], dtype=np.int64)
    if attr_logits and len(annotated):
        blocks = {}
        for name in ATTRIBUTE_NAMES:
            if name not in attr_logits or name not in vocab:
                continue
            values = list(vocab[name])
            y = [fs.attributes[i][name] for i in annotated]
            p = _argmax_labels(attr_logits[name][annotated], values)
            blocks[name] = _attribute_block(y, p, list(ATTRIBUTES[name]), ctx.n_boot, ctx.seed)
            ctx.head_attr_pred[name] = (annotated, y, p)
        rows_t, mean = _attribute_summary(blocks)
        heads["attributes"] = blocks
        heads["attribute_table"] = rows_t
        heads["attribute_mean_macro_f1"] = mean
        fig = plots.plot_per_attribute_f1(rows_t, _figure(ctx.out, "head_attributes_f1.png", ctx.figures),
                                          reference=plots.HUMAN_INTER_ANNOTATOR_F1, title="Attribute heads: macro F1")
        ctx.sections.append(_attribute_section("Supervised attribute heads", blocks, mean, fig,
                                               "One linear head per attribute on the image embedding."))
    ctx.metrics["heads"] = heads


def _calibration_part(ctx: _Context) -> None:
    from hemaclip.tasks.zero_shot import zero_shot_classes

    ctx.log("calibration")
    names = ctx.zs["class_names"]
    index = {c: i for i, c in enumerate(names)}
    y = np.array([index[c] for c in ctx.zs["y_true"]], dtype=np.int64)
    logits = np.asarray(ctx.zs["logits"], dtype=np.float64)
    notes = []
    temperature, fitted_on, n_val = 1.0, None, 0
    if ctx.split in ("val", "all"):
        notes.append(f"No temperature was fitted: the evaluated split '{ctx.split}' contains the val split, "
                     "and the temperature is never fitted on the evaluated images (T = 1).")
    elif ctx.val_zs is None or len(ctx.val_zs) == 0:
        notes.append("No temperature was fitted: the dataset has no val images (T = 1).")
    else:
        val = zero_shot_classes(ctx.model, ctx.val_zs, ctx.prompt_set, ctx.prompt_dataset, classes=names,
                                text_cache=ctx.text_cache)
        n_val = len(val["y_true"])
        if n_val:
            yv = np.array([index[c] for c in val["y_true"]], dtype=np.int64)
            temperature = float(cal.fit_temperature(val["logits"], yv))
            fitted_on = "val"
        else:
            notes.append("No temperature was fitted: no val image has an evaluated class (T = 1).")
    before = cal.softmax(logits)
    after = cal.softmax(logits, temperature)
    bins_before = cal.reliability_bins(before, y, ECE_BINS)
    bins_after = cal.reliability_bins(after, y, ECE_BINS)
    correct = before.argmax(axis=1) == y
    conf_raw, conf_cal = before.max(axis=1), after.max(axis=1)
    sel_raw = cal.selective_accuracy(conf_raw, correct)
    sel_cal = cal.selective_accuracy(conf_cal, correct)
    result = {
        "temperature": temperature,
        "temperature_fitted_on": fitted_on,
        "n_val": n_val,
        "n": int(len(y)),
        "n_bins": ECE_BINS,
        "ece_before": bins_before["ece"],
        "ece_after": bins_after["ece"],
        "mce_before": bins_before["mce"],
        "mce_after": bins_after["mce"],
        "nll_before": cal.negative_log_likelihood(logits, y),
        "nll_after": cal.negative_log_likelihood(logits, y, temperature),
        "confidence_auroc": cal.confidence_auroc(conf_cal, correct),
        "confidence_correctness_correlation": cal.confidence_correctness_correlation(conf_cal, correct),
        "confidence_auroc_uncalibrated": cal.confidence_auroc(conf_raw, correct),
        "confidence_correctness_correlation_uncalibrated": cal.confidence_correctness_correlation(conf_raw, correct),
        "selective_accuracy": sel_cal,
        "selective_accuracy_uncalibrated": sel_raw,
        "reliability_before": bins_before,
        "reliability_after": bins_after,
        "notes": notes,
    }
    ctx.metrics["calibration"] = result
    ctx.metrics["temperature_fitted_on"] = fitted_on
    figs = [
        (plots.plot_reliability(bins_before, _figure(ctx.out, "reliability_before.png", ctx.figures),
                              title="Zero-shot reliability, T = 1"), "Reliability diagram before temperature scaling."),
        (plots.plot_reliability(bins_after, _figure(ctx.out, "reliability_after.png", ctx.figures),
                              title=f"Zero-shot reliability, T = {temperature:.3g}"),
         f"Reliability diagram after temperature scaling (T = {temperature:.3g}, fitted on {fitted_on or 'nothing'})."),
        (plots.plot_selective_accuracy(sel_cal["coverage"], {"T = 1": sel_raw["accuracy"],
                                                             f"T = {temperature:.3g}": sel_cal["accuracy"]},
                                       _figure(ctx.out, "selective_accuracy.png", ctx.figures)),
         "Accuracy on the most confident fraction of images."),
    ]
    table = Table(
        ["", "Temperature", "ECE", "MCE", "NLL"],
        [["before", 1.0, result["ece_before"], result["mce_before"], result["nll_before"]],
         ["after", temperature, result["ece_after"], result["mce_after"], result["nll_after"]]],
        caption=f"Zero-shot class probabilities, {ECE_BINS} equal-width bins",
    )
    sel_table = Table(["Coverage", "Images kept", "Accuracy (T = 1)", "Accuracy (calibrated)"],
                      [[c, k, a0, a1] for c, k, a0, a1 in zip(sel_cal["coverage"], sel_cal["n_kept"], sel_raw["accuracy"],
                                                              sel_cal["accuracy"])],
                      caption="Selective accuracy")
    conf_table = Table(["Confidence", "AUROC (right vs wrong)", "Correlation with correctness"],
                       [["max probability, T = 1", result["confidence_auroc_uncalibrated"],
                         result["confidence_correctness_correlation_uncalibrated"]],
                        ["max probability, calibrated", result["confidence_auroc"],
                         result["confidence_correctness_correlation"]]])
    text = (f"Temperature fitted on the val split's zero-shot logits ({n_val} images), never on the evaluated split."
            if fitted_on else " ".join(notes))
    ctx.sections.append(Section("Calibration", text, [table, conf_table, sel_table], figs))


def _faithfulness_part(ctx: _Context) -> None:
    """Are the sentences of `hemaclip describe` true of the cells? See :mod:`hemaclip.studies.faithfulness`."""
    from hemaclip.studies import faithfulness as fa
    from hemaclip.tasks.describe import DEFAULTS, statements_for_rows

    fs = ctx.eval_fs
    rows = np.array([i for i, a in enumerate(fs.attributes) if a is not None], dtype=np.int64)
    if not len(rows):
        return
    ctx.log("faithfulness")
    notes: list[str] = []

    def attribute_logits(feature_set: Any, keep: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, list[str]], str]:
        if feature_set.attribute_logits:
            vocab = feature_set.meta.get("attributes") or {}
            names = [n for n in ATTRIBUTE_NAMES if n in feature_set.attribute_logits and n in vocab]
            return ({n: np.asarray(feature_set.attribute_logits[n])[keep] for n in names},
                    {n: list(vocab[n]) for n in names}, "supervised attribute heads")
        from hemaclip.tasks.zero_shot import zero_shot_attributes

        zsa = zero_shot_attributes(ctx.model, feature_set.subset(keep), ctx.prompt_set, text_cache=ctx.text_cache)
        return ({n: np.asarray(p["logits"]) for n, p in zsa.items()}, {n: list(p["values"]) for n, p in zsa.items()},
                "zero-shot attribute prompts")

    logits, values, source = attribute_logits(fs, rows)
    temps = {n: 1.0 for n in logits}
    val = ctx.val_zs
    val_rows = (np.array([i for i, a in enumerate(val.attributes) if a is not None], dtype=np.int64)
                if val is not None and ctx.split not in ("val", "all") else np.zeros(0, dtype=np.int64))
    val_probs: dict[str, np.ndarray] = {}
    if len(val_rows):
        val_logits, _, _ = attribute_logits(val, val_rows)
        for n in logits:
            y = np.array([values[n].index(val.attributes[i][n]) for i in val_rows])
            temps[n] = float(cal.fit_temperature(val_logits[n], y))
            val_probs[n] = cal.softmax(val_logits[n], temps[n])
    else:
        notes.append("No annotated val images outside the evaluated split: attribute probabilities are uncalibrated (T = 1).")
    probs = {n: cal.softmax(logits[n], temps[n]) for n in logits}
    truth = [fs.attributes[i] for i in rows]

    predicted: list[str | None] = [None] * len(fs)
    class_pred = ctx.head_pred if ctx.head_pred is not None else ctx.zs_pred
    for j, i in enumerate(np.asarray(ctx.zs["indices"]) if ctx.zs is not None else []):
        predicted[int(i)] = class_pred[j]
    pred_rows = [predicted[i] for i in rows]
    allowed = [p not in DEFAULTS.classes_without_attributes for p in pred_rows]
    threshold = DEFAULTS.attribute_threshold
    statements = statements_for_rows(probs, values, threshold, allowed)
    result: dict[str, Any] = {
        "threshold": threshold,
        "attribute_source": source,
        "temperatures": temps,
        "temperatures_fitted_on": "val" if len(val_rows) else None,
        **fa.statement_agreement(statements, truth, n_boot=ctx.n_boot, seed=ctx.seed),
    }
    result["threshold_sweep"] = fa.threshold_sweep(lambda t: statements_for_rows(probs, values, t, allowed), truth)
    if val_probs:
        val_truth = [val.attributes[i] for i in val_rows]
        result["threshold_sweep_val"] = fa.threshold_sweep(lambda t: statements_for_rows(val_probs, values, t), val_truth)
    try:
        human = fa.annotator_agreement(ctx.data_root, n_boot=ctx.n_boot, seed=ctx.seed)
    except DataError as err:
        human = None
        notes.append(f"Human ceiling not available: {err}")
    result["human"] = human
    if ctx.train_fs is not None and any(a is not None for a in ctx.train_fs.attributes):
        textbook = fa.textbook_attributes(ctx.train_fs.labels, ctx.train_fs.attributes)
        true_labels = [ctx.eval_zs.labels[i] for i in rows]
        result["textbook"] = {"classes": textbook,
                              **fa.textbook_test(statements, truth, true_labels, pred_rows, textbook)}
    else:
        notes.append("Textbook test not run: no annotated train images to define each class's modal attributes.")
    result["notes"] = notes
    ctx.metrics["faithfulness"] = result

    head_mean = (ctx.metrics.get("heads") or {}).get("attribute_mean_macro_f1")
    main_rows = [[f"describe sentences ({source}, threshold {threshold:g})", result["agreement"], result["coverage"],
                  result["n_statements"], result["n_images"], head_mean]]
    if human:
        main_rows.append(["second WBCAtt annotator vs published labels", human["statement_agreement"], 1.0,
                          11 * human["n_images"], human["n_images"], human["mean_macro_f1"]])
    tables = [Table(["Statements by", "Agreement with annotation", "Coverage", "Statements", "Images",
                     "Mean macro F1 (all 11, no threshold)"], main_rows,
                    caption="Statement agreement (95 % bootstrap interval over images) beside the human ceiling")]
    per = result["per_attribute"]
    tables.append(Table(["Attribute", "Statements", "Agreement", "Human agreement"],
                        [[n, per[n]["n"], per[n]["agreement"], human["per_attribute_agreement"][n] if human else None]
                         for n in ATTRIBUTE_NAMES], caption="Per attribute"))
    val_sweep = {r["threshold"]: r for r in result.get("threshold_sweep_val", [])}
    tables.append(Table(["Threshold", "Agreement", "Coverage", "Agreement (val)", "Coverage (val)"],
                        [[r["threshold"], r["agreement"], r["coverage"], val_sweep.get(r["threshold"], {}).get("agreement"),
                          val_sweep.get(r["threshold"], {}).get("coverage")] for r in result["threshold_sweep"]],
                        caption="Threshold sweep: a higher threshold states less and is right more often"))
    tb = result.get("textbook")
    if tb:
        tables.append(Table(["Misclassified cells", "Statements", "Match predicted class's textbook", "Match own annotation",
                             "Discriminating statements", "… match textbook", "… match own annotation"],
                            [[tb["n_misclassified"], tb["n_statements"], tb["match_predicted_textbook"],
                              tb["match_own_annotation"], tb["n_discriminating_statements"],
                              tb["discriminating_match_predicted_textbook"], tb["discriminating_match_own_annotation"]]],
                            caption="Textbook test: on misclassified cells, does the sentence describe the predicted "
                                    "class's typical cell (modal WBCAtt train values) or the cell itself? Discriminating "
                                    "statements are those where the two differ."))
    text = (f"Each evaluated cell gets the sentence `hemaclip describe` would write: the predicted value of each attribute "
            f"({source}, temperature fitted per attribute on the val split) is stated only if its calibrated probability "
            f"exceeds {threshold:g}; what a sentence states is read back from its text. Agreement is the fraction of those "
            f"statements that match the WBCAtt annotation; coverage is statements made / (11 × images).")
    ctx.sections.append(Section("Faithfulness of generated descriptions", "\n\n".join([text, *notes]), tables))


def _topk_metrics(res: Mapping[str, Any], n_gallery: int, ks: Sequence[int]) -> dict[str, Any]:
    """retrieval_metrics on the top-k form of hemaclip.tasks.retrieval, with Recall@k from n_relevant."""
    rel = np.asarray(res["relevant"], dtype=bool)
    n_rel = np.asarray(res["n_relevant"])
    if rel.shape[1] == 0:
        return {"n_queries": int(rel.shape[0]), "n_gallery": int(n_gallery), "note": "gallery too small"}
    out = retrieval_metrics(np.asarray(res["scores"], dtype=np.float64), rel, ks)
    has = n_rel > 0
    for k in ks:
        kk = min(k, rel.shape[1])
        out[f"recall@{k}"] = float(np.mean(rel[has, :kk].sum(axis=1) / n_rel[has])) if has.any() else float("nan")
    out.pop("mrr", None)  # no cut-off MRR needs the full ranking
    out["n_gallery"] = int(n_gallery)
    out["n_queries_without_relevant"] = int(np.sum(~has))
    return out


def _retrieval_part(ctx: _Context) -> None:
    from hemaclip.tasks import retrieval as rt

    ctx.log("retrieval")
    ks = list(RETRIEVAL_KS)
    results: dict[str, Any] = {}
    fs = ctx.eval_fs
    figs = []
    if ctx.model is not None:
        t2i = rt.text_to_image_by_class(ctx.model, ctx.eval_zs, ctx.prompt_set, ctx.prompt_dataset, classes=ctx.zs_classes,
                                        text_cache=ctx.text_cache)
        results["text_to_image_by_class"] = retrieval_metrics(t2i["scores"], t2i["relevant"], ks)
        i2t = rt.image_to_text_by_class(ctx.model, ctx.eval_zs, ctx.prompt_set, ctx.prompt_dataset, classes=ctx.zs_classes,
                                        text_cache=ctx.text_cache)
        if len(i2t["indices"]):
            results["image_to_text_by_class"] = retrieval_metrics(i2t["scores"], i2t["relevant"], ks)
        if any(a is not None for a in fs.attributes):
            t2a = rt.text_to_image_by_attribute(ctx.model, fs, ctx.prompt_set, text_cache=ctx.text_cache)
            results["text_to_image_by_attribute"] = retrieval_metrics(t2a["scores"], t2a["relevant"], ks)
            results["image_to_text_by_attribute"] = retrieval_metrics(t2a["scores"].T, t2a["relevant"].T, ks)
        figs.append(_retrieval_grid(ctx, t2i))
    if len(fs) >= 2:
        kmax = max(ks)
        results["image_to_image_by_class"] = _topk_metrics(rt.image_to_image(fs, k=kmax), len(fs) - 1, ks)
        annotated = np.array([i for i, a in enumerate(fs.attributes) if a is not None], dtype=np.int64)
        if len(annotated) >= 2:
            sub = fs.subset(annotated)
            profile = ["|".join(a[n] for n in ATTRIBUTE_NAMES) for a in sub.attributes]
            results["image_to_image_by_attribute_profile"] = _topk_metrics(
                rt.image_to_image(sub, k=kmax, labels=profile), len(sub) - 1, ks)
    paired = _paired_retrieval(ctx)
    if paired:
        results["paired_caption"] = paired
    ctx.metrics["retrieval"] = results
    rows = []
    for task, m in results.items():
        if "hit@1" not in m:
            continue
        rows.append([task.replace("_", " "), m["n_queries"], m["n_gallery"]]
                    + [m.get(f"{what}@{k}") for what in ("hit", "precision", "mrr", "recall") for k in (1, 5, 10)])
    columns = ["Task", "Queries", "Gallery"] + [f"{w}@{k}" for w in ("Hit", "P", "MRR", "R") for k in (1, 5, 10)]
    text = ("Any relevant gallery item counts: for class tasks every item of the query's class, for attribute tasks every "
            "image with that attribute value (text→image) or every value the image has (image→text), for image→image "
            "every other image with the same class (or the same 11-attribute profile). k = 1, 3, 5, 10 are in metrics.json.")
    if ctx.model is None:
        text += " External features have no text tower: only image→image retrieval applies."
    tables = [Table(columns, rows, caption="Retrieval (k = 1, 5, 10)")]
    if paired:
        tables.append(Table(["Direction", "Pairs", "R@1", "R@5", "R@10", "median rank"],
                            [[d.replace("_", " "), m["n_queries"], m["R@1"], m["R@5"], m["R@10"], m.get("median_rank")]
                             for d, m in paired.items() if isinstance(m, dict)],
                            caption="open_clip-style 1:1 recall: only an image's own caption counts (pessimistic: "
                                    "cells with identical attributes share one caption wording)"))
    ctx.sections.append(Section("Retrieval", text, tables, figs))


PAIRED_MAX_IMAGES = 4000  # the 1:1 score matrix is N x N


def _paired_retrieval(ctx: _Context) -> dict[str, Any]:
    """open_clip's paired R@k: each attributed image against one generated caption of its own attributes."""
    from hemaclip.tasks import retrieval as rt
    from hemaclip.text.captions import caption_variants

    if ctx.model is None:
        return {}
    rows = np.array([i for i, a in enumerate(ctx.eval_fs.attributes) if a is not None], dtype=np.int64)[:PAIRED_MAX_IMAGES]
    if len(rows) < 2:
        return {}
    sub = ctx.eval_fs.subset(rows)
    captions = [caption_variants(a, n=1, seed=ctx.seed)[0] for a in sub.attributes]
    res = rt.paired_image_text(ctx.model, sub, captions, text_cache=ctx.text_cache)
    out: dict[str, Any] = {"caption_seed": ctx.seed}
    for direction in ("image_to_text", "text_to_image"):
        out[direction] = paired_recall_at_k(np.asarray(res[direction]["scores"]), (1, 5, 10))
    return out


def _thumbnail(path: str, size: int = 192) -> Any:
    from hemaclip.data.preprocess import decode_image

    image = decode_image(path)
    image.thumbnail((size, size))
    return image


def _retrieval_grid(ctx: _Context, t2i: Mapping[str, Any]) -> tuple[Path, str]:
    fs = ctx.eval_zs
    queries, results = [], []
    prompts = ctx.prompt_set.class_prompts(ctx.prompt_dataset)
    for q, name in enumerate(t2i["queries"]):
        order = np.argsort(-np.asarray(t2i["scores"][q]), kind="stable")[:3]
        queries.append(f"{name}: “{prompts[name][0]}”")
        results.append([(_thumbnail(fs.paths[i]), bool(t2i["relevant"][q, i]), fs.labels[i]) for i in order])
    path = plots.plot_retrieval_grid(queries, results, _figure(ctx.out, "retrieval_grid.png", ctx.figures), k=3)
    return path, "Top-3 images per class query (green frame: image of that class; red: another class)."


def _probe_part(ctx: _Context) -> None:
    from hemaclip.tasks.probes import run_probes

    if ctx.train_fs is None or len(ctx.train_fs) == 0:
        ctx.notes.append("Probes skipped: " + (ctx.train_missing or "no train images."))
        return
    ctx.log("probes")
    probes = run_probes(ctx.train_fs, ctx.eval_fs, kinds=PROBE_KINDS, seed=ctx.seed)
    out: dict[str, Any] = {}
    rows = []
    for kind, r in probes.items():
        res = classification_metrics(r["y_true"], r["y_pred"], r["classes"], ctx.n_boot, ctx.seed,
                                     cis=("accuracy", "macro_f1", "weighted_f1"))
        res.update(n_train=r["n_train"], n_test=r["n_test"], unseen_test_labels=r["unseen_test_labels"])
        out[kind] = res
        rows.append([kind, r["n_train"], r["n_test"], res["macro_f1"], res["weighted_f1"], res["accuracy"]])
    ctx.probe_pred = {kind: r["y_pred"] for kind, r in probes.items()}
    ctx.metrics["probes"] = out
    text = ("Probes on frozen, L2-normalised image features, fitted on the train split and tested on the evaluated split "
            "(fixed hyper-parameters, see hemaclip.tasks.probes).")
    ctx.sections.append(Section("Linear, kNN and MLP probes", text,
                                [Table(["Probe", "Train images", "Test images", "Macro F1", "Weighted F1", "Accuracy"], rows,
                                       caption="Probes (95 % bootstrap intervals)")]))


def _nshot_part(ctx: _Context) -> None:
    from hemaclip.tasks.probes import nshot_curve

    if ctx.train_fs is None or len(ctx.train_fs) == 0:
        ctx.notes.append("n-shot curves skipped: " + (ctx.train_missing or "no train images."))
        return
    ctx.log("n-shot curves")
    rows = nshot_curve(ctx.train_fs, ctx.eval_fs, shots=ctx.nshot_shots, seeds=ctx.nshot_seeds, kinds=NSHOT_KINDS)
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["kind"], r["shots"]), []).append(r)
    summary = []
    for (kind, shots), group in grouped.items():
        values = []
        for r in group:
            values.append(macro_f1(r["y_true"], r["y_pred"], r["classes"]))
        summary.append({
            "kind": kind,
            "shots": int(shots),
            "macro_f1": float(np.mean(values)),
            "low": float(np.min(values)),
            "high": float(np.max(values)),
            "values": [float(v) for v in values],
            "seeds": [int(r["seed"]) for r in group],
            "n_train": [int(r["n_train"]) for r in group],
            "per_class": group[0]["per_class"],
        })
    ctx.metrics["nshot"] = {"shots": list(ctx.nshot_shots), "seeds": list(ctx.nshot_seeds), "kinds": list(NSHOT_KINDS),
                            "rows": summary}
    plot_rows = [dict(r) for r in summary]
    if ctx.zs is not None:
        plot_rows.append({"kind": "prompts", "shots": 0,
                          "macro_f1": ctx.metrics["zero_shot"]["classes"]["macro_f1"]["point"]})
    fig = plots.plot_nshot_curves(plot_rows, _figure(ctx.out, "nshot_curves.png", ctx.figures),
                                  title="n-shot macro F1 (mean over seeds; shaded: min-max)")
    table = Table(["Probe", "Images per class", "Macro F1 (mean)", "min", "max"],
                  [[r["kind"], r["shots"], r["macro_f1"], r["low"], r["high"]] for r in summary],
                  caption=f"n-shot curves, seeds {', '.join(map(str, ctx.nshot_seeds))}")
    ctx.sections.append(Section("n-shot curves",
                                "Probes trained on n images per class of the train split (classes with fewer images use all; "
                                "actual counts in metrics.json), tested on the whole evaluated split.",
                                [table], [(fig, "Macro F1 against training images per class.")]))


ATTRIBUTE_NSHOT_SHOTS = (1, 5, 10, 25, 50, 100, 200)


def _attribute_probe_part(ctx: _Context) -> None:
    """Logistic probe per WBCAtt attribute (train split -> evaluated split) and its n-shot curve."""
    from hemaclip.tasks.probes import attribute_labels, nshot_curve, run_probes

    if ctx.train_fs is None or not any(a is not None for a in ctx.eval_fs.attributes):
        return
    if not any(a is not None for a in ctx.train_fs.attributes):
        return
    ctx.log("attribute probes")
    blocks: dict[str, Any] = {}
    curves: dict[int, list[float]] = {}
    for name, values in ATTRIBUTES.items():
        result = run_probes(ctx.train_fs, ctx.eval_fs, kinds=("logistic",), label_fn=attribute_labels(name), seed=ctx.seed)["logistic"]
        blocks[name] = _attribute_block(result["y_true"], result["y_pred"], list(values), ctx.n_boot, ctx.seed)
        for row in nshot_curve(ctx.train_fs, ctx.eval_fs, shots=ATTRIBUTE_NSHOT_SHOTS, seeds=ctx.nshot_seeds,
                               kinds=("logistic",), label_fn=attribute_labels(name)):
            curves.setdefault(int(row["shots"]), []).append(macro_f1(row["y_true"], row["y_pred"], list(values)))
    table_rows, mean = _attribute_summary(blocks)
    n_seeds = len(ctx.nshot_seeds)
    summary = []
    for shots, values in sorted(curves.items()):
        per_seed = np.asarray(values).reshape(len(ATTRIBUTES), n_seeds).mean(axis=0)  # mean over attributes, per seed
        summary.append({"kind": "logistic (mean of 11 attributes)", "shots": shots, "macro_f1": float(per_seed.mean()),
                        "low": float(per_seed.min()), "high": float(per_seed.max())})
    ctx.metrics["attribute_probes"] = {"logistic": blocks, "mean_macro_f1": mean, "nshot": summary}
    fig = plots.plot_per_attribute_f1(table_rows, _figure(ctx.out, "attribute_probe_f1.png", ctx.figures),
                                      reference=plots.HUMAN_INTER_ANNOTATOR_F1, title="Attribute macro F1, logistic probe")
    nfig = plots.plot_nshot_curves(summary, _figure(ctx.out, "attribute_nshot.png", ctx.figures),
                                   title="Attribute n-shot: mean macro F1 over the 11 attributes")
    ctx.sections.append(_attribute_section(
        "Attribute probes", blocks, mean, fig,
        "A logistic probe per attribute (fixed C = 1, train split -> evaluated split) and its n-shot curve "
        "(n images per attribute value, mean over the 11 attributes; shaded: min-max over seeds)."))
    ctx.sections[-1].figures.append((nfig, "Attribute n-shot curve."))


def _lvlm_part(ctx: _Context) -> None:
    from hemaclip.tasks.probes import LVLM_BENCHMARK_PRESET, fit_predict, lvlm_test_subset, sample_per_class

    preset = LVLM_BENCHMARK_PRESET
    fs = ctx.eval_fs
    try:
        sub_idx = _lvlm_rows(fs, lvlm_test_subset, preset)
    except DataError as err:
        ctx.notes.append(f"LVLM benchmark preset skipped: {err}")
        return
    ctx.log("LVLM benchmark preset")
    rows_out: dict[str, Any] = {}
    wf1 = ("weighted_f1", "macro_f1")
    if ctx.zs is not None:
        pos = {int(i): j for j, i in enumerate(ctx.zs["indices"])}
        keep = [pos[i] for i in sub_idx if i in pos]
        if keep:
            rows_out["hemaclip zero-shot (prompts)"] = classification_metrics(
                [ctx.zs["y_true"][j] for j in keep], [ctx.zs_pred[j] for j in keep], ctx.zs["class_names"],
                ctx.n_boot, ctx.seed, cis=wf1)
    if ctx.probe_pred and "logistic" in ctx.probe_pred:
        labels = sorted(set(ctx.train_fs.labels) | set(fs.labels))
        rows_out["logistic probe, full train split"] = classification_metrics(
            [fs.labels[i] for i in sub_idx], [ctx.probe_pred["logistic"][i] for i in sub_idx], labels, ctx.n_boot, ctx.seed,
            cis=wf1)
        pick = sample_per_class(ctx.train_fs.labels, LVLM_FEW_SHOT, 0)
        pred, _ = fit_predict("logistic", ctx.train_fs.features[pick], [ctx.train_fs.labels[i] for i in pick],
                              fs.features[sub_idx], seed=0)
        rows_out[f"logistic probe, {LVLM_FEW_SHOT} train images per class"] = classification_metrics(
            [fs.labels[i] for i in sub_idx], [str(p) for p in pred], labels, ctx.n_boot, ctx.seed, cis=wf1)
    if not rows_out:
        return
    compact = {k: {"weighted_f1": v["weighted_f1"], "macro_f1": v["macro_f1"], "n": v["n"]} for k, v in rows_out.items()}
    counts = Counter(fs.labels[i] for i in sub_idx)
    ctx.metrics["lvlm_benchmark"] = {
        "per_class": preset.per_class,
        "seed": preset.seed,
        "n_images": int(len(sub_idx)),
        "images_per_class": dict(sorted(counts.items())),
        "results": compact,
        "reference_weighted_f1": dict(preset.reference_weighted_f1),
        "reference_note": preset.reference_note,
    }
    table_rows = [[k, v["n"], v["weighted_f1"], v["macro_f1"]] for k, v in compact.items()]
    table_rows += [[f"{k} (quoted)", None, float(v), None] for k, v in preset.reference_weighted_f1.items()]
    text = (f"The cytomorphology LVLM benchmark protocol: up to {preset.per_class} evaluated images per class (seed "
            f"{preset.seed}), weighted F1. The GPT-4o rows are QUOTED from the published benchmark, not reproduced by "
            "hemaclip; its image list and class set differ from this subset, so the comparison is indicative only.")
    ctx.sections.append(Section("LVLM benchmark preset", text,
                                [Table(["System", "Images", "Weighted F1", "Macro F1"], table_rows,
                                       caption="Weighted F1 on the benchmark-sized subset")]))


def _lvlm_rows(fs: Any, lvlm_test_subset: Callable[..., Any], preset: Any) -> list[int]:
    sub = lvlm_test_subset(fs, per_class=preset.per_class, seed=preset.seed, split=None)
    pos = {p: i for i, p in enumerate(fs.paths)}
    return [pos[p] for p in sub.paths]


def _embedding_part(ctx: _Context) -> None:
    from hemaclip.tasks.zero_shot import class_embeddings

    fs = ctx.eval_zs if ctx.eval_zs is not None else ctx.eval_fs
    n = len(fs)
    if n < 2:
        return
    ctx.log("embedding map")
    rng = np.random.default_rng(ctx.seed)
    idx = np.sort(rng.choice(n, size=min(n, EMBED_MAX_POINTS), replace=False))
    feats = [fs.features[idx]]
    colours = [fs.labels[i] for i in idx]
    markers = ["image"] * len(idx)
    if ctx.model is not None:
        prompts = ctx.prompt_set.class_prompts(ctx.prompt_dataset)
        emb = class_embeddings(ctx.model, {c: prompts[c] for c in ctx.zs_classes}, ctx.text_cache)
        feats.append(emb)
        colours += list(ctx.zs_classes)
        markers += ["class prompt"] * len(ctx.zs_classes)
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: scikit-learn's t-SNE spins badly when its threads compete for busy cores
    # (seconds become minutes on a 2-core machine running anything else).
    with threadpool_limits(limits=1, user_api="openmp"):
        points, method = plots.embed_2d(np.concatenate(feats), method=ctx.embed_method, seed=ctx.seed)
    figs = [(plots.plot_embedding_map(points, colours, _figure(ctx.out, "embedding_map_class.png", ctx.figures),
                                      markers=markers, method=method, title="Image embeddings by class"),
             "2-D map of image embeddings (and class prompt embeddings), coloured by class.")]
    info: dict[str, Any] = {"method": method, "n_images": int(len(idx)),
                            "n_prompts": int(len(markers) - len(idx))}
    attr = ctx.map_attribute
    img_attrs = [fs.attributes[i] for i in idx]
    has = np.array([a is not None for a in img_attrs])
    if attr and has.any():
        if attr not in ATTRIBUTES:
            raise HemaclipError(f"unknown map attribute '{attr}'; choose from {', '.join(ATTRIBUTE_NAMES)}")
        sel = np.flatnonzero(has)
        values = [img_attrs[i][attr] for i in sel]
        figs.append((plots.plot_embedding_map(points[sel], values, _figure(ctx.out, f"embedding_map_{attr}.png", ctx.figures),
                                              method=method, title=f"Image embeddings by {attr}"),
                     f"The same map, images only, coloured by {attr}."))
        info["attribute"] = attr
    ctx.metrics["embedding_map"] = info
    ctx.sections.append(Section("Embedding map", f"{len(idx)} evaluated images ({method}).", [], figs))


# --------------------------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------------------------- #


@dataclass
class _Context:
    out: Path
    dataset: str
    split: str
    n_boot: int
    seed: int
    log: _Log
    model: Any = None
    text_cache: Any = None
    prompt_set: Any = None
    prompt_dataset: str = ""
    zs_classes: list[str] = field(default_factory=list)
    eval_fs: Any = None  # labels as the data has them (folder class names for folders)
    eval_zs: Any = None  # labels mapped onto prompt classes (== eval_fs outside OOD)
    val_zs: Any = None
    train_fs: Any = None
    train_missing: str = ""
    zs: Any = None
    zs_pred: list[str] = field(default_factory=list)
    head_pred: Any = None
    zs_attr_pred: dict[str, Any] = field(default_factory=dict)
    head_attr_pred: dict[str, Any] = field(default_factory=dict)
    probe_pred: dict[str, list[str]] = field(default_factory=dict)
    nshot_shots: tuple[int, ...] = NSHOT_SHOTS
    nshot_seeds: tuple[int, ...] = NSHOT_SEEDS
    embed_method: str = "auto"
    map_attribute: str | None = DEFAULT_MAP_ATTRIBUTE
    metrics: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data_root: Any = None


def _relabel(fs: Any, mapping: Mapping[str, str] | None) -> Any:
    if fs is None or mapping is None:
        return fs
    return replace(fs, labels=[mapping.get(label, f"<unmapped:{label}>") for label in fs.labels])


def _prompt_vocabularies(prompt_set: Any) -> dict[str, list[str]]:
    return {d: list(prompt_set.classes(d)) for d in prompt_set.datasets}


def load_model_features(
    checkpoint: str | Path | None,
    record_splits: Mapping[str, Sequence[Any]],
    batch_size: int = 128,
    device: str = "cpu",
    progress: bool = False,
    stain_normalizer: Any = None,
) -> tuple[Any, Path, str, dict[str, Any]]:
    """Load a checkpoint (None = the shipped default) and extract features for each named record list.

    Returns (model, checkpoint path, checkpoint sha1, {name: FeatureSet}). Features are cached on
    disk per record list (see :func:`hemaclip.tasks.features.extract_features`). `stain_normalizer`
    (from :func:`hemaclip.data.stain.get_normalizer`) is applied to every image of every list.
    """
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.features import extract_features

    path = resolve_checkpoint(checkpoint)
    model, _meta = load_for_inference(path, map_location=device)
    sha1 = file_sha1(path)
    sets = {
        name: extract_features(model, list(records), checkpoint_id=sha1, batch_size=batch_size, device=device,
                               progress=progress, stain_normalizer=stain_normalizer)
        for name, records in record_splits.items()
    }
    return model, path, sha1, sets


def run_evaluation(
    checkpoint: Path | None,
    dataset: str,
    split: str = "test",
    out: Path | None = None,
    data_root: Path | None = None,
    folder: Path | None = None,
    class_map: Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    probes: bool = True,
    nshot: bool = True,
    features: Path | None = None,
    index_csv: Path | None = None,
    progress: bool = False,
    *,
    max_per_class: int | None = None,
    nshot_shots: Sequence[int] = NSHOT_SHOTS,
    nshot_seeds: Sequence[int] = NSHOT_SEEDS,
    prompts: Path | None = None,
    split_dir: Path | None = None,
    embed_method: str = "auto",
    map_attribute: str | None = DEFAULT_MAP_ATTRIBUTE,
    batch_size: int = 128,
    device: str = "cpu",
    stain_normalizer: Any = None,
) -> dict[str, Any]:
    """Evaluate `checkpoint` (None = the shipped default) on `split` of `dataset`; write the report into `out`.

    See the module docstring for what is measured. `out` is required (it is a positional
    parameter with a default only so the documented argument order works). Keyword-only options:
    `max_per_class` (at most that many images per class in every split used: a fast subset for
    tests and quick looks), `nshot_shots` / `nshot_seeds` (the n-shot grid), `prompts` (a prompt
    file; default the packaged one), `split_dir` (where dataset splits made here are saved),
    `embed_method` ("auto", "tsne", "pca", "umap"), `map_attribute` (colour of the second
    embedding map; None for none), `batch_size`, `device`, `stain_normalizer` (a callable from
    :func:`hemaclip.data.stain.get_normalizer`, applied to the images of every split used). With `features` + `index_csv` the
    external encoder's features are evaluated instead of a checkpoint (give no checkpoint then).
    Returns the metrics dict also written to ``out/metrics.json``. Raises a one-line
    HemaclipError / DataError for an unknown split, a dataset without images in the split, an
    empty selection or a bad class map.
    """
    t0 = time.perf_counter()
    if out is None:
        raise HemaclipError("run_evaluation needs an output folder (out)")
    _check_split(split)
    if int(n_boot) < 0:
        raise HemaclipError(f"n_boot must be >= 0, got {n_boot}")
    if max_per_class is not None and int(max_per_class) < 1:
        raise HemaclipError(f"max_per_class must be >= 1, got {max_per_class}")
    if (features is None) != (index_csv is None):
        raise HemaclipError("external features need both a features file and its index CSV")
    if features is not None and checkpoint is not None:
        raise HemaclipError("give either a checkpoint or external features (features + index_csv), not both")
    if class_map is not None and dataset != "folder":
        raise HemaclipError(f"a class map applies to dataset 'folder' only, not '{dataset}'")
    out = Path(out)
    log = _Log(progress)
    ctx = _Context(out=out, dataset=dataset, split=split, n_boot=int(n_boot), seed=int(seed), log=log, data_root=data_root,
                   nshot_shots=tuple(int(s) for s in nshot_shots), nshot_seeds=tuple(int(s) for s in nshot_seeds),
                   embed_method=embed_method, map_attribute=map_attribute)
    external = features is not None
    header: dict[str, Any] = {
        "hemaclip_version": hemaclip.__version__,
        "dataset": dataset,
        "split": split,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "max_per_class": max_per_class,
        "mode": "external_features" if external else "checkpoint",
        "stain_normalization": getattr(stain_normalizer, "name", None) or "none",
    }
    if external and stain_normalizer is not None:
        raise HemaclipError("stain normalisation needs images; it does not apply to external features")
    mapping: ClassMapping | None = None
    unmapped: list[str] = []
    if external:
        from hemaclip.cache import file_sha1
        from hemaclip.tasks.features import load_external_features

        log("loading external features")
        fs_all = load_external_features(features, index_csv)
        header["checkpoint"] = f"external:{Path(features).name}"
        header["checkpoint_sha1"] = file_sha1(features)
        header["features"] = str(features)
        header["index_csv"] = str(index_csv)
        eval_fs = _cap_feature_set(fs_all.by_split(split), max_per_class, seed)
        if len(eval_fs) == 0:
            raise DataError(f"{index_csv}: no rows in split '{split}'")
        train_fs = None
        if split not in ("train", "all"):
            train_fs = _cap_feature_set(fs_all.by_split("train"), max_per_class, seed)
        ctx.eval_fs, ctx.train_fs = eval_fs, train_fs
        ctx.train_missing = "the evaluated split contains the train split." if split in ("train", "all") else "no train rows."
        ctx.notes.append("External encoder: no text tower, so zero-shot, attribute, head, calibration and image-text "
                         "retrieval parts do not apply; only probes, n-shot curves, the LVLM probe rows, image→image "
                         "retrieval and the embedding map are reported.")
    else:
        from hemaclip.data.datasets import load_dataset
        from hemaclip.models.text_cache import PooledTextCache
        from hemaclip.text.prompts import load_prompts

        log(f"loading dataset {dataset}")
        ds = load_dataset(dataset, data_root=data_root, split_dir=split_dir, seed=0, folder=folder)
        prompt_set = load_prompts(prompts)
        ctx.prompt_set = prompt_set
        vocabularies = _prompt_vocabularies(prompt_set)
        if dataset == "folder":
            rows, hint = (load_class_map(class_map) if class_map is not None else (None, None))
            mapping = resolve_class_map(rows, list(ds.classes), vocabularies, hint,
                                        source=str(class_map) if class_map is not None else "identity")
            ctx.prompt_dataset = mapping.prompt_dataset
            ctx.zs_classes = list(mapping.targets)
            unmapped = sorted(mapping.unmapped)
        else:
            if dataset not in vocabularies:
                raise DataError(f"{prompt_set.source}: no prompts for dataset '{dataset}'")
            ctx.prompt_dataset = dataset
            ctx.zs_classes = list(vocabularies[dataset])
        eval_records = _split_records(ds, split, max_per_class, seed)
        if not eval_records:
            raise DataError(f"dataset '{dataset}' has no images in split '{split}'")
        needed = {"eval": eval_records}
        if split not in ("val", "all"):
            needed["val"] = _split_records(ds, "val", max_per_class, seed)
        if (probes or nshot) and split not in ("train", "all"):
            needed["train"] = _split_records(ds, "train", max_per_class, seed)
        ctx.train_missing = ("the evaluated split contains the train split." if split in ("train", "all")
                             else "the dataset has no train images.")
        log(f"features for {', '.join(f'{k} ({len(v)})' for k, v in needed.items())}")
        model, path, sha1, sets = load_model_features(checkpoint, needed, batch_size=batch_size, device=device,
                                                      progress=progress, stain_normalizer=stain_normalizer)
        header["checkpoint"] = display_path(path)
        header["checkpoint_sha1"] = sha1
        ctx.model = model
        ctx.text_cache = PooledTextCache(model.text)
        ctx.eval_fs = sets["eval"]
        ctx.train_fs = sets.get("train")
        m = mapping.mapping if mapping is not None else None
        ctx.eval_zs = _relabel(ctx.eval_fs, m)
        ctx.val_zs = _relabel(sets.get("val"), m)
    header["n_images"] = int(len(ctx.eval_fs))
    header["unmapped_classes"] = unmapped
    ctx.metrics.update(header)
    ctx.metrics["data"] = {
        "eval_images_per_class": dict(sorted(Counter(ctx.eval_fs.labels).items())),
        "n_train": int(len(ctx.train_fs)) if ctx.train_fs is not None else 0,
        "n_val": int(len(ctx.val_zs)) if ctx.val_zs is not None else 0,
    }
    if mapping is not None:
        excluded = Counter(label for label in ctx.eval_fs.labels if label in mapping.unmapped)
        ctx.metrics["ood"] = {
            "class_map": str(class_map) if class_map is not None else None,
            "prompt_dataset": mapping.prompt_dataset,
            "mapping": mapping.mapping,
            "unmapped_classes": unmapped,
            "unmapped_reasons": mapping.unmapped,
            "unmapped_images": dict(sorted(excluded.items())),
            "zero_shot_classes": list(mapping.targets),
        }

    if not external:
        _zero_shot_class_part(ctx)
        _zero_shot_attribute_part(ctx)
        _heads_part(ctx)
        _calibration_part(ctx)
        _faithfulness_part(ctx)
    _retrieval_part(ctx)
    if probes:
        _probe_part(ctx)
    if nshot:
        _nshot_part(ctx)
        _attribute_probe_part(ctx)
    if probes or not external:
        _lvlm_part(ctx)
    _embedding_part(ctx)

    ctx.metrics["notes"] = ctx.notes
    ctx.metrics["figures"] = ctx.figures
    ctx.metrics["seconds"] = round(time.perf_counter() - t0, 2)
    sections = [_overview_section(ctx, mapping)] + ctx.sections
    log("writing report")
    write_report(out, f"hemaclip evaluation: {dataset} / {split}", sections, ctx.metrics,
                 checkpoint=ctx.metrics.get("checkpoint"))
    log("done")
    return ctx.metrics


def _overview_section(ctx: _Context, mapping: ClassMapping | None) -> Section:
    m = ctx.metrics
    rows = [
        ["Dataset", m["dataset"]], ["Split", m["split"]], ["Images evaluated", m["n_images"]],
        ["Train images (probes)", m["data"]["n_train"]], ["Val images (temperature)", m["data"]["n_val"]],
        ["Encoder", m.get("checkpoint")], ["SHA-1", m.get("checkpoint_sha1")],
        ["Bootstrap resamples", m["n_boot"]], ["Seed", m["seed"]],
    ]
    if m.get("max_per_class") is not None:
        rows.append(["Images per class capped at", m["max_per_class"]])
    text = []
    if mapping is not None:
        pairs = ", ".join(f"{k} → {v}" for k, v in mapping.mapping.items())
        text.append(f"Out-of-distribution folder, zero-shot over '{mapping.prompt_dataset}' prompt classes; class map: {pairs}.")
        if mapping.unmapped:
            text.append("Unmapped folder classes (left out of zero-shot, calibration and text retrieval; still used by "
                        "probes and image→image retrieval under their folder names): "
                        + "; ".join(f"{k} ({v})" for k, v in mapping.unmapped.items()) + ".")
    text += ctx.notes
    return Section("Overview", "\n\n".join(text), [Table(["", "Value"], rows)])
