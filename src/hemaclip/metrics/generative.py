"""Distances between feature sets for judging generated images: FID, KID, k-NN precision/recall, nearest neighbours.

Plain numpy on any feature space (hemaclip measures in its 256-d image embedding, see
:mod:`hemaclip_research.synthesis`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["fid", "kid", "nearest_real", "precision_recall"]

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3


def _as_features(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or len(arr) < 2:
        raise ValueError(f"{name} must be [N >= 2, D] features, got shape {arr.shape}")
    return arr


def fid(a: ArrayLike, b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to feature sets `a` [N, D] and `b` [M, D].

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}). The last trace is computed as
    the sum of square roots of the eigenvalues of the symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2}
    (same eigenvalues as S_a S_b), which is fast and stable when the covariances are singular
    (fewer samples than dimensions, as in small per-class sets).
    """
    a, b = _as_features(a, "a"), _as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ s_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = len(kxx), len(kyy)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean()
    )


def kid(a: ArrayLike, b: ArrayLike, n_subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict[str, float]:
    """Kernel Inception Distance in this feature space: mean and std of the unbiased MMD^2 over subsets.

    Kernel k(x, y) = (x.y / D + 1)^3. Each subset draws min(subset_size, N, M) items of each set
    without replacement (seeded). Unlike FID it is unbiased, so small per-class sets are not
    penalised; it can be slightly negative. The three kernel matrices are computed once and
    indexed per subset.
    """
    a, b = _as_features(a, "a"), _as_features(b, "b")
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(a), len(b))
    d = a.shape[1]
    kaa = (a @ a.T / d + 1.0) ** 3
    kbb = (b @ b.T / d + 1.0) ** 3
    kab = (a @ b.T / d + 1.0) ** 3
    values = []
    for _ in range(n_subsets):
        i = rng.choice(len(a), size, replace=False)
        j = rng.choice(len(b), size, replace=False)
        values.append(_mmd2_unbiased(kaa[np.ix_(i, i)], kbb[np.ix_(j, j)], kab[np.ix_(i, j)]))
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subset_size": int(size), "subsets": int(n_subsets)}


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] (float64, clipped at 0 before the root)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = PR_K) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii (default k = 3)."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k must be in [1, {min(len(real), len(fake)) - 1}], got {k}")
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = _pairwise(fake, real)  # [fake, real]
    precision = float(np.mean((d <= r_real[None, :]).any(axis=1)))
    recall = float(np.mean((d.T <= r_fake[None, :]).any(axis=1)))
    return {"precision": precision, "recall": recall, "k": int(k)}


def nearest_real(queries: ArrayLike, reference: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: (Euclidean distance to, index of) its nearest reference row."""
    q, r = _as_features(queries, "queries"), _as_features(reference, "reference")
    dist = np.empty(len(q))
    index = np.empty(len(q), dtype=np.int64)
    block = max(1, 2_000_000 // max(len(r), 1))
    for start in range(0, len(q), block):
        d = _pairwise(q[start : start + block], r)
        index[start : start + block] = d.argmin(1)
        dist[start : start + block] = d[np.arange(len(d)), index[start : start + block]]
    return dist, index
