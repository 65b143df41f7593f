"""Part: retrieval both ways, with every relevant item counting, and open_clip's paired recall."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.metrics.retrieval import paired_recall_at_k, retrieval_metrics
from hemaclip_research import plots
from hemaclip_research.evaluate.inputs import EvalInputs, Figures, Part
from hemaclip_research.report import Section, Table

__all__ = ["PAIRED_MAX_IMAGES", "RETRIEVAL_KS", "retrieval_part"]

RETRIEVAL_KS: tuple[int, ...] = (1, 3, 5, 10)
PAIRED_MAX_IMAGES = 4000  # the 1:1 score matrix is N x N


def topk_metrics(res: Mapping[str, Any], n_gallery: int, ks: Sequence[int]) -> dict[str, Any]:
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


def retrieval_part(inputs: EvalInputs, figures: Figures) -> Part:
    """Retrieval both ways (text->image, image->text, image->image) with every relevant item counting,
    open_clip's 1:1 paired recall, and a figure of the top-3 cells per class query."""
    from hemaclip.tasks import retrieval as rt

    ks = list(RETRIEVAL_KS)
    results: dict[str, Any] = {}
    fs = inputs.eval_features
    figs = []
    if inputs.model is not None:
        setting = inputs.zero_shot_setting
        t2i = rt.text_to_image_by_class(setting, inputs.eval_zero_shot_features)
        results["text_to_image_by_class"] = retrieval_metrics(t2i["scores"], t2i["relevant"], ks)
        i2t = rt.image_to_text_by_class(setting, inputs.eval_zero_shot_features)
        if len(i2t["indices"]):
            results["image_to_text_by_class"] = retrieval_metrics(i2t["scores"], i2t["relevant"], ks)
        if any(a is not None for a in fs.attributes):
            t2a = rt.text_to_image_by_attribute(inputs.model, fs, inputs.prompt_set, text_cache=inputs.text_cache)
            results["text_to_image_by_attribute"] = retrieval_metrics(t2a["scores"], t2a["relevant"], ks)
            results["image_to_text_by_attribute"] = retrieval_metrics(t2a["scores"].T, t2a["relevant"].T, ks)
        figs.append(retrieval_grid(inputs, t2i, figures))
    if len(fs) >= 2:
        kmax = max(ks)
        results["image_to_image_by_class"] = topk_metrics(rt.image_to_image(fs, k=kmax), len(fs) - 1, ks)
        annotated = np.array([i for i, a in enumerate(fs.attributes) if a is not None], dtype=np.int64)
        if len(annotated) >= 2:
            sub = fs.subset(annotated)
            profile = ["|".join(a[n] for n in ATTRIBUTE_NAMES) for a in sub.attributes]
            results["image_to_image_by_attribute_profile"] = topk_metrics(
                rt.image_to_image(sub, k=kmax, labels=profile), len(sub) - 1, ks)
    paired = paired_retrieval(inputs)
    if paired:
        results["paired_caption"] = paired
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
    if inputs.model is None:
        text += " External features have no text tower: only image→image retrieval applies."
    tables = [Table(columns, rows, caption="Retrieval (k = 1, 5, 10)")]
    if paired:
        tables.append(Table(["Direction", "Pairs", "R@1", "R@5", "R@10", "median rank"],
                            [[d.replace("_", " "), m["n_queries"], m["R@1"], m["R@5"], m["R@10"], m.get("median_rank")]
                             for d, m in paired.items() if isinstance(m, dict)],
                            caption="open_clip-style 1:1 recall: only an image's own caption counts (pessimistic: "
                                    "cells with identical attributes share one caption wording)"))
    return Part({"retrieval": results}, [Section("Retrieval", text, tables, figs)])


def paired_retrieval(inputs: EvalInputs) -> dict[str, Any]:
    """open_clip's paired R@k: each attributed image against one generated caption of its own attributes."""
    from hemaclip.tasks import retrieval as rt
    from hemaclip.text.captions import caption_variants

    if inputs.model is None:
        return {}
    rows = np.array([i for i, a in enumerate(inputs.eval_features.attributes) if a is not None], dtype=np.int64)[:PAIRED_MAX_IMAGES]
    if len(rows) < 2:
        return {}
    sub = inputs.eval_features.subset(rows)
    captions = [caption_variants(a, n=1, seed=inputs.seed)[0] for a in sub.attributes]
    res = rt.paired_image_text(inputs.model, sub, captions, text_cache=inputs.text_cache)
    out: dict[str, Any] = {"caption_seed": inputs.seed}
    for direction in ("image_to_text", "text_to_image"):
        out[direction] = paired_recall_at_k(np.asarray(res[direction]["scores"]), (1, 5, 10))
    return out


def _thumbnail(path: str, size: int = 192) -> Any:
    from hemaclip.data.preprocess import decode_image

    image = decode_image(path)
    image.thumbnail((size, size))
    return image


def retrieval_grid(inputs: EvalInputs, t2i: Mapping[str, Any], figures: Figures) -> tuple[Path, str]:
    fs = inputs.eval_zero_shot_features
    queries, results = [], []
    prompts = inputs.prompt_set.class_prompts(inputs.prompt_dataset)
    for q, name in enumerate(t2i["queries"]):
        order = np.argsort(-np.asarray(t2i["scores"][q]), kind="stable")[:3]
        queries.append(f"{name}: “{prompts[name][0]}”")
        results.append([(_thumbnail(fs.paths[i]), bool(t2i["relevant"][q, i]), fs.labels[i]) for i in order])
    path = plots.plot_retrieval_grid(queries, results, figures.path("retrieval_grid.png"), k=3)
    return path, "Top-3 images per class query (green frame: image of that class; red: another class)."


