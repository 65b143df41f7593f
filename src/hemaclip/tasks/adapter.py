"""Corrections that teach: a light adapter fitted on a lab's reviewed cells, on the model's frozen embeddings.

Why this form: a lab reviews tens of cells, not thousands, and hemaclip runs on 2 CPU cores. Fine-tuning
the image tower on 20-100 cells would take minutes and over-fit; a linear correction on the frozen
256-d embedding fits in milliseconds and can be refitted after every few corrections.

The adapter keeps the model as its prior: its class scores are the model's calibrated log-probabilities
plus a linear term, ``log p_model(c | x) + W_c . e(x) + b_c``, with an L2 penalty pulling ``W, b`` to 0.
With no corrections (or a huge penalty) it is exactly the model; classes no reviewer has seen keep the
model's scores. The penalty is chosen by cross-validated log-loss on the reviewed cells themselves, so
nothing else (least of all a test split) is looked at. The folds keep source-cell groups whole (`groups`):
near-duplicate crops of one cell (LISC holds 4-6 per cell) in both the fitting and the scoring part of a fold
would reward memorising the cell, so a random split over crops favours the weakest penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import HemaclipError

if TYPE_CHECKING:
    from hemaclip.tasks.describe import CellDescription
    from hemaclip.tasks.review import ReviewStore

__all__ = ["ADAPTER_FILE", "L2_GRID", "CorrectionAdapter", "adapt_description", "chosen_penalty", "cv_losses", "fit_adapter", "fit_adapter_from_store",
           "group_folds", "store_groups"]

ADAPTER_FILE = "adapter.npz"
# Penalties tried (per cell, on the squared weights); the largest wins ties: the model is the safer prior.
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
MIN_FOR_CV = 10  # fewer reviewed cells than this: no cross-validation, the largest penalty of the grid
FOLDS = 5  # fewer source-cell groups than this: one fold per group (leave one group out)
MIN_GROUPS_FOR_CV = 2


@dataclass
class CorrectionAdapter:
    """``log p_model + features @ weight.T + bias`` over `classes` (the model's class order)."""

    classes: list[str]
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    l2: float
    n_cells: int

    def log_scores(self, features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        base = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
        return base + np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias

    def probabilities(self, features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        from scipy.special import softmax

        return softmax(self.log_scores(features, probabilities), axis=1)

    def predict(self, features: np.ndarray, probabilities: np.ndarray) -> list[str]:
        return [self.classes[i] for i in np.argmax(self.log_scores(features, probabilities), axis=1)]

    def save(self, path: str | Path) -> Path:
        from hemaclip.io import atomic_write

        path = Path(path)
        with atomic_write(path, "wb") as handle:
            np.savez(handle, classes=np.array(self.classes), weight=self.weight, bias=self.bias, l2=self.l2, n_cells=self.n_cells)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CorrectionAdapter:
        try:
            with np.load(Path(path)) as data:
                return cls([str(c) for c in data["classes"]], data["weight"], data["bias"], float(data["l2"]), int(data["n_cells"]))
        except (OSError, KeyError, ValueError) as err:
            raise HemaclipError(f"{path}: not an adapter file ({err})") from None


def _fit(features: np.ndarray, base: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimise mean cross-entropy of ``base + X W^T + b`` plus ``l2 (|W|^2 + |b|^2)`` (L-BFGS, exact gradient)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    n, d = features.shape
    c = base.shape[1]
    onehot = np.eye(c)[y]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: c * d].reshape(c, d), theta[c * d :]
        logp = log_softmax(base + features @ w.T + b, axis=1)
        g = (np.exp(logp) - onehot) / n
        value = -float(np.sum(onehot * logp)) / n + l2 * float(theta @ theta)
        grad = np.concatenate([(g.T @ features).ravel(), g.sum(axis=0)]) + 2 * l2 * theta
        return value, grad

    result = minimize(loss, np.zeros(c * d + c), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return result.x[: c * d].reshape(c, d), result.x[c * d :]


def group_folds(groups: Sequence[Any], seed: int, folds: int = FOLDS) -> list[np.ndarray]:
    """Row indices of each fold: the groups shuffled (seeded) and split into `folds` parts (fewer when there are
    fewer groups), every row of a group in the same fold. With one group per row this is a random split of rows."""
    keys = [str(g) for g in groups]
    first_seen = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # group codes in order of appearance
    codes = np.array([first_seen[key] for key in keys], dtype=np.int64)
    n_groups = len(first_seen)
    order = np.random.default_rng(seed).permutation(n_groups)
    return [np.flatnonzero(np.isin(codes, part)) for part in np.array_split(order, min(folds, n_groups))]


def _cv_loss(features: np.ndarray, base: np.ndarray, y: np.ndarray, l2: float, folds: Sequence[np.ndarray]) -> float:
    """Mean held-out log-loss over `folds` (each fold scored by an adapter fitted on the other rows)."""
    from scipy.special import log_softmax

    losses = []
    everything = np.arange(len(y))
    for fold in folds:
        train = np.setdiff1d(everything, fold)
        w, b = _fit(features[train], base[train], y[train], l2)
        logp = log_softmax(base[fold] + features[fold] @ w.T + b, axis=1)
        losses.extend(-logp[np.arange(len(fold)), y[fold]])
    return float(np.mean(losses))


def cv_losses(features: np.ndarray, probabilities: np.ndarray, labels: Sequence[str], classes: Sequence[str], *,
              groups: Sequence[Any] | None = None, seed: int = 0) -> dict[float, float]:
    """{penalty: cross-validated log-loss} over :data:`L2_GRID`, folds by `groups` (None: each cell its own group);
    empty when there are too few cells or groups to cross-validate (the largest penalty is then used)."""
    x, base, y = _inputs(features, probabilities, labels, classes)
    groups = list(range(len(y))) if groups is None else list(groups)
    if len(groups) != len(y):
        raise HemaclipError(f"{len(groups)} groups for {len(y)} reviewed cells")
    if len(y) < MIN_FOR_CV or len(set(map(str, groups))) < MIN_GROUPS_FOR_CV:
        return {}
    folds = group_folds(groups, seed)
    return {value: _cv_loss(x, base, y, value, folds) for value in L2_GRID}


def chosen_penalty(scores: dict[float, float]) -> float:
    """The penalty with the lowest cross-validated loss, the largest on a tie (the model is the safer prior); the
    largest of the grid when nothing was cross-validated."""
    if not scores:
        return max(L2_GRID)
    best = min(scores.values())
    return max(value for value, score in scores.items() if score <= best + 1e-9)


def _inputs(features: np.ndarray, probabilities: np.ndarray, labels: Sequence[str],
            classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    classes = list(classes)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise HemaclipError(f"reviewed labels {unknown} are not classes of the model ({', '.join(classes)})")
    x = np.asarray(features, dtype=np.float64)
    base = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
    return x, base, np.array([classes.index(label) for label in labels], dtype=np.int64)


def fit_adapter(
    features: np.ndarray, probabilities: np.ndarray, labels: Sequence[str], classes: Sequence[str], *, seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> CorrectionAdapter:
    """Fit the adapter on reviewed cells: their embeddings [N, D], the model's calibrated probabilities
    [N, C] over `classes`, and the reviewed labels (each one of `classes`). `groups` names each cell's source
    cell (near-duplicate crops share one); the penalty's cross-validation keeps groups whole. None: each cell
    is its own group."""
    classes = list(classes)
    x, base, y = _inputs(features, probabilities, labels, classes)
    if len(y) == 0:
        return CorrectionAdapter(classes, np.zeros((len(classes), x.shape[1] if x.ndim == 2 else 0)), np.zeros(len(classes)), float("inf"), 0)
    l2 = chosen_penalty(cv_losses(x, probabilities, labels, classes, groups=groups, seed=seed))
    w, b = _fit(x, base, y, l2)
    return CorrectionAdapter(classes, w, b, float(l2), int(len(y)))


def store_groups(cells: Sequence[dict[str, Any]]) -> list[str]:
    """The source-cell group of each stored cell: its ``group`` where the store records one, else the cell's
    identity in its file's content (file SHA-1 and cell number), so byte-identical copies of one picture are one
    group and every other cell is its own."""
    return [str(c["group"]) if c.get("group") else f"{c['file_sha1']}:{c['cell']}" for c in cells]


def fit_adapter_from_store(store: ReviewStore) -> CorrectionAdapter:
    """The adapter taught by a review's corrections: every cell a reviewer touched, with its current class
    (cross-validation folds by :func:`store_groups`)."""
    meta = store.meta()
    cells = [c for c in store.cells(with_embeddings=True) if c["reviewed"]]
    if not cells:
        raise HemaclipError(f"{store.path}: no reviewed cells to learn from (correct or accept some in `hemaclip serve --review`)")
    if any(c["embedding"] is None or c.get("class_probabilities") is None for c in cells):
        raise HemaclipError(f"{store.path}: cells were stored without embeddings; run `hemaclip review` again into a new folder")
    return fit_adapter(np.stack([c["embedding"] for c in cells]), np.stack([c["class_probabilities"] for c in cells]),
                       [c["current"]["class"] for c in cells], meta["classes"], groups=store_groups(cells))


def adapt_description(adapter: CorrectionAdapter, description: CellDescription, abstain_below: float) -> CellDescription:
    """A :class:`hemaclip.tasks.describe.CellDescription` with its class read through `adapter`
    (attributes, sentence and unfamiliarity are the model's own)."""
    import dataclasses

    if description.error is not None or description.embedding is None or description.class_probabilities is None:
        return description
    probs = adapter.probabilities(description.embedding[None, :], description.class_probabilities[None, :])[0]
    order = np.argsort(-probs, kind="stable")
    top = float(probs[order[0]])
    return dataclasses.replace(
        description, label=adapter.classes[order[0]], probability=round(top, 4),
        runner_up=adapter.classes[order[1]] if len(order) > 1 else None,
        runner_up_probability=round(float(probs[order[1]]), 4) if len(order) > 1 else None,
        abstain=top < abstain_below)  # class_probabilities stay the model's: what a later adapter learns from
