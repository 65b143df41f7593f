"""The colour study (`hemaclip leukemia colour`): how much of the ALL accuracy is colour?

The ALL set was acquired class by class and has no patient IDs, so each class may carry its own stain and
camera cast. Three measurements, each on the test split with 95 % bootstrap intervals and paired tests:

1. **Shortcut readers** (`hemaclip.tasks.shortcuts`): colour statistics, a colour histogram and the image
   shrunk to 8x8, fitted on the train split (C chosen on val), beside the colour-seeing CE twin of the
   shipped model and the stain-blind twins.
2. **Stain-blind twins**: the same recipes (`default-ce`, `default-text`) trained and read on luma-only
   input (``preprocess.colour = grey`` in the checkpoint); per class, and Grad-CAM on a few test fields.
3. **A cluster-grouped split**: k-means clusters of colour and background statistics kept whole within
   one split (a proxy for acquisition batches), the CE twin and the shortcut readers re-fitted on it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.errors import HemaclipError
from hemaclip.log import get_logger, logged_run
from hemaclip_research.leukaemia import N_RESAMPLES, _machine, paired_comparison, score
from hemaclip.tasks.leukaemia import CLUSTER_K, SHIPPED, Arm

logger = get_logger(__name__)

# Each model's own read-out (the one its training selected best.pt on).
PRIMARY = {"ce": "head", "text": "zero-shot"}
# Other cluster counts, for the shortcut readers only (no training): how much does k matter?
SENSITIVITY_K = (32, 178)
SALIENCY_SHOWN_PER_CLASS = 2
SALIENCY_MEASURED_PER_CLASS = 25
STAINED_SHARE = 0.15  # darkest pixels by luma: stained cells (nuclei, blasts, red cells' rims)
BACKGROUND_SHARE = 0.5  # brightest pixels by luma: the slide between cells
CORNER = (0.12, 0.2)  # bottom-right corner (height, width shares) where the scale bar and its label sit


def study_arms(init: str = "default") -> dict[str, Arm]:
    """The four runs by role: the colour-seeing CE twin, the grey CE and sentence twins, the CE twin on the
    cluster-grouped split; all from `init` (the shipped model by default) with the committed recipes."""
    return {"colour": Arm(init, "ce"), "grey-ce": Arm(init, "ce", "grey"), "grey-text": Arm(init, "text", "grey"), "clusters": Arm(init, "ce", "clusters")}


def reading(arm: Arm) -> str:
    """`<arm>:<its own read-out>`: the class head of a CE model, the prompts of a sentence model."""
    return f"{arm.name}:{PRIMARY[arm.objective]}"


# ------------------------------------------------------------------------------------------------
# Saliency: where does each model look?
# ------------------------------------------------------------------------------------------------


def region_masks(image: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of one uint8 RGB image: stained (darkest 15 % by luma), background (brightest 50 %)
    and the bottom-right corner that holds the scale bar."""
    luma = np.asarray(image, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    height, width = luma.shape
    corner = np.zeros_like(luma, dtype=bool)
    corner[int(round(height * (1 - CORNER[0]))):, int(round(width * (1 - CORNER[1]))):] = True
    return {
        "stained": luma <= np.quantile(luma, STAINED_SHARE),
        "background": luma >= np.quantile(luma, 1 - BACKGROUND_SHARE),
        "scale-bar corner": corner,
    }


def saliency_enrichment(heat: np.ndarray, masks: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Share of the saliency mass in each region over the region's share of the pixels (1 = no preference);
    NaN for an all-zero map."""
    total = float(heat.sum())
    return {name: (float(heat[mask].sum()) / total) / float(mask.mean()) if total > 0 else float("nan") for name, mask in masks.items()}


def _saliency_study(models: Mapping[str, tuple[Any, Mapping[str, Sequence[str]] | None]], records: Sequence[Any], classes: Sequence[str],
                    out: Path) -> tuple[dict[str, Any], Path]:
    """Grad-CAM of each model's predicted class on test fields: enrichment per region (mean, sd) over
    `SALIENCY_MEASURED_PER_CLASS` fields per class, and a figure of the first two fields per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hemaclip.data.preprocess import Preprocess, decode_image, preprocess_for
    from hemaclip.io import atomic_write
    from hemaclip.tasks.saliency import saliency_map

    chosen = [r for c in classes for r in sorted((r for r in records if r.label == c), key=lambda r: str(r.path))[:SALIENCY_MEASURED_PER_CLASS]]
    shown = [r for c in classes for r in [x for x in chosen if x.label == c][:SALIENCY_SHOWN_PER_CLASS]]
    enrichment: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    heats: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for record in chosen:
        image = Preprocess(192).to_array(decode_image(record.path))
        masks = region_masks(image)
        for name, (model, prompts) in models.items():
            seen = preprocess_for(model).to_array(image, 192)  # what the model sees, at the figure's size
            heat = saliency_map(model, seen, "class", None, class_prompts=prompts)
            for region, value in saliency_enrichment(heat, masks).items():
                enrichment[name].setdefault(region, []).append(value)
            if record in shown:
                heats[(str(record.path), name)] = (seen, heat)
    summary = {name: {region: {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v)), "n": int(np.sum(np.isfinite(v)))}
                      for region, v in regions.items()} for name, regions in enrichment.items()}
    fig, axes = plt.subplots(len(shown), len(models) + 1, figsize=(2.2 * (len(models) + 1), 2.2 * len(shown)), squeeze=False)
    for row, record in enumerate(shown):
        axes[row, 0].imshow(Preprocess(192).to_array(decode_image(record.path)))
        axes[row, 0].set_ylabel(f"{record.label}\n{Path(record.path).stem[-12:]}", fontsize=7)
        for col, name in enumerate(models, start=1):
            seen, heat = heats[(str(record.path), name)]
            axes[row, col].imshow(seen)
            axes[row, col].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if row == 0:
                axes[row, col].set_title(name, fontsize=8)
        if row == 0:
            axes[row, 0].set_title("input (colour)", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = out / "saliency-grad-cam.png"
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)
    return {"fields_per_class": SALIENCY_MEASURED_PER_CLASS, "fields": len(chosen), "enrichment": summary}, path


# ------------------------------------------------------------------------------------------------
# The cluster split: how much k matters (shortcut readers only)
# ------------------------------------------------------------------------------------------------


def _sensitivity(runs_dir: Path, data_root: str | Path | None, classes: Sequence[str], ks: Sequence[int], max_eval_images: int | None = None) -> dict[str, Any]:
    """Shortcut readers on grouped splits with other numbers of clusters (their own folders, no training)."""
    from hemaclip.tasks.leukaemia import cluster_audit, make_cluster_split, predict_shortcuts

    out = {}
    for k in ks:
        split_dir = runs_dir / f"cluster-split-k{k}"
        make_cluster_split(split_dir, data_root, k=k)
        shortcuts = predict_shortcuts(split_dir, data_root, max_eval_images)
        truth = shortcuts["truth"]["test"]
        out[str(k)] = {
            "audit": cluster_audit(split_dir),
            "test_accuracy": {key: score(truth, pred["test"], classes)["accuracy"] for key, pred in shortcuts["predictions"].items()},
        }
    return out


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def _merge(models: Mapping[str, Any], shortcuts: Mapping[str, Any]) -> dict[str, Any]:
    for split in ("val", "test"):
        if not np.array_equal(models["truth"][split], shortcuts["truth"][split]):
            raise HemaclipError("models and shortcut readers were read on different images; they cannot be compared")
    return {**models["predictions"], **shortcuts["predictions"]}


SHIPPED_GREY = f"{SHIPPED}-grey"  # the shipped model read on luma-only input (no training)


def model_readings(predictions: Mapping[str, Any], arms: Mapping[str, Arm]) -> dict[str, Any]:
    """The model readings present, by role: colour-seeing ones, grey ones, and the (grey, colour) pairs of
    the stain-blind tests. Retrained twins come first when their runs exist; the shipped model's frozen
    embedding read by a logistic probe on colour and on grey input is always there (no training needed)."""
    colour, grey_ce, grey_text = (reading(arms[r]) for r in ("colour", "grey-ce", "grey-text"))
    frozen, frozen_grey = f"{SHIPPED}:logistic", f"{SHIPPED_GREY}:logistic"
    pairs = [(grey_ce, colour), (grey_text, colour), (grey_text, grey_ce), (frozen_grey, frozen)]
    present = [k for k in (colour, grey_ce, grey_text, frozen, frozen_grey) if k in predictions]
    return {
        "all": present,
        "colour": next(k for k in (colour, frozen) if k in predictions),
        "grey": next(k for k in (grey_ce, frozen_grey) if k in predictions),
        "grey_text": grey_text if grey_text in predictions else None,
        "grey_pairs": [(a, b) for a, b in pairs if a in predictions and b in predictions],
        "twins": colour in predictions,
    }


def cluster_model_readings(predictions: Mapping[str, Any], arms: Mapping[str, Arm]) -> list[str]:
    """The model readings on the cluster split: the CE twin retrained on it (when that run exists) and the
    shipped model's frozen embedding with a logistic probe fitted on the split's train images."""
    return [key for key in (reading(arms["clusters"]), f"{SHIPPED}:logistic") if key in predictions]


def score_colour_study(
    per_image: Mapping[str, Any], clustered: Mapping[str, Any], classes: Sequence[str], arms: Mapping[str, Arm], test_clusters: np.ndarray
) -> dict[str, Any]:
    """Scores of every reading on both splits, the paired tests, and the drop from the per-image to the
    cluster-grouped split (unpaired: different test images). On the cluster split, whose test images come
    in whole clusters (`test_clusters`, one per test image), macro F1 also gets a cluster bootstrap interval
    and paired test (whole clusters resampled), since images of one cluster are not independent."""
    from hemaclip.metrics.statistics import cluster_bootstrap_macro_f1, paired_cluster_bootstrap_macro_f1, unpaired_bootstrap_difference

    shortcut_keys = list(per_image["shortcuts"]["predictions"])
    results: dict[str, Any] = {}
    for split_name, data in (("per_image", per_image), ("clusters", clustered)):
        predictions = _merge(data["models"], data["shortcuts"])
        truth = data["models"]["truth"]
        results[split_name] = {
            "methods": {key: {s: score(truth[s], pred[s], classes) for s in ("val", "test")} for key, pred in predictions.items()},
            "predictions": predictions,
            "truth": truth,
        }
    pi, cl = results["per_image"], results["clusters"]
    readings = model_readings(pi["predictions"], arms)
    colour, clustered_key = readings["colour"], reading(arms["clusters"])
    cluster_models = cluster_model_readings(cl["predictions"], arms)
    pairs = [(m, s) for m in readings["all"] for s in shortcut_keys] + readings["grey_pairs"]
    pi["comparisons"] = [paired_comparison(a, b, pi["predictions"], pi["truth"]["test"], classes) for a, b in pairs]
    cl["comparisons"] = [paired_comparison(m, s, cl["predictions"], cl["truth"]["test"], classes) for m in cluster_models for s in shortcut_keys]
    truth = cl["truth"]["test"]
    for key, pred in cl["predictions"].items():
        cl["methods"][key]["test"]["macro_f1_cluster"] = cluster_bootstrap_macro_f1(truth, pred["test"], len(classes), test_clusters, n_resamples=N_RESAMPLES)
    for comparison in cl["comparisons"]:
        a, b = (cl["predictions"][comparison[k]]["test"] for k in ("a", "b"))
        comparison["macro_f1_cluster"] = paired_cluster_bootstrap_macro_f1(truth, a, b, len(classes), test_clusters, n_resamples=N_RESAMPLES)
    drops = []
    counterpart = {clustered_key: reading(arms["colour"])}  # a model retrained on the cluster split stands against its per-image twin
    for per_image_key, cluster_key in [*[(counterpart.get(m, m), m) for m in cluster_models], *[(s, s) for s in shortcut_keys]]:
        right_cluster = cl["predictions"][cluster_key]["test"] == cl["truth"]["test"]
        right_image = pi["predictions"][per_image_key]["test"] == pi["truth"]["test"]
        drops.append({"clusters": cluster_key, "per_image": per_image_key,
                      "accuracy": unpaired_bootstrap_difference(right_cluster, right_image, n_resamples=N_RESAMPLES)})
    return {"per_image": pi, "clusters": cl, "drops": drops}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _ci(result: Mapping[str, Any]) -> tuple[float, float, float]:
    return (result["point"], result["low"], result["high"])


def _diff(result: Mapping[str, Any]) -> tuple[float, float, float]:
    return (result["difference"], result["low"], result["high"])


def _pro_pre(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    pro, pre = classes.index("pro"), classes.index("pre")
    return f"{confusion[pro][pre]} / {confusion[pre][pro]}"


def _reference_rows(reference: Mapping[str, Any] | None) -> list[list[Any]]:
    """Rows of the committed report (its own runs and split) for context; read from its metrics.json."""
    if not reference:
        return []
    rows = []
    for key in ("default-text:zero-shot", "default-ce:head"):
        if key in reference.get("methods", {}):
            test = reference["methods"][key]["test"]
            rows.append([f"{key} (committed report, its own run)", "per image", test["accuracy"], test["macro_f1"], "–"])
    return rows


def write_colour_report(out: Path, study: Mapping[str, Any], context: Mapping[str, Any], arms: Mapping[str, Arm], command: str) -> dict[str, Path]:
    """report.md, report.html and metrics.json of the colour study, with confusion matrices and Grad-CAM."""
    from hemaclip_research.plots import plot_confusion
    from hemaclip_research.report import Section, Table, write_report

    classes = context["classes"]
    pi, cl = study["per_image"], study["clusters"]
    shortcut_keys = [f"{name}:logistic" for name in context["shortcut_fits"]["per_image"]]
    descriptions = context["shortcut_descriptions"]
    audit, cluster = context["split_audit"], context["cluster_audit"]
    readings = model_readings(pi["predictions"], arms)
    colour, grey_ce, grey_text, clustered = readings["colour"], readings["grey"], readings["grey_text"], reading(arms["clusters"])
    cluster_models = cluster_model_readings(cl["predictions"], arms)
    shipped_probe = f"{SHIPPED}:logistic"

    def method_row(key: str, split_name: str, results: Mapping[str, Any], fits: Mapping[str, Any]) -> list[Any]:
        name = key.split(":")[0]
        note = f"C = {fits[name]['C']:g} (on val)" if name in fits else "no ALL training; probe fitted on train" if name in (SHIPPED, SHIPPED_GREY) else "best epoch on val"
        test = results["methods"][key]["test"]
        return [key, split_name, test["accuracy"], test["macro_f1"], note]

    figures = []
    for key in (*readings["all"], *shortcut_keys, *[m for m in cluster_models if m == clustered]):
        results = cl if key == clustered else pi
        path = plot_confusion(results["methods"][key]["test"]["confusion_matrix"], classes,
                              out / f"confusion-{key.replace(':', '-')}{'-clusters' if key == clustered else ''}.png", normalized=True, title=f"{key} (test)")
        figures.append((path, f"{key}: test confusion matrix, rows normalised"))

    def comparison_rows(comparisons: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        return [[f"{c['a']} − {c['b']}", c["accuracy"]["metric_a"], c["accuracy"]["metric_b"], _diff(c["accuracy"]), c["accuracy"]["p_value"],
                 _diff(c["macro_f1"]), c["macro_f1"]["p_value"]] for c in comparisons]

    comparison_columns = ["A − B", "accuracy A", "accuracy B", "difference [95 % CI]", "p", "macro F1 difference [95 % CI]", "p"]
    per_image_rows = [method_row(k, "per image", pi, context["shortcut_fits"]["per_image"]) for k in (*shortcut_keys, *readings["all"])]
    per_image_rows += _reference_rows(context.get("reference"))
    grey_pairs = [c for c in pi["comparisons"] if (c["a"], c["b"]) in readings["grey_pairs"]]
    shortcut_pairs = [c for c in pi["comparisons"] if c["b"] in shortcut_keys]
    per_class_rows = []
    for key in (*readings["all"], *shortcut_keys):
        per_class = pi["methods"][key]["test"]["per_class"]
        per_class_rows.append([key, *[per_class[c]["f1"] for c in classes], _pro_pre(pi["methods"][key]["test"]["confusion_matrix"], classes)])
    per_class_tests = [[f"{c['a']} − {c['b']}", cls, _diff(c["per_class_f1"][cls]), c["per_class_f1"][cls]["p_value"]]
                       for c in grey_pairs for cls in classes]

    best_shortcut = max(shortcut_keys, key=lambda k: pi["methods"][k]["val"]["accuracy"]["point"])
    colour_acc = pi["methods"][colour]["test"]["accuracy"]
    best_acc = pi["methods"][best_shortcut]["test"]["accuracy"]
    grey_acc = pi["methods"][grey_ce]["test"]["accuracy"]
    grey_text_acc = pi["methods"][grey_text]["test"]["accuracy"] if grey_text else None
    headline = next(c for c in pi["comparisons"] if c["a"] == colour and c["b"] == best_shortcut)

    saliency = context["saliency"]
    if saliency:
        saliency_rows = [[name, *[(v["mean"]) for v in regions.values()], next(iter(regions.values()))["n"]] for name, regions in saliency["enrichment"].items()]
        saliency_regions = list(next(iter(saliency["enrichment"].values())))

    split_rows = [[s, *[audit["per_split_class"][s].get(c, 0) for c in classes], audit["split_sizes"][s]] for s in ("train", "val", "test")]
    cluster_rows = [[s, *[cluster["per_split_class"][s].get(c, 0) for c in classes], cluster["split_sizes"][s], cluster["clusters_per_split"][s]] for s in ("train", "val", "test")]
    cluster_method_rows = [[*method_row(k, "clusters", cl, context["shortcut_fits"]["clusters"])[:4], _ci(cl["methods"][k]["test"]["macro_f1_cluster"]),
                            method_row(k, "clusters", cl, context["shortcut_fits"]["clusters"])[4]] for k in (*shortcut_keys, *cluster_models)]
    cluster_comparison_rows = [[*row, _diff(c["macro_f1_cluster"]), c["macro_f1_cluster"]["p_value"]]
                               for row, c in zip(comparison_rows(cl["comparisons"]), cl["comparisons"])]
    drop_rows = [[f"{d['per_image']} → {d['clusters']}", d["accuracy"]["metric_b"], d["accuracy"]["metric_a"], _diff(d["accuracy"])] for d in study["drops"]]
    sensitivity_rows = [[k, *[v["test_accuracy"][s] for s in shortcut_keys], v["audit"]["clusters_in_two_splits"],
                         " / ".join(str(v["audit"]["split_sizes"][s]) for s in ("train", "val", "test"))] for k, v in context["sensitivity"].items()]
    model_drop = study["drops"][0]
    shortcut_drop = next(d for d in study["drops"] if d["clusters"] == best_shortcut)["accuracy"]

    colour_name = "the CE twin of the shipped model" if readings["twins"] else "the shipped model's frozen embedding with a logistic probe"
    grey_text_part = (f" and {grey_text_acc['point']:.3f} [{grey_text_acc['low']:.3f}, {grey_text_acc['high']:.3f}] (sentence twin)"
                      if grey_text_acc else "")
    summary = (
        f"The best shortcut reader on validation, `{best_shortcut}` ({descriptions[best_shortcut.split(':')[0]]}; no view of any "
        f"cell's shape), reaches test accuracy {best_acc['point']:.3f} [{best_acc['low']:.3f}, {best_acc['high']:.3f}] on the per-image "
        f"split, against {colour_acc['point']:.3f} [{colour_acc['low']:.3f}, {colour_acc['high']:.3f}] for {colour_name} (`{colour}`; "
        f"paired difference model − reader {headline['accuracy']['difference']:+.3f} [{headline['accuracy']['low']:+.3f}, "
        f"{headline['accuracy']['high']:+.3f}], p = {headline['accuracy']['p_value']:.2g}). Without colour (`{grey_ce}`, grey input), "
        f"it reaches {grey_acc['point']:.3f} [{grey_acc['low']:.3f}, {grey_acc['high']:.3f}]{grey_text_part}. On the cluster-grouped "
        f"split `{model_drop['clusters']}` reaches "
        f"{model_drop['accuracy']['metric_a']:.3f} (change against the per-image split {model_drop['accuracy']['difference']:+.3f} "
        f"[{model_drop['accuracy']['low']:+.3f}, {model_drop['accuracy']['high']:+.3f}], unpaired) and `{best_shortcut}` "
        f"{shortcut_drop['metric_a']:.3f} ({shortcut_drop['difference']:+.3f} [{shortcut_drop['low']:+.3f}, {shortcut_drop['high']:+.3f}]).\n\n"
        "What an ALL accuracy here means: how well the four class folders of this one source can be told apart on images from "
        "the same acquisition as the training images. What it does not mean: that a model recognises leukaemia subtypes by "
        "cell morphology, or that it would hold on new patients, another stain batch or another laboratory; without patient "
        "identifiers nothing here can test that."
    )
    frozen_text = (
        f"`{shipped_probe}` and `{SHIPPED_GREY}:logistic`: the shipped model (trained on PBC, never on ALL) embeds every image, "
        "once as it is and once reduced to its luma (`preprocess.colour = grey`); a logistic probe fitted on the train split "
        "reads each embedding. No training is involved, so this pair measures how much of what a fixed cell representation "
        "knows about the ALL classes rides on colour."
    )
    if readings["twins"]:
        epochs = len(context["runs"][arms["colour"].name]["epochs"])
        twin_text = (
            f" `{reading(arms['colour'])}` is the CE twin of the shipped model retrained here ({epochs} epoch(s)); `{arms['grey-ce'].name}` and "
            f"`{arms['grey-text'].name}` are the committed recipes (`all-finetune` and its CE twin) at the same epochs, seed, split and "
            "augmentations with `preprocess.colour = grey`: every image is reduced to its luma (ITU-R 601) as three equal channels "
            "in the decoded-image cache, again after augmentation (so HED or hue jitter cannot bring colour back), and at "
            "inference, because the option is stored in the checkpoint's model config."
        )
    else:
        twin_text = (
            f" The retrained stain-blind twins (`{arms['grey-ce'].name}`, `{arms['grey-text'].name}`) and their colour-seeing twin "
            f"`{arms['colour'].name}` are not in this run (no finished runs in `{context['runs_dir']}`): "
            "`hemaclip leukemia colour` trains them when given the CPU time."
        )
    colour_text = (
        "Every reader was fitted on the train split only; a shortcut reader's C (logistic regression on standardised "
        f"features, C in 10^-4 … 10^4) was chosen on validation accuracy; the test split only scores. Readers: "
        + "; ".join(f"`{k}`: {descriptions[k.split(':')[0]]}" for k in shortcut_keys)
        + ". The committed report's rows, from its own 6-epoch runs on the same seeded split, are shown for context."
    )
    grey_text_md = (
        frozen_text + twin_text + "\n\nPer class: pro-B vs pre-B is the subtle pair (both precursor B-cell leukaemias); the "
        "last column counts test images of pro read as pre / pre read as pro."
    )
    if saliency:
        saliency_text = (
            "Grad-CAM of each model's predicted class (the class head for CE models, the ALL prompts for the sentence model) on "
            f"the first {saliency['fields_per_class']} test fields of each class (sorted by file name). The number per region is "
            "its share of the saliency mass divided by its share of the pixels (1 = no preference; above 1 = looked at more than "
            f"its area): `stained` = the darkest {STAINED_SHARE:.0%} of pixels by luma (nucleated cells, red-cell rims), "
            f"`background` = the brightest {BACKGROUND_SHARE:.0%} (slide between cells), `scale-bar corner` = the bottom-right "
            f"{CORNER[0]:.0%} × {CORNER[1]:.0%} of the field. The maps are 4×4 (EfficientNet-Lite0 at 128 px) upsampled, so at this "
            "magnification one map cell covers several cells: a coarse check, not an explanation. The figure shows the first "
            f"{SALIENCY_SHOWN_PER_CLASS} fields per class as each model sees them."
        )
        saliency_section = Section("Saliency: cells or background?", saliency_text,
                                   tables=[Table(["model", *saliency_regions, "fields"], saliency_rows, caption="mean saliency enrichment per region (1 = no preference)")],
                                   figures=[(context["saliency_figure"], "Grad-CAM of the predicted class on test fields (rows: benign, early, pre, pro)")])
    else:
        saliency_section = Section("Saliency: cells or background?", "Not run: saliency needs the retrained twins (a frozen embedding "
                                   "read by a probe has no class map of its own).")
    cluster_text = (
        f"Every deduplicated image is described by 21 numbers at 32×32 (the 15 colour statistics, and mean and sd of R, G, B over "
        f"its brighter half, the slide background), standardised; k-means (scikit-learn, 10 restarts, seed 0) with k = {cluster['k']}, "
        "fixed before any result: the source reports 89 patients, so a cluster is meant to be about as coarse as one acquisition "
        "session. Whole clusters go to train, val or test, largest first, each where it best fills the class quotas of a 70/10/20 "
        f"split. Clusters in two splits: **{cluster['clusters_in_two_splits']}**. Cluster sizes {cluster['cluster_sizes']['min']}–"
        f"{cluster['cluster_sizes']['max']} (median {cluster['cluster_sizes']['median']:g}); mean class purity of a cluster "
        f"{cluster['mean_cluster_purity']:.3f} ({cluster['images_in_one_class_clusters']} images sit in single-class clusters): the colour "
        f"clusters nearly follow the class folders, as a class-by-class acquisition would make them.\n\n"
        + (f"`{clustered}`: the CE recipe retrained on this split. " if clustered in cluster_models else
           f"The CE recipe was not retrained on this split in this run (`{arms['clusters'].name}` absent). ")
        + f"`{shipped_probe}`: the shipped model's frozen embedding (no ALL training) with a logistic probe fitted on this split's "
        "train images. The shortcut readers are re-fitted on it. Test images of one cluster are not independent, so macro F1 "
        "also gets a cluster bootstrap (whole clusters resampled, stratified by their majority class). The change against the "
        "per-image split compares two different test sets, so its interval is an unpaired item bootstrap (each test set "
        "resampled on its own; it ignores the clustering and so is too narrow on the cluster side)."
    )
    proxy_text = (
        "What this proxy can show: how much accuracy depends on having seen images of the same colour cast, i.e. of the same "
        "acquisition batch, in training. A model or reader that keeps its accuracy when whole colour clusters are held out "
        "is not merely matching batches.\n\n"
        "What it cannot show: generalisation to new patients. A colour cluster is not a patient: one patient's fields can "
        "fall into several clusters (and stay on both sides of the split), and one cluster can hold several patients. Since "
        "the clusters are built from colour statistics, holding them out should hurt a reader that matches batches by colour; "
        "if colour readers stay accurate anyway, each class keeps its own colour across clusters, and this split cannot tell "
        "a class-by-class acquisition cast from a colour difference of the cells themselves. It also cannot show robustness to another "
        "laboratory, scanner or stain protocol: every image here comes from one source. Only patient identifiers (or a new, "
        "independently acquired test set) can answer those questions."
    )
    sections = [
        Section("What it means, plainly", summary),
        Section("What was measured", f"Command: `{command}` on {_machine()['cpu_count']} CPU cores, no GPU. Test split: the "
                f"seeded, stratified per-image split of the committed study ({audit['split_sizes']['test']} test images), and the "
                f"cluster-grouped split below ({cluster['split_sizes']['test']} test images). 95 % stratified bootstrap intervals and "
                f"paired tests ({N_RESAMPLES} resamples; two-sided p by the centred method; no correction for multiple comparisons).",
                tables=[Table(["split", *classes, "total"], split_rows, caption="per-image split: images per split and class")]),
        Section("Shortcut readers beside the models (per-image split)", colour_text,
                tables=[Table(["model:reading", "split", "test accuracy [95 % CI]", "test macro F1 [95 % CI]", "chosen on val"], per_image_rows),
                        Table(comparison_columns, comparison_rows(shortcut_pairs), caption="paired tests: each model's own reading minus each shortcut reader")]),
        Section("Stain-blind readings (grey input)", grey_text_md,
                tables=[Table(comparison_columns, comparison_rows(grey_pairs), caption="paired tests: grey against colour-seeing readings"),
                        Table(["model:reading", *[f"F1 {c}" for c in classes], "pro→pre / pre→pro"], per_class_rows, caption="per-class test F1"),
                        Table(["A − B", "class", "F1 difference [95 % CI]", "p"], per_class_tests, caption="per-class paired tests")],
                figures=figures[:len(readings["all"]) + len(shortcut_keys)]),
        saliency_section,
        Section("Cluster-grouped split (a proxy for acquisition batches)", cluster_text,
                tables=[Table(["split", *classes, "total", "clusters"], cluster_rows, caption="cluster-grouped split: images per split and class"),
                        Table(["model:reading", "split", "test accuracy [95 % CI]", "test macro F1 [95 % CI]", "macro F1 [95 % CI, cluster bootstrap]",
                               "chosen on val"], cluster_method_rows),
                        Table([*comparison_columns, "macro F1 difference [95 % CI, cluster bootstrap]", "p"], cluster_comparison_rows,
                              caption="paired tests on the cluster split's test images (item bootstrap, then whole clusters resampled)"),
                        Table(["per-image → cluster split", "accuracy per image", "accuracy clusters", "change [95 % CI, unpaired]"], drop_rows),
                        Table(["k", *[f"{s} test accuracy" for s in shortcut_keys], "clusters in two splits", "train / val / test"], sensitivity_rows,
                              caption=f"other k (shortcut readers only, no training); the main split uses k = {cluster['k']}")],
                figures=figures[len(readings["all"]) + len(shortcut_keys):]),
        Section("What the cluster split can and cannot show", proxy_text),
    ]
    metrics = {
        "command": command,
        "machine": _machine(),
        "split": dict(audit),
        "cluster_split": dict(cluster),
        "sensitivity": context["sensitivity"],
        "shortcut_fits": context["shortcut_fits"],
        "methods": {"per_image": pi["methods"], "clusters": cl["methods"]},
        "comparisons": {"per_image": pi["comparisons"], "clusters": cl["comparisons"]},
        "colour_reading": colour,
        "drops": study["drops"],
        "saliency": saliency,
        "runs": context["runs"],
        "training_sessions": context["training"],
        "seconds": context["seconds"],
    }
    return write_report(out, "Leukaemia (ALL): how much of the accuracy is colour?", sections, metrics, checkpoint=str(context["runs_dir"]))


# ------------------------------------------------------------------------------------------------
# The whole study
# ------------------------------------------------------------------------------------------------


def _load_saliency_models(runs_dir: Path, arms: Sequence[Arm]) -> dict[str, tuple[Any, Mapping[str, Sequence[str]] | None]]:
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.text.prompts import load_prompts

    models = {}
    for arm in arms:
        model, meta = load_checkpoint(runs_dir / arm.name / "best.pt")
        prompts = None
        if arm.objective == "text":
            prompts_file = ((meta.get("extra") or {}).get("train_config") or {}).get("prompts")
            all_prompts = load_prompts(prompts_file).class_prompts("all")
            prompts = {c: all_prompts[c] for c in model.class_names}
        models[arm.name] = (model, prompts)
    return models


def colour_bench(metrics: Mapping[str, Any], training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Benchmark record of a colour study from its metrics.json: timings, and each reading's test accuracy
    with its ratio to the same run's colour-seeing model reading (the baseline)."""
    baseline = metrics["colour_reading"]
    out: dict[str, Any] = {"command": metrics["command"], "machine": metrics["machine"], "seconds": metrics["seconds"],
                           "training": dict(training or {}), "baseline": baseline}
    for split in ("per_image", "clusters"):
        methods = metrics["methods"][split]
        base = methods[baseline]["test"]["accuracy"]["point"] if baseline in methods else None
        out[split] = {k: {"test_accuracy": v["test"]["accuracy"]["point"], "ratio_to_baseline": v["test"]["accuracy"]["point"] / base if base else None}
                      for k, v in methods.items()}
    return out


def _key(path: Path, data_root: str | Path | None) -> str:
    from hemaclip.data.paths import resolve_data_root

    return str(Path(path).relative_to(resolve_data_root(data_root)))


@logged_run("leukaemia-colour")
def run_colour_study(
    out: Path,
    runs_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    data_root: Path | None = None,
    init: str = "default",
    train_missing: bool = True,
    max_eval_images: int | None = None,
    reference: Path | None = None,
    sensitivity_k: Sequence[int] = SENSITIVITY_K,
    bench: Path | None = None,
    command: str = "hemaclip leukemia colour",
    progress: bool | None = None,
) -> dict[str, Path]:
    """Train (or reuse) the four arms, fit the shortcut readers, score, explain, write the report."""
    import json

    from hemaclip.io import write_json
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.leukaemia import DATASET, cluster_audit, cluster_groups, make_cluster_split, predict_shortcuts, predict_study, run_history, split_audit, study_records, train_arms
    from hemaclip.tasks.shortcuts import SHORTCUTS

    tick = time.perf_counter()
    arms = study_arms(init)
    per_image_arms = [arms["colour"], arms["grey-ce"], arms["grey-text"]]
    training = train_arms(list(arms.values()), runs_dir, overrides, data_root=data_root, progress=progress) if train_missing else {}
    missing = [str(runs_dir / a.name / "best.pt") for a in per_image_arms if not (runs_dir / a.name / "best.pt").is_file()]
    if missing and len(missing) < len(per_image_arms):
        raise HemaclipError(f"{missing[0]}: run not trained (drop --no-train to train it)")
    # With --no-train and no twins at all, the study reads the shipped model (colour and grey) and the shortcut readers only.
    per_image_arms = [] if missing else per_image_arms
    # The CE twin on the cluster split is optional with --no-train: without it the split is read by the
    # shortcut readers and the shipped model's frozen embedding only (the report says which).
    cluster_arms = [arms["clusters"]] if (runs_dir / arms["clusters"].name / "best.pt").is_file() else []
    per_image_dir, cluster_dir = runs_dir / arms["colour"].name / "splits", runs_dir / arms["clusters"].name / "splits"
    make_cluster_split(cluster_dir, data_root)
    load_dataset(DATASET, data_root=data_root, split_dir=per_image_dir)  # the seeded per-image split (kept if already there)
    show = progress is not False
    per_image = {"models": predict_study(per_image_arms, runs_dir, data_root, include_shipped=True, max_eval_images=max_eval_images, progress=show,
                                         split_dir=per_image_dir, shipped_grey=True),
                 "shortcuts": predict_shortcuts(per_image_dir, data_root, max_eval_images)}
    clustered = {"models": predict_study(cluster_arms, runs_dir, data_root, include_shipped=True, max_eval_images=max_eval_images, progress=show,
                                         split_dir=cluster_dir),
                 "shortcuts": predict_shortcuts(cluster_dir, data_root, max_eval_images)}
    classes = per_image["models"]["classes"]
    _, cluster_records = study_records(cluster_dir, data_root, max_eval_images)
    test_clusters = cluster_groups(cluster_dir, [_key(r.path, data_root) for r in cluster_records["test"]])
    study = score_colour_study(per_image, clustered, classes, arms, test_clusters)
    out.mkdir(parents=True, exist_ok=True)
    _, records = study_records(per_image_dir, data_root, max_eval_images)
    saliency, saliency_figure = _saliency_study(_load_saliency_models(runs_dir, per_image_arms), records["test"], classes, out) if per_image_arms else ({}, None)
    reference_metrics = json.loads(reference.read_text()) if reference is not None and reference.is_file() else None
    context = {
        "classes": classes,
        "split_audit": split_audit(data_root, per_image_dir),
        "cluster_audit": cluster_audit(cluster_dir),
        "sensitivity": _sensitivity(runs_dir, data_root, classes, sensitivity_k, max_eval_images),
        "shortcut_fits": {"per_image": per_image["shortcuts"]["fits"], "clusters": clustered["shortcuts"]["fits"]},
        "shortcut_descriptions": {name: s.description for name, s in SHORTCUTS.items()},
        "saliency": saliency,
        "saliency_figure": saliency_figure,
        "reference": reference_metrics,
        "runs": {a.name: run_history(runs_dir / a.name) for a in [*per_image_arms, *cluster_arms]},
        "training": training,
        "runs_dir": runs_dir,
        "seconds": {"total": time.perf_counter() - tick, "eval": {**per_image["models"]["eval_seconds"], **clustered["models"]["eval_seconds"]}},
    }
    paths = write_colour_report(out, study, context, arms, command)
    if bench is not None:
        write_json(bench, colour_bench(json.loads(paths["metrics"].read_text()), training))
        paths["bench"] = bench
    return paths
