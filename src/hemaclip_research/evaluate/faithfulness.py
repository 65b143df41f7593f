"""Part: faithfulness of the sentences `hemaclip describe` writes, beside the human ceiling."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.errors import DataError
from hemaclip.metrics import calibration as cal
from hemaclip_research.evaluate.classes import ZeroShotReading
from hemaclip_research.evaluate.inputs import EvalInputs, Part
from hemaclip_research.report import Section, Table

if TYPE_CHECKING:
    from hemaclip.tasks.features import FeatureSet

__all__ = ["faithfulness_part"]


def faithfulness_part(inputs: EvalInputs, zero_shot: ZeroShotReading | None, class_pred: list[str] | None,
                      head_attribute_mean: float | None) -> Part:
    """Are the sentences of `hemaclip describe` true of the cells? See :mod:`hemaclip_research.faithfulness`.

    `class_pred` is the class reading of the rows of `zero_shot` (the class head where it applies, else the
    prompts): cells predicted as a class without WBCAtt attributes get no sentence, as in describe.
    `head_attribute_mean` is the attribute heads' mean macro F1, shown beside the agreement.
    """
    from hemaclip_research import faithfulness as fa
    from hemaclip.tasks.describe import DEFAULTS
    from hemaclip.text.sentences import statements_for_rows

    fs = inputs.eval_features
    rows = np.array([i for i, a in enumerate(fs.attributes) if a is not None], dtype=np.int64)
    if not len(rows):
        return Part()
    notes: list[str] = []

    def attribute_logits(feature_set: FeatureSet, keep: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, list[str]], str]:
        if feature_set.attribute_logits:
            vocab = feature_set.meta.get("attributes") or {}
            names = [n for n in ATTRIBUTE_NAMES if n in feature_set.attribute_logits and n in vocab]
            return ({n: np.asarray(feature_set.attribute_logits[n])[keep] for n in names},
                    {n: list(vocab[n]) for n in names}, "supervised attribute heads")
        from hemaclip.tasks.zero_shot import zero_shot_attributes

        zsa = zero_shot_attributes(inputs.model, feature_set.subset(keep), inputs.prompt_set, text_cache=inputs.text_cache)
        return ({n: np.asarray(p["logits"]) for n, p in zsa.items()}, {n: list(p["values"]) for n, p in zsa.items()},
                "zero-shot attribute prompts")

    logits, values, source = attribute_logits(fs, rows)
    temps = {n: 1.0 for n in logits}
    val = inputs.val_zero_shot_features
    val_rows = (np.array([i for i, a in enumerate(val.attributes) if a is not None], dtype=np.int64)
                if val is not None and inputs.split not in ("val", "all") else np.zeros(0, dtype=np.int64))
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
    for j, i in enumerate(np.asarray(zero_shot.indices) if zero_shot is not None else []):
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
        **fa.statement_agreement(statements, truth, n_boot=inputs.n_boot, seed=inputs.seed),
    }
    result["threshold_sweep"] = fa.threshold_sweep(lambda t: statements_for_rows(probs, values, t, allowed), truth)
    if val_probs:
        val_truth = [val.attributes[i] for i in val_rows]
        result["threshold_sweep_val"] = fa.threshold_sweep(lambda t: statements_for_rows(val_probs, values, t), val_truth)
    full = fa.all_statements(probs, values)  # the annotators' coverage: every attribute stated, no threshold
    full_all = fa.statement_agreement(full, truth, n_boot=inputs.n_boot, seed=inputs.seed)
    result["full_coverage"] = {k: full_all[k] for k in ("agreement", "coverage", "n_statements", "n_images")}
    try:
        human = fa.annotator_agreement(inputs.data_root, n_boot=inputs.n_boot, seed=inputs.seed)
        published, second, _, _ = fa.reannotation_pairs(inputs.data_root)
        by_name = {Path(fs.paths[i]).name: said for i, said in zip(rows, full)}
        same = fa.equal_coverage(by_name, published, second, n_boot=inputs.n_boot, seed=inputs.seed)
        result["equal_coverage"] = same
    except DataError as err:
        human = same = None
        notes.append(f"Human ceiling not available: {err}")
    result["human"] = human
    if inputs.train_features is not None and any(a is not None for a in inputs.train_features.attributes):
        textbook = fa.textbook_attributes(inputs.train_features.labels, inputs.train_features.attributes)
        true_labels = [inputs.eval_zero_shot_features.labels[i] for i in rows]
        result["textbook"] = {"classes": textbook,
                              **fa.textbook_test(statements, truth, true_labels, pred_rows, textbook)}
    else:
        notes.append("Textbook test not run: no annotated train images to define each class's modal attributes.")
    result["notes"] = notes

    head_mean = head_attribute_mean
    main_rows = [[f"describe sentences ({source}, threshold {threshold:g})", result["agreement"], result["coverage"],
                  result["n_statements"], result["n_images"], head_mean]]
    main_rows.append([f"describe, every attribute stated ({source}, no threshold)", full_all["agreement"],
                      full_all["coverage"], full_all["n_statements"], full_all["n_images"], head_mean])
    if human:
        main_rows.append(["second WBCAtt annotator vs published labels (all re-annotated images)", human["statement_agreement"],
                          human["coverage"], 11 * human["n_images"], human["n_images"], human["mean_macro_f1"]])
    if same:
        for who, side in (("describe, every attribute stated", "model"), ("second WBCAtt annotator", "annotators")):
            main_rows.append([f"{who}: the re-annotated images of this split", same[side]["agreement"],
                              same[side]["coverage"], same["n_statements"], same["n_images"], None])
    tables = [Table(["Statements by", "Agreement with annotation", "Coverage", "Statements", "Images",
                     "Mean macro F1 (all 11, no threshold)"], main_rows,
                    caption="Statement agreement (95 % bootstrap interval over images) beside the human ceiling; the last two rows "
                            "compare the model and the annotator on the same images and attributes, both at coverage 1")]
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
    return Part({"faithfulness": result}, [Section("Faithfulness of generated descriptions", "\n\n".join([text, *notes]), tables)])


