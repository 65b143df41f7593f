"""Part: calibration of the zero-shot class probabilities (temperature fitted on the val split only)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from hemaclip.metrics import calibration as cal
from hemaclip_research import plots
from hemaclip_research.evaluate.classes import ZeroShotReading
from hemaclip_research.evaluate.inputs import EvalInputs, Figures, Part
from hemaclip_research.report import Section, Table

__all__ = ["ECE_BINS", "calibration_part"]

ECE_BINS = 15


def calibration_part(inputs: EvalInputs, zero_shot: ZeroShotReading, figures: Figures) -> Part:
    """Zero-shot class probabilities: temperature fitted on val only, ECE/MCE/NLL before and after,
    confidence AUROC and correlation with correctness, selective accuracy, reliability diagrams."""
    from hemaclip.tasks.zero_shot import zero_shot_classes

    names = zero_shot.class_names
    index = {c: i for i, c in enumerate(names)}
    y = np.array([index[c] for c in zero_shot.y_true], dtype=np.int64)
    logits = np.asarray(zero_shot.logits, dtype=np.float64)
    notes = []
    temperature, fitted_on, n_val = 1.0, None, 0
    if inputs.split in ("val", "all"):
        notes.append(f"No temperature was fitted: the evaluated split '{inputs.split}' contains the val split, "
                     "and the temperature is never fitted on the evaluated images (T = 1).")
    elif inputs.val_zero_shot_features is None or len(inputs.val_zero_shot_features) == 0:
        notes.append("No temperature was fitted: the dataset has no val images (T = 1).")
    else:
        val = zero_shot_classes(replace(inputs.zero_shot_setting, classes=tuple(names)), inputs.val_zero_shot_features)
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
    figs = [
        (plots.plot_reliability(bins_before, figures.path("reliability_before.png"),
                              title="Zero-shot reliability, T = 1"), "Reliability diagram before temperature scaling."),
        (plots.plot_reliability(bins_after, figures.path("reliability_after.png"),
                              title=f"Zero-shot reliability, T = {temperature:.3g}"),
         f"Reliability diagram after temperature scaling (T = {temperature:.3g}, fitted on {fitted_on or 'nothing'})."),
        (plots.plot_selective_accuracy(sel_cal["coverage"], {"T = 1": sel_raw["accuracy"],
                                                             f"T = {temperature:.3g}": sel_cal["accuracy"]},
                                       figures.path("selective_accuracy.png")),
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
    return Part({"calibration": result, "temperature_fitted_on": fitted_on}, [Section("Calibration", text, [table, conf_table, sel_table], figs)])


