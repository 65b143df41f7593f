"""Retrieval tasks on cached features: score matrices and relevance, never metrics.

Every function returns a dict with ``scores`` (float32, higher = better; cosine similarity of
L2-normalised embeddings) and a boolean ``relevant`` of the same shape, ready for
:func:`hemaclip.metrics.retrieval.retrieval_metrics` / ``paired_recall_at_k`` (imported by callers, not
here), plus ``n_relevant`` [Q] = how many gallery items are relevant to each query in the whole
gallery.

Memory. Class- and attribute-level tasks have few queries or few gallery items (e.g. 33 x N), so
they return full matrices. Image-to-image and paired image-text are N x N (20k images: 1.6 GB of
float32 scores alone), so they take ``k``: with ``k`` set, each query keeps only its top-``k``
gallery items, computed in row chunks (about 4 M scores per chunk), and the result holds
``scores`` [Q, k] sorted best-first, ``indices`` [Q, k] (gallery positions) and ``relevant`` [Q, k].
Ties are broken by lower gallery index, as in :mod:`hemaclip.metrics.retrieval`, so hit@k,
precision@k and MRR@k computed on the top-k matrices equal those of the full matrix for any
cut-off <= k. Recall@k is NOT (the top-k matrix does not see relevant items beyond k): compute it
as ``relevant[:, :k].sum(1) / n_relevant``. ``k=None`` keeps the whole ranking (N x N memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import DataError
from hemaclip.models.inference import embed_texts
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.tasks.features import FeatureSet
from hemaclip.tasks.zero_shot import ZeroShotSetting, _text_cache, annotated_attributes, check_same_width, class_embeddings
from hemaclip.text.prompts import PromptSet

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = [
    "image_to_image",
    "image_to_text_by_class",
    "paired_image_text",
    "ranked_topk",
    "text_to_image_by_attribute",
    "text_to_image_by_class",
]

_BLOCK_ELEMENTS = 4_000_000


def ranked_topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int | None,
    relevant_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    exclude_self: bool = False,
) -> dict[str, Any]:
    """Top-k gallery items per query by cosine (ties -> lower gallery index), in row chunks.

    `relevant_fn(query_rows [b], gallery_cols [b, k]) -> bool [b, k]`. With `exclude_self`, query i
    never retrieves gallery item i (queries and gallery are the same set). `k=None` = all items.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    n_q, n_g = len(queries), len(gallery)
    available = n_g - (1 if exclude_self else 0)
    kk = available if k is None else min(int(k), available)
    if k is not None and int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    scores = np.zeros((n_q, max(kk, 0)), dtype=np.float32)
    indices = np.zeros((n_q, max(kk, 0)), dtype=np.int64)
    relevant = np.zeros((n_q, max(kk, 0)), dtype=bool)
    if n_q == 0 or kk <= 0:
        return {"scores": scores, "indices": indices, "relevant": relevant, "k": max(kk, 0)}
    block = max(1, _BLOCK_ELEMENTS // max(n_g, 1))
    for start in range(0, n_q, block):
        rows = np.arange(start, min(n_q, start + block))
        s = queries[rows] @ gallery.T
        if exclude_self:
            s[np.arange(rows.size), rows] = -np.inf
        kth = -np.partition(-s, kk - 1, axis=1)[:, kk - 1]  # k-th largest score per row
        greater = s > kth[:, None]
        equal = s == kth[:, None]
        need = kk - greater.sum(axis=1)
        chosen = greater | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))  # ties: lowest index first
        cols = np.nonzero(chosen)[1].reshape(rows.size, kk)
        vals = np.take_along_axis(s, cols, axis=1)
        order = np.lexsort((cols, -vals), axis=-1)
        cols = np.take_along_axis(cols, order, axis=1)
        indices[rows] = cols
        scores[rows] = np.take_along_axis(vals, order, axis=1)
        relevant[rows] = relevant_fn(rows, cols)
    return {"scores": scores, "indices": indices, "relevant": relevant, "k": kk}


def _label_counts(labels: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return counts


def text_to_image_by_class(setting: ZeroShotSetting, feature_set: FeatureSet) -> dict[str, Any]:
    """One query per class (its prompt-ensemble embedding); gallery = all rows of `feature_set`.

    ``scores`` [C, N] cosine, ``relevant`` [C, N] = image of that class. Rows whose label is not a
    query class stay in the gallery as distractors and are counted in ``n_unmatched``.
    """
    prompts = setting.class_prompts()
    names = list(prompts)
    weights = class_embeddings(setting.model, prompts, setting.text_cache)
    check_same_width(feature_set.features, weights)
    labels = np.asarray(feature_set.labels, dtype=object)
    wanted = set(names)
    relevant = np.stack([labels == c for c in names]) if names else np.zeros((0, len(feature_set)), dtype=bool)
    return {
        "queries": names,
        "scores": (weights @ feature_set.features.T).astype(np.float32, copy=False),
        "relevant": relevant.astype(bool),
        "n_relevant": relevant.sum(axis=1),
        "n_unmatched": int(sum(1 for label in feature_set.labels if label not in wanted)),
    }


def text_to_image_by_attribute(
    model: DualEncoder,
    feature_set: FeatureSet,
    prompt_set: PromptSet,
    attributes: Sequence[str] | None = None,
    text_cache: PooledTextCache | None = None,
) -> dict[str, Any]:
    """One query per attribute value ("cell_size=big", its prompt ensemble); gallery = rows with attributes.

    ``scores`` [Q, M], ``relevant`` [Q, M] = image has that value; ``indices`` are the gallery rows
    of `feature_set`, ``missing_attributes`` counts rows without annotations (left out of the gallery), and
    ``query_attributes`` lists (attribute, value) per query. Values no image has still get a query
    (no relevant item; :func:`retrieval_metrics` reports such queries).
    """
    table, names, keep = annotated_attributes(prompt_set, feature_set, attributes)
    cache = _text_cache(model, text_cache)
    gallery = feature_set.features[keep]
    pairs = [(name, value) for name in names for value in table[name]]
    weights = class_embeddings(model, {f"{n}={v}": table[n][v] for n, v in pairs}, cache)
    check_same_width(gallery if len(gallery) else feature_set.features, weights)
    relevant = np.array(
        [[feature_set.attributes[i][name] == value for i in keep] for name, value in pairs], dtype=bool
    ).reshape(len(pairs), len(keep))
    return {
        "queries": [f"{n}={v}" for n, v in pairs],
        "query_attributes": pairs,
        "scores": (weights @ gallery.T).astype(np.float32, copy=False),
        "relevant": relevant,
        "n_relevant": relevant.sum(axis=1),
        "indices": keep,
        "missing_attributes": int(len(feature_set) - len(keep)),
    }


def image_to_text_by_class(setting: ZeroShotSetting, feature_set: FeatureSet) -> dict[str, Any]:
    """Query = image, gallery = every individual prompt of every class; relevant = a prompt of its own class.

    (Unlike zero-shot, which scores prompt ensembles, this ranks single sentences.) Rows whose
    label is not among the classes are excluded and counted in ``missing_labels``; ``indices`` are
    the query rows of `feature_set`; ``gallery`` / ``gallery_labels`` are the prompt texts and their classes.
    """
    prompts = setting.class_prompts()
    texts = [t for texts_of_class in prompts.values() for t in texts_of_class]
    text_labels = np.asarray([c for c, texts_of_class in prompts.items() for _ in texts_of_class], dtype=object)
    text_emb = embed_texts(setting.model, texts, _text_cache(setting.model, setting.text_cache))
    check_same_width(feature_set.features, text_emb)
    keep = np.array([i for i, label in enumerate(feature_set.labels) if label in prompts], dtype=np.int64)
    query_labels = np.asarray([feature_set.labels[i] for i in keep], dtype=object)
    relevant = (query_labels[:, None] == text_labels[None, :]).astype(bool).reshape(len(keep), len(texts))
    return {
        "scores": (feature_set.features[keep] @ text_emb.T).astype(np.float32, copy=False),
        "relevant": relevant,
        "n_relevant": relevant.sum(axis=1),
        "indices": keep,
        "query_labels": query_labels.tolist(),
        "gallery": texts,
        "gallery_labels": text_labels.tolist(),
        "missing_labels": int(len(feature_set) - len(keep)),
    }


def image_to_image(feature_set: FeatureSet, k: int | None = 20, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Each image queries all other images (itself excluded); relevant = same label (`labels` or feature_set.labels).

    Top-k form (see the module docstring): ``scores``/``indices``/``relevant`` [N, k], and
    ``n_relevant`` [N] = other images with the same label. Also works for external features.
    """
    labels_arr = np.asarray(list(feature_set.labels if labels is None else labels), dtype=object)
    if len(labels_arr) != len(feature_set):
        raise ValueError(f"labels has {len(labels_arr)} entries for {len(feature_set)} images")
    out = ranked_topk(
        feature_set.features, feature_set.features, k, lambda rows, cols: labels_arr[cols] == labels_arr[rows][:, None], exclude_self=True
    )
    counts = _label_counts(labels_arr.tolist())
    out["n_relevant"] = np.array([counts[label] - 1 for label in labels_arr], dtype=np.int64)
    out["relevant"] = out["relevant"].astype(bool)
    return out


def paired_image_text(
    model: DualEncoder,
    feature_set: FeatureSet,
    captions: Sequence[str],
    k: int | None = None,
    text_cache: PooledTextCache | None = None,
) -> dict[str, dict[str, Any]]:
    """open_clip-style 1:1 retrieval: image i's only correct caption is `captions[i]` (and vice versa).

    Returns {"image_to_text": ..., "text_to_image": ...}. With ``k=None`` each holds the full
    ``scores`` [N, N] (text_to_image is the transpose view of image_to_text) and ``relevant`` =
    identity, for :func:`paired_recall_at_k`. With ``k`` each holds the top-k form; then hit@k of
    :func:`retrieval_metrics` equals R@k for cut-offs <= k.
    """
    captions = list(captions)
    if len(captions) != len(feature_set):
        raise DataError(f"paired retrieval needs one caption per image: {len(captions)} captions for {len(feature_set)} images")
    text_emb = embed_texts(model, captions, _text_cache(model, text_cache))
    check_same_width(feature_set.features, text_emb)
    n = len(feature_set)
    if k is None:
        scores = np.empty((n, n), dtype=np.float32)
        block = max(1, _BLOCK_ELEMENTS // max(n, 1))
        for start in range(0, n, block):
            scores[start : start + block] = feature_set.features[start : start + block] @ text_emb.T
        eye = np.eye(n, dtype=bool)
        ones = np.ones(n, dtype=np.int64)
        return {
            "image_to_text": {"scores": scores, "relevant": eye, "n_relevant": ones},
            "text_to_image": {"scores": scores.T, "relevant": eye, "n_relevant": ones},
        }
    same = lambda rows, cols: cols == rows[:, None]  # noqa: E731
    out = {
        "image_to_text": ranked_topk(feature_set.features, text_emb, k, same),
        "text_to_image": ranked_topk(text_emb, feature_set.features, k, same),
    }
    for part in out.values():
        part["n_relevant"] = np.ones(n, dtype=np.int64)
    return out
