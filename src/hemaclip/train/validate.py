"""Per-epoch validation: zero-shot class and attribute macro F1 through text, and the supervised heads.

Macro F1 is hemaclip's one macro F1 (:mod:`hemaclip.metrics.classification`), so these numbers equal
those `hemaclip evaluate` reports for the same split and checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import CellRecord
from hemaclip.metrics.classification import macro_f1
from hemaclip.models.inference import image_outputs
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.models.zero_shot import zero_shot_scores
from hemaclip.text.prompts import PromptSet


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    images: np.ndarray,
    records: Sequence[CellRecord],
    classes: Sequence[str],
    prompts: PromptSet,
    dataset: str,
    text_cache: PooledTextCache,
    device: torch.device,
    wording: str = "train",
) -> dict[str, float]:
    """Metrics on validation images (uint8 [N, H, W, 3]) with their records, named `val_*`.

    Zero-shot reads the prompt file's `wording`: training selects checkpoints on the trained wording only,
    so the held-out wording stays unused by any choice.
    """
    outputs = image_outputs(model, images, device=device)
    features = outputs["features"].numpy().astype(np.float32, copy=False)
    metrics: dict[str, float] = {}
    class_prompts = prompts.class_prompts(dataset, wording)
    truth = [classes.index(r.label) for r in records]
    predicted = zero_shot_scores(model, features, {c: class_prompts[c] for c in classes}, text_cache).argmax(axis=1)
    metrics["val_zs_class_macro_f1"] = macro_f1(truth, predicted, len(classes))
    if outputs["class_logits"] is not None:
        model_index = [model.class_names.index(c) if c in model.class_names else -1 for c in classes]
        if all(i >= 0 for i in model_index):
            head = outputs["class_logits"][:, model_index].argmax(dim=1).tolist()
            metrics["val_head_class_macro_f1"] = macro_f1(truth, head, len(classes))
    annotated = [i for i, r in enumerate(records) if r.attributes]
    if annotated:
        zs_scores, head_scores = [], []
        attribute_prompts = prompts.attribute_prompts(wording)
        for name, values in ATTRIBUTES.items():
            truth_a = [values.index(records[i].attributes[name]) for i in annotated]
            zs = zero_shot_scores(model, features[annotated], {v: attribute_prompts[name][v] for v in values}, text_cache).argmax(axis=1)
            zs_scores.append(macro_f1(truth_a, zs, len(values)))
            metrics[f"val_zs_attr_{name}"] = zs_scores[-1]
            if outputs["attribute_logits"] is not None:
                head = outputs["attribute_logits"][name][annotated].argmax(dim=1).tolist()
                head_scores.append(macro_f1(truth_a, head, len(values)))
        metrics["val_zs_attr_macro_f1"] = float(np.mean(zs_scores))
        if head_scores:
            metrics["val_head_attr_macro_f1"] = float(np.mean(head_scores))
    return metrics
