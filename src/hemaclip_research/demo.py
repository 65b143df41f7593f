"""The demo study behind `hemaclip demo` (the command prints its four steps).

Everything here runs the real library on real data: the Describer with the shipped model (its reference
index is the WBCAtt train split, built once into the cache), a CellIndex over a few hundred WBCAtt test
cells (cached and resumable), text search, and a report written with `hemaclip_research.report`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from hemaclip.errors import HemaclipError

# Demo queries: each names attribute values, so a hit can be checked against the WBCAtt annotation.
QUERIES: tuple[tuple[str, dict[str, str], dict[str, str] | None], ...] = (
    ("large cell with a segmented nucleus and coarse red granules", {"granule_colour": "red"}, None),
    ("small round cell with a round nucleus, a high nuclear-cytoplasmic ratio and no granules", {"granule_type": "nil", "nuclear_cytoplasmic_ratio": "high"}, None),
    ("cell with coarse purple granules", {"granule_colour": "purple", "granule_type": "coarse"}, {"cell_size": "big"}),
)
K = 8


def demo_data_lines(data: Path | None) -> list[str]:
    """One line per dataset: images after deduplication, classes, split sizes (or why it is absent)."""
    from hemaclip.data.datasets import BUNDLED_DATASETS, load_dataset
    from hemaclip.data.paths import resolve_data_root

    root = resolve_data_root(data)
    lines = [f"data root: {root}"]
    for name in BUNDLED_DATASETS:
        try:
            summary = load_dataset(name, data_root=root).summary(root)
        except HemaclipError as exc:
            lines.append(f"{name}: absent or invalid ({exc})")
            continue
        sizes = ", ".join(f"{k} {v}" for k, v in summary["split_sizes"].items())
        lines.append(f"{name}: {summary['records']} images ({summary['files_found']} files), {len(summary['classes'])} classes; {sizes}")
    return lines


def _png(path: Path, figure: Any) -> Path:
    import matplotlib.pyplot as plt

    from hemaclip.io import atomic_write

    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def demo_describe(data: Path | None, checkpoint: Path | None, n: int, out: Path, reference: bool = True) -> dict[str, Any]:
    """Describe `n` WBCAtt test cells per class; saliency overlays of each go into one figure.
    `reference=False` skips the reference index (no neighbours), for a quick run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.preprocess import decode_image
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.saliency import overlay_png, saliency_map

    path = resolve_checkpoint(checkpoint)
    describer = Describer.from_checkpoint(path, data_root=data, progress=True)
    if reference:
        describer.build_reference_index()
    test = load_dataset("wbcatt", data_root=data).split("test")
    chosen = [r for label in sorted({r.label for r in test}) for r in [x for x in test if x.label == label][:n]]
    descriptions = list(describer.describe_paths([r.path for r in chosen], progress=False))
    table = Table(title=f"{len(chosen)} WBCAtt test cells described by {path.name}")
    for column in ("image", "true class", "predicted (p)", "abstains", "attributes right", "stated / right"):
        table.add_column(column)
    rows, sentences, right_total, stated_total, stated_right = [], [], 0, 0, 0
    out.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(2, len(chosen), figsize=(1.6 * len(chosen), 3.6), squeeze=False)
    for i, (record, d) in enumerate(zip(chosen, descriptions)):
        if d.error:
            raise HemaclipError(d.error)
        right = sum(d.attributes[a]["value"] == record.attributes[a] for a in d.attributes)
        stated = [a for a, v in d.attributes.items() if v["stated"]]
        s_right = sum(d.attributes[a]["value"] == record.attributes[a] for a in stated)
        right_total += right
        stated_total += len(stated)
        stated_right += s_right
        predicted = f"{d.label} ({d.probability:.2f})"
        table.add_row(Path(record.path).name, record.label, predicted, "yes" if d.abstain else "no", f"{right}/{len(d.attributes)}", f"{s_right}/{len(stated)}")
        rows.append([Path(record.path).name, record.label, d.label, d.probability, d.abstain, f"{right}/{len(d.attributes)}", f"{s_right}/{len(stated)}", d.sentence])
        sentences.append(f"{Path(record.path).name} ({record.label}): {d.sentence}")
        prepared = describer.prepare(decode_image(record.path))
        overlay = np.asarray(Image.open(io.BytesIO(overlay_png(prepared, saliency_map(describer.model, prepared)))))
        axes[0, i].imshow(prepared)
        axes[0, i].set_title(f"{record.label}\n→ {d.label}", fontsize=7)
        axes[1, i].imshow(overlay)
        for ax in axes[:, i]:
            ax.set_axis_off()
    figure.suptitle("WBCAtt test cells (top) and Grad-CAM of the predicted class (bottom)", fontsize=9)
    saliency_png = _png(out / "described-cells.png", figure)
    return {
        "describer": describer,
        "checkpoint": path,
        "table": table,
        "rows": rows,
        "sentences": sentences,
        "figure": saliency_png,
        "metrics": {
            "cells": len(chosen),
            "class_correct": int(sum(r.label == d.label for r, d in zip(chosen, descriptions))),
            "attribute_values_correct": right_total,
            "attribute_values": sum(len(d.attributes) for d in descriptions),
            "stated_values": stated_total,
            "stated_values_correct": stated_right,
            "calibrated": bool(describer.calibrated),
            "reference_index_size": len(describer.index) if describer.index is not None else 0,
        },
    }


def demo_search(data: Path | None, describer: Any, checkpoint: Path, index_size: int, out: Path) -> dict[str, Any]:
    """Index `index_size` WBCAtt test cells (an even spread over the split; cached) and search by text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from hemaclip.data.datasets import load_dataset
    from hemaclip.cache import cache_dir, file_sha1
    from hemaclip.models.inference import embed_texts
    from hemaclip.tasks.index import CellIndex

    test = load_dataset("wbcatt", data_root=data).split("test")
    step = max(1, len(test) // index_size)
    records = test[::step][:index_size]
    checkpoint_id = file_sha1(checkpoint)
    key = hashlib.sha1(f"{checkpoint_id}|{records[0].path}|{len(records)}".encode()).hexdigest()[:12]
    index = CellIndex.build(
        describer.model, records, cache_dir() / "index" / f"demo-test-{key}", checkpoint_id=checkpoint_id,
        shard_size=100, progress=True, source="WBCAtt test split (demo sample)", checkpoint_path=checkpoint,
    )
    lines = [f"index: {len(index)} WBCAtt test cells, {index.dim}-d {index.kind} ({index.build_counts.get('reused', 0)} of {index.build_counts.get('shards', 0)} shards reused from the cache)"]
    results = []
    figure, axes = plt.subplots(len(QUERIES), K, figsize=(1.5 * K, 1.9 * len(QUERIES)), squeeze=False)
    for qi, (query, check, where) in enumerate(QUERIES):
        hits = index.search(embed_texts(describer.model, [query]), k=K, where=where)[0]
        matching = sum(all(h["attributes"].get(a) == v for a, v in check.items()) for h in hits)
        base_rate = np.mean([all((r.attributes or {}).get(a) == v for a, v in check.items()) for r in records])
        label = f"'{query}'" + (f" where {where}" if where else "")
        lines.append(f"{label}: {matching}/{len(hits)} hits annotated {check} (in the whole index: {base_rate:.0%}); classes: {', '.join(h['label'] for h in hits)}")
        results.append({"query": query, "where": where, "check": check, "hits_matching": matching, "hits": len(hits), "index_base_rate": float(base_rate),
                        "hit_labels": [h["label"] for h in hits], "hit_scores": [round(h["score"], 4) for h in hits]})
        for j in range(K):
            ax = axes[qi, j]
            ax.set_axis_off()
            if j < len(hits):
                ax.imshow(Image.open(hits[j]["path"]).convert("RGB"))
                ok = all(hits[j]["attributes"].get(a) == v for a, v in check.items())
                ax.set_title(f"{hits[j]['label']} {'✓' if ok else '✗'}\n{hits[j]['score']:.3f}", fontsize=7)
        axes[qi, 0].text(-0.1, 0.5, f"Q{qi + 1}", transform=axes[qi, 0].transAxes, ha="right", va="center", fontsize=10)
    figure.suptitle("Top hits per query (✓: the WBCAtt annotation has the attribute values the query names)", fontsize=9)
    grid = _png(out / "search-results.png", figure)
    return {"lines": lines, "results": results, "figure": grid, "index": {"size": len(index), "kind": index.kind, "path": str(index.path)}}


def demo_write_report(out: Path, data_lines: list[str], described: dict[str, Any], searched: dict[str, Any], seconds: float) -> dict[str, Path]:
    """The demo's Markdown + HTML report and metrics.json."""
    from hemaclip_research.report import Section, Table as ReportTable, write_report

    m = described["metrics"]
    describe_text = (
        f"{m['cells']} WBCAtt test cells (never used for training or choices) described by the shipped model. "
        f"Class right: {m['class_correct']}/{m['cells']}. Attribute values right: {m['attribute_values_correct']}/{m['attribute_values']}; "
        f"of the values the sentence states (confident ones only): {m['stated_values_correct']}/{m['stated_values']}. "
        f"Probabilities are {'calibrated (temperature fitted on validation images)' if m['calibrated'] else 'not calibrated'}. "
    ) + (
        (
            f"Neighbours come from a reference index of {m['reference_index_size']} WBCAtt train cells. "
            if m["reference_index_size"]
            else "No reference index was used (--no-reference). "
        )
        + "A handful of cells is an illustration, not an evaluation: see `hemaclip evaluate` for that."
    )
    search_rows = [
        [f"Q{i + 1}", r["query"] + (f" (where {r['where']})" if r["where"] else ""), ", ".join(f"{k}={v}" for k, v in r["check"].items()),
         f"{r['hits_matching']}/{r['hits']}", r["index_base_rate"]]
        for i, r in enumerate(searched["results"])
    ]
    sections = [
        Section("Data", "\n\n".join(data_lines)),
        Section(
            "Describing cells",
            describe_text,
            tables=[ReportTable(["image", "true class", "predicted", "p", "abstains", "attributes right", "stated right", "sentence"], described["rows"], digits=2)],
            figures=[(described["figure"], "Each cell as the model sees it, and where the class read-out looked (Grad-CAM).")],
        ),
        Section(
            "Search by description",
            f"A {searched['index']['kind']} index of {searched['index']['size']} WBCAtt test cells, searched with text. "
            "'hits annotated' counts top hits whose WBCAtt annotation has the values the query names; "
            "'base rate' is the share of such cells in the index (what a random pick would get).",
            tables=[ReportTable(["#", "query", "checked values", "hits annotated", "base rate"], search_rows, digits=2)],
            figures=[(searched["figure"], "Top hits per query, with similarity and whether the annotation agrees.")],
        ),
    ]
    metrics = {"describe": m, "search": searched["results"], "search_index": searched["index"], "seconds": round(seconds, 1),
               "checkpoint": str(described["checkpoint"])}
    return write_report(out, "hemaclip demo: describe and search blood cells", sections, metrics, checkpoint=described["checkpoint"])
