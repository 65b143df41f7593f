"""Image-text retrieval metrics where any relevant gallery item counts, not only the paired one.

Many blood-cell images share one description (same class, same attributes), so judging retrieval
only by the exact pair (open_clip's R@k) punishes a model for ranking an equally correct caption
first. :func:`retrieval_metrics` takes a boolean relevance matrix instead; :func:`paired_recall_at_k`
keeps the 1:1 definition for comparison with published numbers.

Ranking: gallery items are ordered by descending score; **ties are broken by gallery index**
(lower index first), via a stable argsort on ``-scores``. This is deterministic, and identical to
:func:`paired_recall_at_k`'s rank of the paired item. Cut-offs ``k`` larger than the gallery use
the whole gallery (Precision@k still divides by ``k``, as in trec_eval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["paired_recall_at_k", "relevance_from_labels", "retrieval_metrics"]

_BLOCK_ELEMENTS = 4_000_000


def _scores(scores: ArrayLike) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [queries, gallery] matrix, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (NaN would make the ranking arbitrary)")
    return s


def _ks(ks: Sequence[int]) -> list[int]:
    out = [int(k) for k in ks]
    if not out or any(k < 1 for k in out):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    return out


def relevance_from_labels(query_labels: ArrayLike, gallery_labels: ArrayLike) -> np.ndarray:
    """Boolean ``[Q, G]`` matrix: gallery item ``g`` is relevant to query ``q`` when their labels match.

    Labels are 1-D (one label per item, any comparable dtype, e.g. class index or caption id) or
    2-D ``[items, attributes]``, in which case every attribute must match.
    """
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    if q.ndim != g.ndim or q.ndim not in (1, 2) or (q.ndim == 2 and q.shape[1] != g.shape[1]):
        raise ValueError(f"label arrays must both be 1-D or both [items, attributes], got {q.shape} and {g.shape}")
    if q.ndim == 1:
        return np.asarray(q[:, None] == g[None, :], dtype=bool)
    return np.all(q[:, None, :] == g[None, :, :], axis=2)


def retrieval_metrics(scores: ArrayLike, relevant: Any, ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, Any]:
    """Hit@k, Precision@k, Recall@k and MRR@k for a score matrix and a boolean relevance matrix.

    Per query, with ``r`` the 1-based rank of its first relevant item:

    * ``hit@k``: 1 if any relevant item is in the top k;
    * ``precision@k``: relevant items in the top k, divided by k;
    * ``mrr@k``: 1/r if r <= k, else 0 (``mrr``: 1/r without cut-off);
    * ``recall@k``: relevant items in the top k divided by all relevant items of the query.

    All are means over queries. Queries without any relevant item score 0 on hit, precision and
    MRR, but are excluded from recall (undefined for them); their number is reported as
    ``n_queries_without_relevant`` and recall is NaN if no query has a relevant item. Also returns
    ``n_queries``, ``n_gallery`` and ``ks``.
    """
    s = _scores(scores)
    rel = np.asarray(relevant)
    if rel.shape != s.shape:
        raise ValueError(f"relevant must have the shape of scores {s.shape}, got {rel.shape}")
    rel = rel.astype(bool)
    kk = _ks(ks)
    n_q, n_g = s.shape
    kmax = min(max(kk), n_g)

    hits_topk = np.zeros((n_q, kmax), dtype=bool)  # relevance of the top-kmax ranked items
    first_rank = np.zeros(n_q, dtype=np.int64)  # 1-based rank of the first relevant item, 0 = none
    block = max(1, _BLOCK_ELEMENTS // n_g)
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        order = np.argsort(-s[start:stop], axis=1, kind="stable")
        ranked = np.take_along_axis(rel[start:stop], order, axis=1)
        hits_topk[start:stop] = ranked[:, :kmax]
        any_rel = ranked.any(axis=1)
        first_rank[start:stop] = np.where(any_rel, ranked.argmax(axis=1) + 1, 0)

    n_rel = rel.sum(axis=1)
    has_rel = n_rel > 0
    inv_rank = np.zeros(n_q)
    np.divide(1.0, first_rank, out=inv_rank, where=first_rank > 0)
    cum_hits = np.cumsum(hits_topk, axis=1)

    out: dict[str, Any] = {}
    for k in kk:
        n_hit = cum_hits[:, min(k, n_g) - 1]
        out[f"hit@{k}"] = float(np.mean(n_hit > 0))
        out[f"precision@{k}"] = float(np.mean(n_hit / k))
        out[f"recall@{k}"] = float(np.mean(n_hit[has_rel] / n_rel[has_rel])) if has_rel.any() else float("nan")
        out[f"mrr@{k}"] = float(np.mean(np.where(first_rank <= k, inv_rank, 0.0)))
    out["mrr"] = float(np.mean(inv_rank))
    out["n_queries"] = int(n_q)
    out["n_gallery"] = int(n_g)
    out["n_queries_without_relevant"] = int(np.sum(~has_rel))
    out["ks"] = kk
    return out


def paired_recall_at_k(scores: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """open_clip's 1:1 retrieval recall: query ``i``'s only correct item is gallery item ``i``.

    ``R@k`` is the share of queries whose paired item ranks within the top k (ties broken by
    gallery index, as everywhere in this module). Also returns ``mean_rank`` and ``median_rank``
    (1-based; median floored, as open_clip computes it) of the paired item. Needs ``queries <= gallery``.
    """
    s = _scores(scores)
    kk = _ks(ks)
    n_q, n_g = s.shape
    if n_q > n_g:
        raise ValueError(f"paired recall needs at least as many gallery items as queries, got {s.shape}")
    rank = np.empty(n_q, dtype=np.int64)
    block = max(1, _BLOCK_ELEMENTS // n_g)
    for start in range(0, n_q, block):
        rows = np.arange(start, min(n_q, start + block))
        chunk = s[rows]
        positive = chunk[np.arange(rows.size), rows][:, None]
        earlier = np.arange(n_g)[None, :] < rows[:, None]
        rank[rows] = 1 + np.sum(chunk > positive, axis=1) + np.sum((chunk == positive) & earlier, axis=1)
    out: dict[str, Any] = {f"R@{k}": float(np.mean(rank <= k)) for k in kk}
    out["mean_rank"] = float(np.mean(rank))
    out["median_rank"] = float(np.floor(np.median(rank - 1)) + 1)  # open_clip's convention
    out["n_queries"] = int(n_q)
    return out
