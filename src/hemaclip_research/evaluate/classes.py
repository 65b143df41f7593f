"""Parts: classes and attributes read through text prompts (zero-shot) and by the supervised heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.errors import DataError
from hemaclip.io import display_path
from hemaclip.metrics.baselines import beats_baselines, trivial_baselines
from hemaclip.metrics.classification import attribute_table
from hemaclip.metrics.summary import classification_metrics
from hemaclip_research import plots
from hemaclip_research.evaluate.inputs import EvalInputs, Figures, Part, argmax_labels
from hemaclip_research.report import Section, Table
from hemaclip.tasks.features import FeatureSet

__all__ = [
    "WORDING_NOTE",
    "ZeroShotReading",
    "has_unseen_wording",
    "head_class_predictions",
    "head_class_reading",
    "heads_part",
    "zero_shot_attribute_part",
    "zero_shot_class_part",
    "zero_shot_reading",
]


@dataclass(frozen=True)
class ZeroShotReading:
    """The evaluated images read by the class prompts: the rows with a prompt class, logits, predictions."""

    y_true: list[str]
    logits: np.ndarray
    class_names: list[str]
    indices: np.ndarray  # rows of eval_zero_shot_features that have a prompt class
    pred: list[str]
    missing_labels: int
    missing_label_counts: dict[str, int]


def zero_shot_reading(inputs: EvalInputs, wording: str = "train") -> ZeroShotReading:
    """Zero-shot class logits and predictions of the evaluated images through the prompt file's `wording`
    (one-line DataError if no image has a prompt class)."""
    from hemaclip.tasks.zero_shot import zero_shot_classes

    zs = zero_shot_classes(inputs.zero_shot_setting, inputs.eval_zero_shot_features, wording=wording)
    if len(zs["y_true"]) == 0:
        raise DataError(
            f"no '{inputs.split}' image of dataset '{inputs.dataset}' has a class with '{inputs.prompt_dataset}' prompts "
            f"(classes {', '.join(inputs.prompt_classes)})"
        )
    return ZeroShotReading(zs["y_true"], zs["logits"], zs["class_names"], zs["indices"], argmax_labels(zs["logits"], zs["class_names"]),
                           zs["missing_labels"], zs["missing_label_counts"])


def head_class_predictions(feature_set: FeatureSet, rows: np.ndarray, classes: Sequence[str]) -> tuple[list[str] | None, str]:
    """Class-head predictions restricted to `classes` (by name), or (None, reason)."""
    if feature_set.class_logits is None:
        return None, "the checkpoint has no class head"
    vocab = list(feature_set.meta.get("class_names") or [])
    missing = [c for c in classes if c not in vocab]
    if missing:
        return None, f"class(es) {', '.join(missing)} are not in the model's head vocabulary ({', '.join(vocab)})"
    cols = [vocab.index(c) for c in classes]
    return argmax_labels(feature_set.class_logits[rows][:, cols], list(classes)), ""


def head_class_reading(inputs: EvalInputs, zero_shot: ZeroShotReading) -> tuple[list[str] | None, str]:
    """The class head on the rows the prompts read, restricted to the prompt classes, or (None, reason)."""
    return head_class_predictions(inputs.eval_zero_shot_features, np.asarray(zero_shot.indices), zero_shot.class_names)


def overall_table(result: Mapping[str, Any], caption: str) -> Table:
    return Table(
        ["Images", "Accuracy", "Balanced accuracy", "Macro F1", "Weighted F1"],
        [[result["n"], result["accuracy"], result["balanced_accuracy"], result["macro_f1"], result["weighted_f1"]]],
        caption=f"{caption} (95 % bootstrap intervals)",
    )


BASELINE_NOTE = (
    "Trivial baselines beside every row, from the train split's labels (never the scored ones): majority = every image gets "
    "the train split's most frequent label; prior random = each image drawn from the train split's label frequencies "
    "(expected F1, exact). A row marked 'NOT above baselines' does not beat both."
)


def reference_labels(inputs: EvalInputs, attribute: str | None = None) -> tuple[list[str], str]:
    """The labels baselines take their prior from: the train split's classes (or one attribute's values);
    the scored split itself only when there is no train split (said in the name)."""
    fs, name = ((inputs.train_features, "train split") if inputs.train_features is not None
                else (inputs.eval_zero_shot_features, "the scored split (no train split)"))
    if attribute is None:
        return [str(y) for y in fs.labels], name
    return [a[attribute] for a in fs.attributes if a is not None and attribute in a], name


def baseline_mark(scores: Sequence[float | None], base: Mapping[str, Any]) -> str:
    """'' when every score beats both baselines, else 'NOT above baselines' (naming which scores do not)."""
    below = [i for i, s in enumerate(scores) if beats_baselines(s, base["majority"], base["prior_random"]) is False]
    if not below:
        return ""
    return "NOT above baselines" if len(scores) == 1 else "NOT above baselines: " + ", ".join(("trained", "unseen")[i] for i in below)


def per_class_baselines(baselines: Mapping[str, Any], name: str) -> dict[str, float]:
    """One class's majority and prior-random F1."""
    return {"majority": baselines["majority"]["per_class"].get(name, 0.0), "prior_random": baselines["prior_random"]["per_class"].get(name, 0.0)}


def per_class_table(result: Mapping[str, Any], more_f1: Mapping[str, Mapping[str, Any]] | None = None,
                    baselines: Mapping[str, Any] | None = None) -> Table:
    """Precision, recall, F1 and images per class; `more_f1` adds an F1 column per other reading (by its title);
    `baselines` (:func:`hemaclip.metrics.baselines.trivial_baselines`) adds their F1 and the mark of rows not above them."""
    more = dict(more_f1 or {})
    extra = ["Majority F1", "Prior-random F1", "Mark"] if baselines else []
    columns = ["Class", "Precision", "Recall", "F1", *more, *extra, "Images"]
    rows = []
    for name, v in result["per_class"].items():
        f1s = [v["f1"], *(m["per_class"].get(name, {}).get("f1") for m in more.values())]
        cells = []
        if baselines:
            base = per_class_baselines(baselines, name)
            cells = [base["majority"], base["prior_random"], baseline_mark(f1s, base)]
        rows.append([name, v["precision"], v["recall"], *f1s, *cells, v["support"]])
    if baselines:
        macro = [result["macro_f1"]["point"], *(m["macro_f1"]["point"] for m in more.values())]
        base = {"majority": baselines["majority"]["macro_f1"], "prior_random": baselines["prior_random"]["macro_f1"]}
        rows.append(["macro F1", None, None, *macro, base["majority"], base["prior_random"], baseline_mark(macro, base), result["n"]])
    return Table(columns, rows, caption="Per class" + (f" (baselines' prior: {baselines['reference']})" if baselines else ""))


def class_baselines(inputs: EvalInputs, zero_shot: ZeroShotReading) -> dict[str, Any]:
    """Majority and prior-random baselines of the scored classes (the train split's prior)."""
    reference, name = reference_labels(inputs)
    return trivial_baselines(zero_shot.y_true, zero_shot.class_names, reference, name)


def attribute_block(y_true: Sequence[str], y_pred: Sequence[str], values: Sequence[str], n_boot: int, seed: int,
                    reference: tuple[Sequence[str], str] | None = None) -> dict[str, Any]:
    """Macro F1 (with its interval), accuracy and per-value numbers of one attribute; with `reference`
    (labels, name) its majority and prior-random baselines and whether it beats both."""
    res = classification_metrics(y_true, y_pred, values, n_boot, seed, cis=("macro_f1",))
    block = {
        "n": res["n"],
        "n_choices": len(values),
        "values": list(values),
        "values_evaluated": res["labels_evaluated"],
        "macro_f1": res["macro_f1"],
        "accuracy": res["accuracy"]["point"],
        "per_value": res["per_class"],
    }
    if reference is not None:
        base = trivial_baselines(y_true, values, reference[0], reference[1])
        block["baselines"] = {"reference": base["reference"], "majority_label": base["majority_label"],
                              "majority": base["majority"]["macro_f1"], "prior_random": base["prior_random"]["macro_f1"]}
        block["beats_baselines"] = beats_baselines(res["macro_f1"]["point"], block["baselines"]["majority"], block["baselines"]["prior_random"])
    return block


def attribute_summary(blocks: Mapping[str, Mapping[str, Any]]) -> tuple[list[dict[str, Any]], float | None]:
    """The WBC-CLIP table rows of attribute blocks and their mean macro F1."""
    rows = attribute_table([{"name": k, "n_choices": v["n_choices"], "macro_f1": v["macro_f1"]} for k, v in blocks.items()])
    mean = float(np.mean([r["macro_f1"] for r in rows])) if rows else None
    return rows, mean


def attribute_section(title: str, blocks: Mapping[str, Mapping[str, Any]], mean: float | None, fig: Path, text: str,
                      unseen: tuple[Mapping[str, Mapping[str, Any]], float | None] | None = None) -> Section:
    """The WBC-CLIP table of attribute blocks; `unseen` = (blocks, mean) of the held-out wording, shown beside."""
    def base(v: Mapping[str, Any]) -> list[Any]:
        return [v["baselines"]["majority"], v["baselines"]["prior_random"]] if "baselines" in v else [None, None]

    def mark(v: Mapping[str, Any], scores: list[Any]) -> str:
        return baseline_mark([s["point"] for s in scores], v["baselines"]) if "baselines" in v else ""

    if unseen is None:
        rows = [[k, v["n_choices"], v["macro_f1"], *base(v), mark(v, [v["macro_f1"]]), v["accuracy"], v["n"]] for k, v in blocks.items()]
        rows.append(["mean over attributes", None, mean, *mean_baselines(blocks), "", None, None])
        columns = ["Attribute", "Choices", "Macro F1", "Majority", "Prior random", "Mark", "Accuracy", "Images"]
    else:
        held, held_mean = unseen
        rows = [[k, v["n_choices"], v["macro_f1"], held[k]["macro_f1"], *base(v), mark(v, [v["macro_f1"], held[k]["macro_f1"]]),
                 v["accuracy"], held[k]["accuracy"], v["n"]] for k, v in blocks.items()]
        rows.append(["mean over attributes", None, mean, held_mean, *mean_baselines(blocks), "", None, None, None])
        columns = ["Attribute", "Choices", "Macro F1, trained wording", "Macro F1, unseen wording", "Majority", "Prior random", "Mark",
                   "Accuracy, trained", "Accuracy, unseen", "Images"]
    table = Table(columns, rows, caption="WBC-CLIP table: macro F1 per attribute (95 % bootstrap interval), beside the majority "
                  "and prior-random baselines' macro F1")
    return Section(title, text + "\n\n" + BASELINE_NOTE, [table],
                   [(fig, f"{title}: macro F1 per attribute; dashed line: human inter-annotator agreement.")])


def mean_baselines(blocks: Mapping[str, Mapping[str, Any]]) -> list[float | None]:
    """Mean over attributes of the majority and prior-random macro F1 (None without baselines)."""
    if not blocks or not all("baselines" in v for v in blocks.values()):
        return [None, None]
    return [float(np.mean([v["baselines"][k] for v in blocks.values()])) for k in ("majority", "prior_random")]


def has_unseen_wording(inputs: EvalInputs, dataset: str | None) -> bool:
    """Whether the prompt file has held-out wording for `dataset`'s classes (None: for the attributes)."""
    return inputs.prompt_set is not None and inputs.prompt_set.has_wording("heldout", dataset)


WORDING_NOTE = (
    "Trained wording: the prompt file's training part, the sentences a model trained with this file read in training. "
    "Unseen wording: the file's held-out part (other sentence frames, other words for the same classes and values), which no "
    "training sentence contains (tests/test_text_heldout.py); it is unseen for any checkpoint trained with this prompt file."
)


def wording_table(results: Mapping[str, Mapping[str, Any]], caption: str) -> Table:
    """One row per wording ("trained", "unseen"): the headline class metrics side by side."""
    rows = [[f"{name} wording", r["n"], r["accuracy"], r["balanced_accuracy"], r["macro_f1"], r["weighted_f1"]]
            for name, r in results.items()]
    return Table(["Prompts", "Images", "Accuracy", "Balanced accuracy", "Macro F1", "Weighted F1"], rows,
                 caption=f"{caption} (95 % bootstrap intervals)")


def zero_shot_class_part(inputs: EvalInputs, zero_shot: ZeroShotReading, figures: Figures, unseen: ZeroShotReading | None = None) -> Part:
    """Zero-shot class metrics with intervals, per class, confusion matrices; with `unseen` (the same images
    read through the held-out wording) the two wordings side by side."""
    result = classification_metrics(zero_shot.y_true, zero_shot.pred, zero_shot.class_names, inputs.n_boot, inputs.seed)
    result["prompt_dataset"] = inputs.prompt_dataset
    result["wording"] = "train"
    result["excluded_images"] = int(zero_shot.missing_labels)
    result["excluded_label_counts"] = zero_shot.missing_label_counts
    result["baselines"] = class_baselines(inputs, zero_shot)
    metrics: dict[str, Any] = {"zero_shot": {"classes": result}}
    tables = [overall_table(result, "Zero-shot classes, trained wording"), per_class_table(result, baselines=result["baselines"])]
    if unseen is not None:
        held = classification_metrics(unseen.y_true, unseen.pred, unseen.class_names, inputs.n_boot, inputs.seed)
        held["wording"] = "heldout"
        metrics["zero_shot_unseen_wording"] = {"classes": held}
        tables = [wording_table({"trained": result, "unseen": held}, "Zero-shot classes by wording"),
                  per_class_table(result, {"F1, unseen wording": held}, baselines=result["baselines"])]
    figs = [
        (plots.plot_confusion(result["confusion_matrix"], result["confusion_labels"], figures.path("zero_shot_confusion_counts.png"),
                              title="Zero-shot confusion matrix (counts)"), "Zero-shot classes: confusion matrix (counts)."),
        (plots.plot_confusion(result["confusion_matrix"], result["confusion_labels"], figures.path("zero_shot_confusion_normalized.png"),
                              normalized=True, title="Zero-shot confusion matrix (row-normalised)"),
         "Zero-shot classes: confusion matrix, each row divided by the class's number of images."),
    ]
    text = (
        f"Prompt ensembles of the '{inputs.prompt_dataset}' classes in the prompt file ({display_path(inputs.prompt_set.source)}); "
        f"{result['n']} images scored."
    )
    if result["excluded_images"]:
        text += f" {result['excluded_images']} image(s) whose class has no prompt were left out: {result['excluded_label_counts']}."
    text += "\n\n" + WORDING_NOTE
    if unseen is None:
        text += f" The prompt file has no held-out wording for '{inputs.prompt_dataset}': only the trained wording is read."
    text += " Confusion matrices: trained wording.\n\n" + BASELINE_NOTE
    section = Section("Zero-shot classification", text, tables, figs)
    return Part(metrics, [section])


def zero_shot_attribute_part(inputs: EvalInputs, figures: Figures) -> Part:
    """Each WBCAtt attribute read through its value prompts (only for images with attributes)."""
    from hemaclip.tasks.zero_shot import zero_shot_attributes

    fs = inputs.eval_features
    if not any(a is not None for a in fs.attributes):
        return Part()

    def read(wording: str) -> tuple[dict[str, Any], list[dict[str, Any]], float | None, int]:
        zsa = zero_shot_attributes(inputs.model, fs, inputs.prompt_set, text_cache=inputs.text_cache, wording=wording)
        blocks = {name: attribute_block(part["y_true"], argmax_labels(part["logits"], part["values"]), part["values"], inputs.n_boot,
                                        inputs.seed, reference_labels(inputs, name)) for name, part in zsa.items()}
        rows, mean = attribute_summary(blocks)
        return blocks, rows, mean, (next(iter(zsa.values()))["missing_attributes"] if zsa else 0)

    blocks, rows, mean, missing = read("train")
    metrics: dict[str, Any] = {"zero_shot": {"attributes": blocks, "attribute_table": rows, "attribute_mean_macro_f1": mean,
                                             "attribute_images_without_annotation": int(missing), "attribute_wording": "train"}}
    unseen = None
    if has_unseen_wording(inputs, None):
        held, held_rows, held_mean, _ = read("heldout")
        metrics["zero_shot_unseen_wording"] = {"attributes": held, "attribute_table": held_rows, "attribute_mean_macro_f1": held_mean}
        unseen = (held, held_mean)
    fig = plots.plot_per_attribute_f1(rows, figures.path("zero_shot_attributes_f1.png"), reference=plots.HUMAN_INTER_ANNOTATOR_F1,
                                      title="Zero-shot macro F1 per attribute (trained wording)")
    text = (
        "Each attribute value is a prompt ensemble from the prompt file; an image takes the best-scoring value. "
        "Macro F1 averages the values that occur in the truth (a predicted value no image has is an error, not a class)."
    )
    if missing:
        text += f" {missing} image(s) without attribute annotations were left out."
    text += "\n\n" + WORDING_NOTE + (" The figure shows the trained wording." if unseen else " The prompt file has no held-out wording.")
    return Part(metrics, [attribute_section("Zero-shot attributes", blocks, mean, fig, text, unseen)])


def heads_part(inputs: EvalInputs, zero_shot: ZeroShotReading, head_pred: list[str] | None, head_reason: str, figures: Figures) -> Part:
    """The supervised class head (on the prompt classes, by name) and the attribute heads."""
    fs = inputs.eval_features
    if fs.class_logits is None and not fs.attribute_logits:
        return Part({"heads": {"available": False}})
    heads: dict[str, Any] = {"available": True}
    tables, figs, text = [], [], []
    sections = []
    if head_pred is None:
        heads["class"] = {"applicable": False, "reason": head_reason}
        text.append(f"Class head not applicable: {head_reason}.")
    else:
        result = classification_metrics(zero_shot.y_true, head_pred, zero_shot.class_names, inputs.n_boot, inputs.seed)
        result["applicable"] = True
        result["baselines"] = class_baselines(inputs, zero_shot)
        heads["class"] = result
        tables += [overall_table(result, "Class head"), per_class_table(result, baselines=result["baselines"])]
        figs.append((plots.plot_confusion(result["confusion_matrix"], result["confusion_labels"], figures.path("head_confusion_normalized.png"),
                                          normalized=True, title="Class head confusion matrix (row-normalised)"),
                     "Class head: row-normalised confusion matrix."))
        text.append("The class head's logits are restricted to the evaluated classes by name. " + BASELINE_NOTE)
    sections.append(Section("Supervised class head", " ".join(text), tables, figs))
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
            p = argmax_labels(attr_logits[name][annotated], values)
            blocks[name] = attribute_block(y, p, list(ATTRIBUTES[name]), inputs.n_boot, inputs.seed, reference_labels(inputs, name))
        rows_t, mean = attribute_summary(blocks)
        heads["attributes"] = blocks
        heads["attribute_table"] = rows_t
        heads["attribute_mean_macro_f1"] = mean
        fig = plots.plot_per_attribute_f1(rows_t, figures.path("head_attributes_f1.png"), reference=plots.HUMAN_INTER_ANNOTATOR_F1,
                                          title="Attribute heads: macro F1")
        sections.append(attribute_section("Supervised attribute heads", blocks, mean, fig,
                                          "One linear head per attribute on the image embedding."))
    return Part({"heads": heads}, sections)
