"""Published figures hemaclip is read beside: each with its paper, table, split and metric, and where hemaclip's
protocol differs. All are quoted from the papers, none reproduced here. One list for the table in
docs/evaluation-protocol.md and the report section, so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hemaclip_research.report import Section, Table

__all__ = ["ANCHORS", "Anchor", "anchors_section", "hemaclip_rows"]

WBC_CLIP = "WBC-CLIP, Computerized Medical Imaging and Graphics, 2025"
WBCATT = "Tsutsui, Pang, Wen: WBCAtt, NeurIPS 2023 Datasets and Benchmarks"
LVLM = "Buck et al., cytomorphology LVLM benchmark, medRxiv 2025.05.05.25326989"


@dataclass(frozen=True)
class Anchor:
    """One quoted figure: who, what, where in the paper, on which data and metric, and how hemaclip differs."""

    system: str
    value: float  # as a fraction (91.27 % -> 0.9127)
    metric: str
    split: str
    source: str
    table: str
    protocol_difference: str
    measures: str  # which hemaclip number it stands beside: class_zero_shot | attribute_zero_shot | attribute_heads | lvlm


_WBC_CLIP_DIFF = ("theirs: image-text model trained on WBCAtt train, prompts as in their paper; hemaclip: 128 px EfficientNet-Lite0, "
                  "frozen MiniLM, read through the trained wording and through the unseen wording (both shown)")
_CLASS = "class macro F1, 5 classes"
_ATTR = "macro F1 per attribute, averaged over the 11"

ANCHORS: tuple[Anchor, ...] = (
    *(Anchor(f"WBC-CLIP {name}", value, _CLASS, "WBCAtt test", WBC_CLIP, "Table 2", _WBC_CLIP_DIFF, "class_zero_shot")
      for name, value in (("ViT-Tiny", 0.9716), ("ViT-Small", 0.9846), ("ViT-Base", 0.9771), ("ViT-Large", 0.9938), ("ResNet-50", 0.8712))),
    *(Anchor(f"WBC-CLIP {name}", value, _ATTR, "WBCAtt test", WBC_CLIP, "Table 2", _WBC_CLIP_DIFF, "attribute_zero_shot")
      for name, value in (("ViT-Tiny", 0.6519), ("ViT-Small", 0.6034), ("ViT-Base", 0.6599), ("ViT-Large", 0.6377), ("ResNet-50", 0.6992))),
    Anchor("BiomedCLIP (as reported by WBC-CLIP)", 0.2411, _ATTR, "WBCAtt test", WBC_CLIP, "Table 2",
           "a general biomedical CLIP, not trained on WBCAtt", "attribute_zero_shot"),
    Anchor("MedGemma (as reported by WBC-CLIP)", 0.2892, _ATTR, "WBCAtt test", WBC_CLIP, "Table 2",
           "a general medical vision-language model, not trained on WBCAtt", "attribute_zero_shot"),
    Anchor("WBC-CLIP, best, out of distribution", 0.5272, "macro F1 per attribute, averaged over 5", "LeukemiaAttri", WBC_CLIP,
           "out-of-distribution table", "another dataset (LeukemiaAttri, 5 attributes): not comparable with any WBCAtt number here",
           "none"),
    Anchor("WBCAtt ResNet-50 (ImageNet, 224 px), attribute prediction", 0.9127, _ATTR, "WBCAtt test", WBCATT, "attribute prediction results",
           "supervised attribute classifiers at 224 px; hemaclip's supervised heads at 128 px", "attribute_heads"),
    Anchor("WBCAtt ResNet-50 (ImageNet, 224 px), attribute accuracy", 0.9409, "accuracy per attribute, averaged over the 11", "WBCAtt test",
           WBCATT, "attribute prediction results", "as above; accuracy, not macro F1", "attribute_heads"),
    Anchor("GPT-4o zero-shot", 0.22, "weighted F1 (± 0.02)", "PBC (Acevedo), 50 cells per class", LVLM, "main results",
           "an LVLM asked for the class; hemaclip's LVLM preset scores its own reading on the same-sized PBC subset", "lvlm"),
    Anchor("GPT-4o few-shot", 0.36, "weighted F1 (± 0.03)", "PBC (Acevedo), 50 cells per class", LVLM, "main results",
           "as above, with example images in the prompt", "lvlm"),
)


def hemaclip_rows(metrics: Mapping[str, Any]) -> dict[str, list[tuple[str, float | None]]]:
    """hemaclip's numbers of an `evaluate` run that stand beside each kind of anchor, labelled by reading."""
    zs = metrics.get("zero_shot", {})
    unseen = metrics.get("zero_shot_unseen_wording", {})
    heads = metrics.get("heads", {})

    def point(node: Any) -> float | None:
        return node.get("point") if isinstance(node, Mapping) else node

    lvlm = (metrics.get("lvlm_benchmark") or {}).get("results", {})
    return {
        "class_zero_shot": [("hemaclip zero-shot, trained wording", point(zs.get("classes", {}).get("macro_f1"))),
                            ("hemaclip zero-shot, unseen wording", point(unseen.get("classes", {}).get("macro_f1")))],
        "attribute_zero_shot": [("hemaclip zero-shot, trained wording", zs.get("attribute_mean_macro_f1")),
                                ("hemaclip zero-shot, unseen wording", unseen.get("attribute_mean_macro_f1"))],
        "attribute_heads": [("hemaclip supervised heads (128 px)", heads.get("attribute_mean_macro_f1"))],
        "lvlm": [(f"hemaclip: {name}", point(r.get("weighted_f1"))) for name, r in lvlm.items()],
    }


def anchors_section(metrics: Mapping[str, Any]) -> Section:
    """The anchors table with this run's numbers beside them (WBCAtt test only; other data are not comparable)."""
    comparable = metrics.get("dataset") == "wbcatt" and metrics.get("split") == "test"
    ours = hemaclip_rows(metrics) if comparable else {}
    rows = []
    for anchor in ANCHORS:
        beside = "; ".join(f"{name} {value:.3f}" for name, value in ours.get(anchor.measures, []) if value is not None)
        if anchor.measures == "lvlm" and metrics.get("dataset") in ("pbc", "wbcatt"):
            beside = "; ".join(f"{name} {value:.3f}" for name, value in hemaclip_rows(metrics)["lvlm"] if value is not None)
        rows.append([anchor.system, anchor.value, anchor.metric, anchor.split, f"{anchor.source}, {anchor.table}",
                     anchor.protocol_difference, beside or "–"])
    n = metrics.get("n_images")
    text = ("Published figures, **quoted, not reproduced**: each with its paper, table, split and metric, and where hemaclip's "
            f"protocol differs. This run scored {n} images of {metrics.get('dataset')} / {metrics.get('split')}"
            + ("." if comparable else "; the WBCAtt anchors are on WBCAtt test, so no hemaclip number is set beside them here."))
    table = Table(["Anchor", "Value", "Metric", "Split", "Source", "Protocol difference", "hemaclip, this run"], rows,
                  caption="Anchors with sources")
    return Section("Anchors (published figures, quoted)", text, [table])
