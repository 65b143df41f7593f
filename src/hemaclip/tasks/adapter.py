"""Corrections that teach: a light adapter fitted on a lab's reviewed cells, on the model's frozen embeddings.

Why this form: a lab reviews tens of cells, not thousands, and hemaclip runs on 2 CPU cores. Fine-tuning
the image tower on 20-100 cells would take minutes and over-fit; a linear correction on the frozen
256-d embedding fits in milliseconds and can be refitted after every few corrections.

The adapter keeps the model as its prior: its class scores are the model's calibrated log-probabilities
plus a linear term, ``log p_model(c | x) + W_c . e(x) + b_c``, with an L2 penalty pulling ``W, b`` to 0.
With no corrections (or a huge penalty) it is exactly the model; classes no reviewer has seen keep the
model's scores. The penalty is chosen by cross-validated log-loss on the reviewed cells themselves, so
nothing else (least of all a test split) is looked at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.errors import HemaclipError

__all__ = ["ADAPTER_FILE", "L2_GRID", "CorrectionAdapter", "adapt_description", "fit_adapter", "fit_adapter_from_store"]

ADAPTER_FILE = "adapter.npz"
# Penalties tried (per cell, on the squared weights); the largest wins ties: the model is the safer prior.
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
MIN_FOR_CV = 10  # fewer reviewed cells than this: no cross-validation, the largest penalty of the grid
FOLDS = 5


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


def _cv_loss(features: np.ndarray, base: np.ndarray, y: np.ndarray, l2: float, seed: int) -> float:
    from scipy.special import log_softmax

    order = np.random.default_rng(seed).permutation(len(y))
    losses = []
    for fold in np.array_split(order, FOLDS):
        train = np.setdiff1d(order, fold)
        w, b = _fit(features[train], base[train], y[train], l2)
        logp = log_softmax(base[fold] + features[fold] @ w.T + b, axis=1)
        losses.extend(-logp[np.arange(len(fold)), y[fold]])
    return float(np.mean(losses))


def fit_adapter(
    features: np.ndarray, probabilities: np.ndarray, labels: Sequence[str], classes: Sequence[str], *, seed: int = 0
) -> CorrectionAdapter:
    """Fit the adapter on reviewed cells: their embeddings [N, D], the model's calibrated probabilities
    [N, C] over `classes`, and the reviewed labels (each one of `classes`)."""
    classes = list(classes)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise HemaclipError(f"reviewed labels {unknown} are not classes of the model ({', '.join(classes)})")
    x = np.asarray(features, dtype=np.float64)
    base = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)
    if len(y) == 0:
        return CorrectionAdapter(classes, np.zeros((len(classes), x.shape[1] if x.ndim == 2 else 0)), np.zeros(len(classes)), float("inf"), 0)
    l2 = max(L2_GRID)
    if len(y) >= MIN_FOR_CV:
        scores = {value: _cv_loss(x, base, y, value, seed) for value in L2_GRID}
        best = min(scores.values())
        l2 = max(value for value, score in scores.items() if score <= best + 1e-9)
    w, b = _fit(x, base, y, l2)
    return CorrectionAdapter(classes, w, b, float(l2), int(len(y)))


def fit_adapter_from_store(store: Any) -> CorrectionAdapter:
    """The adapter taught by a review's corrections: every cell a reviewer touched, with its current class."""
    meta = store.meta()
    cells = [c for c in store.cells(with_embeddings=True) if c["reviewed"]]
    if not cells:
        raise HemaclipError(f"{store.path}: no reviewed cells to learn from (correct or accept some in `hemaclip serve --review`)")
    if any(c["embedding"] is None or c.get("class_probabilities") is None for c in cells):
        raise HemaclipError(f"{store.path}: cells were stored without embeddings; run `hemaclip review` again into a new folder")
    return fit_adapter(np.stack([c["embedding"] for c in cells]), np.stack([c["class_probabilities"] for c in cells]),
                       [c["current"]["class"] for c in cells], meta["classes"])


def adapt_description(adapter: CorrectionAdapter, description: Any, abstain_below: float) -> Any:
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
