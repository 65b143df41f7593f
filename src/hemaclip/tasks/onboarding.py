"""Onboarding a new lab: which of its cells a person should label first, and a read-out fitted on those labels.

Why this form. Another lab's stain, camera and framing move every cell in feature space; the model's own class
scores then read 0.4-0.7 macro F1, and no label-free trick measured here (stain or scale augmentation, AdaBN, Tent,
DSU, framing) carried. With a few tens of the lab's own labelled cells the question becomes statistical: learn a
read-out for this lab from very few examples without forgetting what the model knows. The pieces:

* **Features of the lab, standardised on the lab.** Each feature block (the model's embedding, and optionally the
  frozen DINOv2 ViT-S/14 features, :mod:`hemaclip.models.dinov2`) is centred and scaled with the mean and spread of
  the lab's own pool of cells (label-free; computed on the cells the profile was built from, never on cells it is
  later scored on). This removes the lab's global colour/camera offset, which is what a linear read-out trained on
  another lab cannot undo.
* **A prior from the model.** The read-out's scores are ``a * log p_model(c | x) + W_c . z(x) + b_c`` over the classes
  the lab labelled (the model's calibrated probabilities renormalised over them, like ``describe --classes``). The
  penalty on ``W`` and the prior weight ``a`` are chosen by cross-validated log-loss on the labelled cells, folds by
  source cell (near-duplicate crops of one cell stay together), so nothing outside the labelled cells is looked at.
* **Calibration on the lab.** A temperature is fitted on the out-of-fold scores of the labelled cells.
* **Familiarity on the lab.** A cell is flagged when its distance to the nearest labelled cell (standardised
  features) is above what the labelled cells show among themselves (leave-one-group-out, :data:`FLAG_QUANTILE`).
* **Which cells to label.** :func:`select_cells`: by default k-center greedy on the standardised features of the
  more typical half of the pool, seeded by the cell the model is least sure of, each distance weighted by the
  model's uncertainty, at most one crop per source cell while unused source cells remain. Plain k-center, TypiClust
  and random choice are there to compare (``bench.lab_selection``); the learning curve compares with random choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hemaclip.errors import HemaclipError

__all__ = [
    "FLAG_QUANTILE",
    "HeadConfig",
    "LabHead",
    "Standardiser",
    "fit_lab_head",
    "group_folds",
    "select_cells",
    "SELECTION_RULES",
    "check_selection",
    "DEFAULT_SELECTION",
    "typicality",
]

FLAG_QUANTILE = 0.95  # share of labelled cells (leave-one-group-out) that the familiarity bar lets through
EPS = 1e-6


@dataclass(frozen=True)
class HeadConfig:
    """What :func:`fit_lab_head` may choose between (by grouped cross-validation on the labelled cells)."""

    l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    prior_grid: tuple[float, ...] = (0.0, 0.5, 1.0)
    folds: int = 5
    min_for_cv: int = 10  # fewer labelled cells: no cross-validation, the most conservative choice, temperature 1


@dataclass
class Standardiser:
    """Per-feature mean and spread of a lab's pool of cells (label-free)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Standardiser:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise HemaclipError(f"a lab needs at least 2 cells to standardise its features, got {len(x)}")
        return cls(x.mean(axis=0), x.std(axis=0) + EPS)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.scale


def uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of each row of class probabilities, in nats."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


TYPICAL_NEIGHBOURS = 20  # typicality: inverse mean distance to this many nearest cells (Hacohen et al., ICML 2022)
TYPICAL_SHARE = 0.5  # typical-kcenter: k-center runs on this most typical share of the pool (at least 2x the budget)


def typicality(features: np.ndarray, neighbours: int = TYPICAL_NEIGHBOURS) -> np.ndarray:
    """Inverse mean distance of each cell to its nearest `neighbours` cells: high in dense regions, low for outliers."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(features, dtype=np.float64)
    k = min(int(neighbours), len(x) - 1)
    if k < 1:
        return np.ones(len(x))
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (distances[:, 1:].mean(axis=1) + EPS)


def _kcenter(x: np.ndarray, weight: np.ndarray, groups: list[str], budget: int, already: Sequence[int],
             candidates: np.ndarray) -> list[int]:
    """Greedy k-center over `candidates` (a boolean mask), distances weighted by `weight`, one cell per group while
    some candidate group has none chosen; `already` chosen cells count as centres."""
    n = len(x)
    chosen = list(dict.fromkeys(int(i) for i in already))
    used = {groups[i] for i in chosen}
    taken = np.zeros(n, dtype=bool)
    taken[chosen] = True
    distance = np.full(n, np.inf)
    for i in chosen:
        distance = np.minimum(distance, np.linalg.norm(x - x[i], axis=1))
    picked: list[int] = []
    while len(picked) < budget:
        free = candidates & ~taken & np.array([g not in used for g in groups])
        if not free.any():
            free = ~taken & np.array([g not in used for g in groups])
        if not free.any():
            free = ~taken
        score = np.where(free, weight if np.isinf(distance).all() else distance * weight, -np.inf)
        i = int(np.argmax(score))  # nothing chosen yet: the least certain cell
        picked.append(i)
        taken[i] = True
        used.add(groups[i])
        distance = np.minimum(distance, np.linalg.norm(x - x[i], axis=1))
    return picked


def _typiclust(x: np.ndarray, groups: list[str], budget: int, already: Sequence[int], seed: int) -> list[int]:
    """TypiClust (Hacohen et al., ICML 2022): k-means into budget + already clusters; from the largest cluster with
    the fewest chosen cells, its most typical cell (typicality within the cluster); one cell per group first."""
    from sklearn.cluster import KMeans

    chosen = list(dict.fromkeys(int(i) for i in already))
    k = min(budget + len(chosen), len(x))
    cluster = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x).labels_
    typical = np.zeros(len(x))
    for c in range(k):
        members = np.flatnonzero(cluster == c)
        typical[members] = typicality(x[members])
    covered = np.bincount(cluster[chosen], minlength=k) if chosen else np.zeros(k, dtype=int)
    sizes = np.bincount(cluster, minlength=k)
    used = {groups[i] for i in chosen}
    taken = np.zeros(len(x), dtype=bool)
    taken[chosen] = True
    picked: list[int] = []
    while len(picked) < budget:
        free = ~taken & np.array([g not in used for g in groups])
        if not free.any():
            free = ~taken
        for c in sorted(range(k), key=lambda c: (covered[c], -sizes[c])):
            members = np.flatnonzero((cluster == c) & free)
            if len(members):
                i = int(members[np.argmax(typical[members])])
                break
        else:
            i = int(np.flatnonzero(free)[0])
        picked.append(i)
        taken[i] = True
        used.add(groups[i])
        covered[cluster[i]] += 1
    return picked


def _random(groups: list[str], budget: int, already: Sequence[int], seed: int) -> list[int]:
    """One random cell of each of `budget` random groups not chosen yet (then any other cell)."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(groups))]
    done = {int(i) for i in already}
    used = {groups[i] for i in done}
    first: list[int] = []
    for i in order:
        if i not in done and groups[i] not in used:
            first.append(i)
            used.add(groups[i])
    firsts = set(first)
    return (first + [i for i in order if i not in done and i not in firsts])[:budget]


def _uncertainty_weight(uncertainties: np.ndarray) -> np.ndarray:
    u = np.asarray(uncertainties, dtype=np.float64)
    return 1.0 + u / max(float(np.max(u, initial=0.0)), EPS)


def _choose_kcenter(x: np.ndarray, u: np.ndarray, groups: list[str], budget: int, already: Sequence[int], seed: int) -> list[int]:
    return _kcenter(x, _uncertainty_weight(u), groups, budget, already, np.ones(len(x), dtype=bool))


def _choose_typical_kcenter(x: np.ndarray, u: np.ndarray, groups: list[str], budget: int, already: Sequence[int],
                            seed: int) -> list[int]:
    keep = min(len(x), max(2 * budget, int(TYPICAL_SHARE * len(x))))
    candidates = np.zeros(len(x), dtype=bool)
    candidates[np.argsort(-typicality(x), kind="stable")[:keep]] = True
    return _kcenter(x, _uncertainty_weight(u), groups, budget, already, candidates)


@dataclass(frozen=True)
class SelectionRule:
    """A named way of choosing cells to label: what it does, and the function that does it."""

    description: str
    choose: Callable[[np.ndarray, np.ndarray, list[str], int, Sequence[int], int], list[int]]


SELECTION_RULES: dict[str, SelectionRule] = {
    "typical-kcenter": SelectionRule("uncertainty-weighted k-center on the more typical half of the pool (at least twice "
                                     "the budget), seeded by the least certain cell", _choose_typical_kcenter),
    "kcenter": SelectionRule("uncertainty-weighted k-center on the whole pool, seeded by the least certain cell", _choose_kcenter),
    "typiclust": SelectionRule("TypiClust: the most typical cell of each of budget k-means clusters (ignores the model's "
                               "uncertainty)", lambda x, u, g, b, a, s: _typiclust(x, g, b, a, s)),
    "random": SelectionRule("random cells", lambda x, u, g, b, a, s: _random(g, b, a, s)),
}
DEFAULT_SELECTION = "typical-kcenter"


def check_selection(rule: str | None) -> str:
    """`rule`, or the default when None; one line naming the choices when it is not a rule."""
    rule = DEFAULT_SELECTION if rule is None else rule
    if rule not in SELECTION_RULES:
        raise HemaclipError(f"unknown selection rule '{rule}' (choose from {', '.join(SELECTION_RULES)})")
    return rule


def select_cells(features: np.ndarray, uncertainties: np.ndarray, groups: Sequence[str], budget: int,
                 already: Sequence[int] = (), rule: str = DEFAULT_SELECTION, seed: int = 0) -> list[int]:
    """Indices of `budget` cells to label next, by `rule` (:data:`SELECTION_RULES`); every rule takes at most one
    cell per group (source cell) while some group has none chosen. `features` already standardised; k-center
    distances are weighted by ``1 + uncertainty / max uncertainty``; `already`: indices labelled before.

    Why typical-kcenter by default: plain k-center spreads the picks to the pool's edges, and in a large pool those
    are outliers (on the ALL set's 2,252 training images it read below random choice); restricting it to the more
    typical half keeps the spread and the uncertainty (which finds rare classes) without most outliers. Compared on
    the other labs' val parts and the ALL set only (``python -m bench.lab_selection``)."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    groups = [str(g) for g in groups]
    if len(groups) != n or len(uncertainties) != n:
        raise HemaclipError(f"select_cells: {n} features, {len(uncertainties)} uncertainties, {len(groups)} groups")
    rule = check_selection(rule)
    budget = max(0, min(int(budget), n - len(set(already))))
    if budget == 0:
        return []
    return SELECTION_RULES[rule].choose(x, np.asarray(uncertainties, dtype=np.float64), groups, budget, already, seed)


def group_folds(groups: Sequence[str], folds: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of each fold; whole groups go to one fold (near-duplicate crops never straddle folds)."""
    groups = [str(g) for g in groups]
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    k = max(2, min(int(folds), len(unique)))
    fold_of = {unique[j]: f for f, part in enumerate(np.array_split(order, k)) for j in part}
    return [np.array([i for i, g in enumerate(groups) if fold_of[g] == f], dtype=int) for f in range(k)]


def _restricted_log_prior(probabilities: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64)[:, list(columns)], 1e-12, None)
    return np.log(p / p.sum(axis=1, keepdims=True))


def _fit_linear(z: np.ndarray, offset: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the mean cross-entropy of ``offset + z W^T + b`` plus ``l2 |W|^2`` (L-BFGS, exact gradient).

    Solved in its dual form: with an L2 penalty the optimal ``W`` lies in the span of the labelled cells
    (``W = A z``), so the problem has ``C x N`` unknowns instead of ``C x D`` (N labelled cells, a few tens; D the
    feature width, up to 1,024) and the same optimum: fitting takes milliseconds, not seconds. Features are
    divided by sqrt(D) inside (so the penalty grid means the same for any feature width, and L-BFGS is well
    conditioned); the returned ``W`` applies to the features as given."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    n, d = z.shape
    c = offset.shape[1]
    onehot = np.eye(c)[y]
    scaled = z / np.sqrt(d)
    gram = scaled @ scaled.T

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta[: c * n].reshape(c, n), theta[c * n:]
        ak = a @ gram  # [C, N]: W z_i for every labelled cell
        logp = log_softmax(offset + ak.T + b, axis=1)
        g = (np.exp(logp) - onehot) / n  # [N, C]
        value = -float(np.sum(onehot * logp)) / n + l2 * float(np.sum(ak * a))
        grad_a = g.T @ gram + 2 * l2 * ak
        return value, np.concatenate([grad_a.ravel(), g.sum(axis=0)])

    result = minimize(loss, np.zeros(c * n + c), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    a, b = result.x[: c * n].reshape(c, n), result.x[c * n:]
    return (a @ scaled) / np.sqrt(d), b


@dataclass
class LabHead:
    """A lab's read-out over the classes it labelled (see the module docstring)."""

    classes: list[str]
    model_classes: list[str]
    standardiser: Standardiser
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    prior_weight: float
    l2: float
    temperature: float
    reference: np.ndarray  # standardised features of the labelled cells, for the familiarity bar
    flag_bar: float
    n_cells: int
    n_groups: int
    cv: dict[str, Any] = field(default_factory=dict)

    def _columns(self) -> list[int]:
        return [self.model_classes.index(c) for c in self.classes]

    def logits(self, features: np.ndarray, model_probabilities: np.ndarray) -> np.ndarray:
        z = self.standardiser(features)
        prior = _restricted_log_prior(model_probabilities, self._columns())
        return (self.prior_weight * prior + z @ self.weight.T + self.bias) / self.temperature

    def probabilities(self, features: np.ndarray, model_probabilities: np.ndarray) -> np.ndarray:
        from scipy.special import softmax

        return softmax(self.logits(features, model_probabilities), axis=1)

    def predict(self, features: np.ndarray, model_probabilities: np.ndarray) -> list[str]:
        return [self.classes[i] for i in np.argmax(self.logits(features, model_probabilities), axis=1)]

    def unfamiliarity(self, features: np.ndarray) -> np.ndarray:
        """Distance to the nearest labelled cell, in units of the standardised features' dimension."""
        return _nearest_distance(self.standardiser(features), self.reference)

    def flags(self, features: np.ndarray) -> np.ndarray:
        return self.unfamiliarity(features) > self.flag_bar

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"classes": np.array(self.classes), "model_classes": np.array(self.model_classes),
                "mean": self.standardiser.mean, "scale": self.standardiser.scale, "weight": self.weight, "bias": self.bias,
                "prior_weight": np.array(self.prior_weight), "l2": np.array(self.l2), "temperature": np.array(self.temperature),
                "reference": self.reference, "flag_bar": np.array(self.flag_bar), "n_cells": np.array(self.n_cells),
                "n_groups": np.array(self.n_groups)}

    @classmethod
    def from_arrays(cls, data: Any) -> LabHead:
        return cls([str(c) for c in data["classes"]], [str(c) for c in data["model_classes"]],
                   Standardiser(np.asarray(data["mean"]), np.asarray(data["scale"])), np.asarray(data["weight"]),
                   np.asarray(data["bias"]), float(data["prior_weight"]), float(data["l2"]), float(data["temperature"]),
                   np.asarray(data["reference"]), float(data["flag_bar"]), int(data["n_cells"]), int(data["n_groups"]))


def _nearest_distance(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    d2 = (q * q).sum(1)[:, None] - 2 * q @ r.T + (r * r).sum(1)[None, :]
    return np.sqrt(np.clip(d2.min(axis=1), 0, None) / q.shape[1])


def _cross_validated(z: np.ndarray, prior: np.ndarray, y: np.ndarray, folds: list[np.ndarray], l2: float, a: float) -> np.ndarray:
    """Out-of-fold logits (before temperature) for every labelled cell."""
    out = np.zeros_like(prior)
    for held in folds:
        learn = np.setdiff1d(np.arange(len(y)), held)
        w, b = _fit_linear(z[learn], a * prior[learn], y[learn], l2)
        out[held] = a * prior[held] + z[held] @ w.T + b
    return out


def fit_lab_head(features: np.ndarray, model_probabilities: np.ndarray, labels: Sequence[str], groups: Sequence[str],
                 model_classes: Sequence[str], pool_features: np.ndarray, config: HeadConfig = HeadConfig(),
                 seed: int = 0) -> LabHead:
    """Fit a lab's read-out on its labelled cells.

    `features` [N, D] and `model_probabilities` [N, C_model] of the labelled cells, their `labels` and source-cell
    `groups`; `pool_features` [M, D]: every cell of the lab the profile was built from (labelled or not), for the
    label-free standardisation."""
    from scipy.special import log_softmax

    from hemaclip.metrics.calibration import fit_temperature

    model_classes = [str(c) for c in model_classes]
    labels = [str(label) for label in labels]
    unknown = sorted(set(labels) - set(model_classes))
    if unknown:
        raise HemaclipError(f"labels {unknown} are not classes of the model ({', '.join(model_classes)})")
    classes = [c for c in model_classes if c in set(labels)]
    if len(classes) < 2:
        raise HemaclipError(f"a lab read-out needs labelled cells of at least 2 classes, got {classes or 'none'}")
    standardiser = Standardiser.fit(pool_features)
    z = standardiser(features)
    prior = _restricted_log_prior(model_probabilities, [model_classes.index(c) for c in classes])
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)
    n_groups = len(set(map(str, groups)))
    l2, a, temperature, cv = max(config.l2_grid), max(config.prior_grid), 1.0, {}
    if len(y) >= config.min_for_cv and n_groups >= 3:
        folds = group_folds(groups, config.folds, seed)
        scores = {}
        for l2_try in config.l2_grid:
            for a_try in config.prior_grid:
                logits = _cross_validated(z, prior, y, folds, l2_try, a_try)
                scores[(l2_try, a_try)] = float(-np.mean(log_softmax(logits, axis=1)[np.arange(len(y)), y]))
        best = min(scores.values())
        # ties go to the strongest penalty, then to the most prior: the safer read-out
        l2, a = max((k for k, v in scores.items() if v <= best + 1e-9), key=lambda k: (k[0], k[1]))
        temperature = float(fit_temperature(_cross_validated(z, prior, y, folds, l2, a), y))
        cv = {"folds": len(folds), "log_loss": {f"l2={k[0]:g},prior={k[1]:g}": round(v, 4) for k, v in scores.items()}}
    w, b = _fit_linear(z, a * prior, y, l2)
    loo = _leave_one_group_out_distance(z, [str(g) for g in groups])
    bar = float(np.quantile(loo, FLAG_QUANTILE)) if len(loo) else float("inf")
    return LabHead(classes, model_classes, standardiser, w, b, float(a), float(l2), temperature, z, bar, int(len(y)), n_groups, cv)


def _leave_one_group_out_distance(z: np.ndarray, groups: list[str]) -> np.ndarray:
    """For each labelled cell, the distance to the nearest labelled cell of another source cell."""
    if len(set(groups)) < 2:
        return np.array([])
    out = np.empty(len(z))
    for i in range(len(z)):
        others = np.array([g != groups[i] for g in groups])
        out[i] = _nearest_distance(z[i : i + 1], z[others])[0]
    return out
