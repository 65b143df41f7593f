"""Corruption robustness of a hemaclip model (ImageNet-C / MedMNIST-C style), against a stated baseline.

For every corruption x severity (see :mod:`hemaclip.data.corruptions`) the test images are corrupted
(deterministically, seeded per image) at the model's input resolution and scored:

* ``zs_class``: 5-class macro F1 read through the text prompts (zero-shot),
* ``head_class``: macro F1 of the supervised class head (restricted to the evaluated classes),
* ``head_attr`` / ``zs_attr``: mean over the 11 WBCAtt attributes of the attribute macro F1
  (supervised heads / text prompts).

The **baseline** is a logistic probe (the project's standard probe: L2-normalised features, C = 1)
on the pooled features of the ImageNet-pretrained EfficientNet-Lite0 trunk *without any hemaclip
training*, fitted on clean WBCAtt train images (class, and one probe per attribute), evaluated on
exactly the same corrupted images in the same run. The class scores of the model are compared with
the baseline's class probe, attribute scores with its attribute probes.

Error measures (F1-based, as MedMNIST-C does with its metrics):
``CE_c = sum_s (1 - F1_{c,s})``; ``mCE = mean_c CE_c(model) / CE_c(baseline)``;
``relative mCE = mean_c [sum_s (F1_clean - F1_{c,s})] / [same for the baseline]`` over the corruptions
on which the baseline loses at least `MIN_BASELINE_RELATIVE_CE`.
Below 1 means the model loses less than the baseline.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.data.corruptions import CORRUPTION_NAMES, SEVERITIES, corrupt_batch
from hemaclip.data.datasets import CellRecord
from hemaclip.data.preprocess import preprocess_for
from hemaclip.data.stain import Normalizer, normalize_batch
from hemaclip.errors import DataError
from hemaclip.log import get_logger, progress_level
from hemaclip.metrics.classification import macro_f1
from hemaclip.models.inference import image_outputs
from hemaclip.models.modes import eval_mode
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.tasks.features import l2_normalize
from hemaclip.tasks.probes import logistic_probe
from hemaclip.tasks.zero_shot import class_embeddings
from hemaclip.text.prompts import PromptSet

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

CLEAN = ("clean", 0)
logger = get_logger(__name__)
# A baseline that loses less than this much F1 on a corruption (summed over severities) gives no
# meaningful relative-CE ratio (it divides by almost nothing), so that corruption is left out of it.
MIN_BASELINE_RELATIVE_CE = 0.05
METRICS: tuple[str, ...] = ("zs_class", "head_class", "zs_attr", "head_attr")
# Which baseline score each model score is compared with.
BASELINE_OF: dict[str, str] = {"zs_class": "class", "head_class": "class", "zs_attr": "attr", "head_attr": "attr"}
BASELINE_DESCRIPTION = (
    "logistic probe (C = 1, L2-normalised features) on the pooled features of the ImageNet-pretrained "
    "EfficientNet-Lite0 trunk without hemaclip training, fitted on clean WBCAtt train images"
)


@dataclass
class RobustnessConfig:
    """What to run. The default subset takes a few minutes on 2 CPU cores."""

    corruptions: tuple[str, ...] = CORRUPTION_NAMES
    severities: tuple[int, ...] = SEVERITIES
    seed: int = 0
    batch_size: int = 128
    baseline: bool = True
    baseline_model: str = "effnet-lite0-128"  # model config whose ImageNet trunk is the baseline
    metrics: tuple[str, ...] = field(default=METRICS)


def _macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> float:
    """hemaclip's macro F1 over `labels` (NaN for no images). The classes are averaged in sorted order, the
    order these scores have always been summed in, so they stay the same to the last bit."""
    return macro_f1(y_true, y_pred, sorted(labels)) if len(y_true) else float("nan")


class _ModelScorer:
    """Scores one batch of uint8 images with a hemaclip model: zero-shot and head, classes and attributes."""

    def __init__(self, model: DualEncoder, prompt_set: PromptSet, dataset: str, classes: Sequence[str], batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        cache = PooledTextCache(model.text)
        all_prompts = prompt_set.class_prompts(dataset)
        missing = [c for c in classes if c not in all_prompts]
        if missing:
            raise DataError(f"{prompt_set.source}: no '{dataset}' prompts for class(es) {', '.join(missing)}")
        self.classes = list(classes)
        self.class_weights = class_embeddings(model, {c: all_prompts[c] for c in classes}, cache)
        self.attr_weights = {
            name: (list(values), class_embeddings(model, values, cache))
            for name, values in prompt_set.attribute_prompts().items()
        }
        vocab = list(getattr(model, "class_names", ()) or ())
        self.head_cols = [vocab.index(c) for c in classes] if all(c in vocab for c in classes) else None
        self.attr_vocab = {k: list(v) for k, v in (getattr(model, "attributes", None) or {}).items()}

    def __call__(self, images: np.ndarray, labels: Sequence[str], attributes: Sequence[Mapping[str, str] | None]) -> dict[str, float]:
        out = image_outputs(self.model, images, batch_size=self.batch_size)
        features = out["features"].numpy()
        scores: dict[str, float] = {}
        scores["zs_class"] = _macro_f1(labels, [self.classes[i] for i in np.argmax(features @ self.class_weights.T, axis=1)], self.classes)
        if out["class_logits"] is not None and self.head_cols is not None:
            logits = out["class_logits"].numpy()[:, self.head_cols]
            scores["head_class"] = _macro_f1(labels, [self.classes[i] for i in np.argmax(logits, axis=1)], self.classes)
        rows = [i for i, a in enumerate(attributes) if a is not None]
        if rows:
            zs, head = [], []
            for name in ATTRIBUTE_NAMES:
                truth = [attributes[i][name] for i in rows]
                if name in self.attr_weights:
                    values, weights = self.attr_weights[name]
                    zs.append(_macro_f1(truth, [values[j] for j in np.argmax(features[rows] @ weights.T, axis=1)], ATTRIBUTES[name]))
                if out["attribute_logits"] is not None and name in out["attribute_logits"] and name in self.attr_vocab:
                    values = self.attr_vocab[name]
                    logits = out["attribute_logits"][name].numpy()[rows]
                    head.append(_macro_f1(truth, [values[j] for j in np.argmax(logits, axis=1)], ATTRIBUTES[name]))
            if zs:
                scores["zs_attr"] = float(np.mean(zs))
            if head:
                scores["head_attr"] = float(np.mean(head))
        return scores


@torch.no_grad()
def trunk_features(model: DualEncoder, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Pooled image-trunk features (before the hemaclip projection) of uint8 images [N, H, W, 3]."""
    preprocess = preprocess_for(model)
    transform = preprocess.eval_transform()
    trunk = model.visual.trunk
    chunks = []
    with eval_mode(trunk):
        for start in range(0, len(images), batch_size):
            batch = preprocess.batch(images[start : start + batch_size], transform)
            out = trunk(batch.contiguous(memory_format=torch.channels_last))  # as image_outputs: faster on CPU
            chunks.append(out.float().reshape(len(batch), -1).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


class _BaselineScorer:
    """The ImageNet-trunk logistic-probe baseline: fitted once on clean train images."""

    def __init__(
        self, trunk_model: DualEncoder, train_images: np.ndarray, train_records: Sequence[CellRecord], classes: Sequence[str], batch_size: int
    ) -> None:
        self.model, self.batch_size = trunk_model, batch_size
        self.classes = list(classes)
        self.train_x = l2_normalize(trunk_features(trunk_model, train_images, batch_size))
        self.train_labels = [r.label for r in train_records]
        self.train_attrs = [r.attributes for r in train_records]

    def features(self, images: np.ndarray) -> np.ndarray:
        return l2_normalize(trunk_features(self.model, images, self.batch_size))

    def score_many(
        self, feats: Sequence[np.ndarray], labels: Sequence[str], attributes: Sequence[Mapping[str, str] | None]
    ) -> list[dict[str, float]]:
        """Score several feature sets of the same images with one fit per probe (all predicted together)."""
        sizes = np.cumsum([0] + [len(f) for f in feats])
        x_test = np.concatenate(feats)
        class_pred, _ = logistic_probe(self.train_x, self.train_labels, x_test)
        attr_preds: dict[str, np.ndarray] = {}
        train_rows = [i for i, a in enumerate(self.train_attrs) if a is not None]
        if train_rows:
            for name in ATTRIBUTE_NAMES:
                attr_preds[name], _ = logistic_probe(self.train_x[train_rows], [self.train_attrs[i][name] for i in train_rows], x_test)
        results = []
        for k in range(len(feats)):
            lo, hi = sizes[k], sizes[k + 1]
            scores = {"class": _macro_f1(labels, list(class_pred[lo:hi]), self.classes)}
            rows = [i for i, a in enumerate(attributes) if a is not None]
            if rows and attr_preds:
                scores["attr"] = float(np.mean([
                    _macro_f1([attributes[i][name] for i in rows], [attr_preds[name][lo + i] for i in rows], ATTRIBUTES[name]) for name in ATTRIBUTE_NAMES
                ]))
            results.append(scores)
        return results


def corruption_errors(
    scores: Mapping[tuple[str, int], Mapping[str, float]],
    baseline: Mapping[tuple[str, int], Mapping[str, float]] | None,
    corruptions: Sequence[str],
    severities: Sequence[int],
    metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
    """CE per corruption, mCE and relative mCE (model vs baseline) for each metric; see the module doc."""
    out: dict[str, Any] = {}
    for metric in metrics:
        if metric not in scores.get(CLEAN, {}):
            continue
        bkey = BASELINE_OF[metric]
        clean = scores[CLEAN][metric]
        per: dict[str, Any] = {}
        ratios, rel_ratios = [], []
        for c in corruptions:
            f1s = [scores[(c, s)][metric] for s in severities]
            ce = float(sum(1.0 - f for f in f1s))
            rel = float(sum(clean - f for f in f1s))
            entry: dict[str, Any] = {"ce": ce, "relative_ce": rel, "mean_f1": float(np.mean(f1s))}
            if baseline is not None and bkey in baseline.get(CLEAN, {}):
                bclean = baseline[CLEAN][bkey]
                bf1s = [baseline[(c, s)][bkey] for s in severities]
                bce = float(sum(1.0 - f for f in bf1s))
                brel = float(sum(bclean - f for f in bf1s))
                entry.update(baseline_ce=bce, baseline_relative_ce=brel)
                entry["ce_normalised"] = ce / bce if bce > 1e-9 else None
                # A baseline that loses (almost) nothing on a corruption gives no meaningful ratio.
                entry["relative_ce_normalised"] = rel / brel if brel >= MIN_BASELINE_RELATIVE_CE else None
                if entry["ce_normalised"] is not None:
                    ratios.append(entry["ce_normalised"])
                if entry["relative_ce_normalised"] is not None:
                    rel_ratios.append(entry["relative_ce_normalised"])
            per[c] = entry
        summary: dict[str, Any] = {"clean_f1": clean, "per_corruption": per,
                                   "mean_corrupted_f1": float(np.mean([per[c]["mean_f1"] for c in corruptions]))}
        if baseline is not None and bkey in baseline.get(CLEAN, {}):
            summary["baseline_clean_f1"] = baseline[CLEAN][bkey]
            summary["mce"] = float(np.mean(ratios)) if ratios else None
            summary["relative_mce"] = float(np.mean(rel_ratios)) if rel_ratios else None
            summary["relative_mce_corruptions"] = len(rel_ratios)
        out[metric] = summary
    return out


def run_robustness(
    model: DualEncoder,
    records: Sequence[CellRecord],
    images: np.ndarray,
    prompt_set: PromptSet,
    dataset: str,
    classes: Sequence[str],
    config: RobustnessConfig | None = None,
    *,
    baseline_model: DualEncoder | None = None,
    baseline_train: tuple[np.ndarray, Sequence[CellRecord]] | None = None,
    stain_normalizer: Normalizer | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score `model` (and the baseline, if given) on clean and corrupted copies of `images`.

    `images` are uint8 [N, S, S, 3] at the model's input size, in the order of `records`.
    `stain_normalizer` is applied after corrupting (as a deployment would: the corruption happens
    at acquisition, normalisation in software) for model and baseline alike. Returns
    {"scores": {"clean/0" | "corruption/severity": {metric: F1}}, "baseline_scores": ..., "errors": ...}.
    """
    config = config or RobustnessConfig()
    if len(records) != len(images) or not len(records):
        raise DataError(f"need one image per record and at least one record, got {len(images)} images, {len(records)} records")
    labels = [r.label for r in records]
    attributes = [r.attributes for r in records]
    scorer = _ModelScorer(model, prompt_set, dataset, classes, config.batch_size)
    conditions = [CLEAN] + [(c, s) for c in config.corruptions for s in config.severities]
    show = progress and sys.stderr.isatty()
    scores: dict[tuple[str, int], dict[str, float]] = {}
    base = None
    if baseline_model is not None:
        if baseline_train is None:
            raise DataError("the baseline needs training images (baseline_train)")
        logger.log(progress_level(progress), "baseline: ImageNet trunk features of the clean train images")
        train_images, train_records = baseline_train
        base = _BaselineScorer(baseline_model, normalize_batch(np.asarray(train_images), stain_normalizer), train_records, classes,
                               config.batch_size)
    base_feats: list[np.ndarray] = []
    for name, severity in tqdm(conditions, desc="corruptions", unit="set", disable=not show):
        batch = np.asarray(images) if name == "clean" else corrupt_batch(images, name, severity, seed=config.seed)
        batch = normalize_batch(batch, stain_normalizer)
        scores[(name, severity)] = scorer(batch, labels, attributes)
        if base is not None:
            base_feats.append(base.features(batch))
    baseline_scores = None
    if base is not None:
        logger.log(progress_level(progress), "baseline: logistic probes")
        baseline_scores = dict(zip(conditions, base.score_many(base_feats, labels, attributes)))
    errors = corruption_errors(scores, baseline_scores, config.corruptions, config.severities, config.metrics)
    key = lambda c: f"{c[0]}/{c[1]}"  # noqa: E731
    return {
        "n_images": len(records),
        "scores": {key(c): v for c, v in scores.items()},
        "baseline_scores": {key(c): v for c, v in baseline_scores.items()} if baseline_scores else None,
        "errors": errors,
        "corruptions": list(config.corruptions),
        "severities": list(config.severities),
        "seed": config.seed,
    }
