"""Linear, kNN and MLP probes on frozen features, with one fixed protocol (no tuning on the test split).

Protocol (the same for hemaclip checkpoints and external encoders such as DinoBloom or UNI):

* Features are L2-normalised before every probe.
* Probes are fitted on the **train** split only and evaluated on the **test** split only; the
  validation split is not used (nothing is tuned), and :func:`run_probes` refuses train/test sets
  that share an image path.
* ``logistic``: ``sklearn.linear_model.LogisticRegression`` with fixed ``C = 1.0``,
  ``max_iter = 2000``, ``class_weight = None`` (lbfgs, multinomial), no hyper-parameter search.
* ``knn1`` / ``knn20``: cosine k-nearest neighbours (k clipped to the training-set size), uniform
  majority vote; a tied vote goes to the tied class with the larger summed cosine similarity, then
  to the alphabetically first class. ``proba`` = vote fractions.
* ``mlp``: ``sklearn.neural_network.MLPClassifier(hidden_layer_sizes=(256,), max_iter=300,
  random_state=seed)`` with ``early_stopping=True`` only when every class has >= 50 training
  examples; convergence warnings at the 300-iteration budget are part of the protocol and silenced.
* A training set with a single class predicts that class (proba 1).
* n-shot curves (:func:`nshot_curve`): per class, ``n`` training images drawn with
  ``numpy.random.default_rng(seed)`` (a fixed permutation per class, so smaller shot sets are
  subsets of larger ones); classes with fewer images use all, and the actual counts are recorded.
* Attribute probes: pass ``label_fn=attribute_labels(name)``; rows without attributes (label None)
  are excluded and counted (``excluded_train`` / ``excluded_test``).
* :data:`LVLM_BENCHMARK_PRESET`: 50 test images per class, sampled with seed 0
  (:func:`lvlm_test_subset`), scored with weighted F1; see its docstring for the quoted references.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from hemaclip.errors import DataError
from hemaclip.tasks.features import FeatureSet, l2_normalize

__all__ = [
    "DEFAULT_KINDS",
    "GPT4O_FEW_SHOT_WEIGHTED_F1",
    "GPT4O_ZERO_SHOT_WEIGHTED_F1",
    "LVLMBenchmarkPreset",
    "LVLM_BENCHMARK_PRESET",
    "attribute_labels",
    "benchmark_rows",
    "fit_predict",
    "knn_probe",
    "logistic_probe",
    "lvlm_test_subset",
    "mlp_probe",
    "nshot_curve",
    "run_probes",
]

DEFAULT_KINDS: tuple[str, ...] = ("logistic", "knn1", "knn20", "mlp")
LOGISTIC_C = 1.0
LOGISTIC_MAX_ITER = 2000
MLP_HIDDEN = (256,)
MLP_MAX_ITER = 300
MLP_EARLY_STOPPING_MIN_PER_CLASS = 50
_BLOCK_ELEMENTS = 4_000_000

LabelFn = Callable[[FeatureSet], Sequence[str | None]]


def _default_labels(fs: FeatureSet) -> Sequence[str | None]:
    return fs.labels


def attribute_labels(name: str) -> LabelFn:
    """A `label_fn` giving attribute `name`'s value per row (None for rows without attributes)."""

    def labels(fs: FeatureSet) -> list[str | None]:
        return [a[name] if a is not None else None for a in fs.attributes]

    labels.__name__ = f"attribute_labels_{name}"
    return labels


# --------------------------------------------------------------------------------------------------
# Single probes: arrays in, (predictions, probabilities) out. Probability columns = sorted classes.
# --------------------------------------------------------------------------------------------------


def _prepare(Xtr: ArrayLike, ytr: ArrayLike, Xte: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    Xtr, Xte = l2_normalize(np.asarray(Xtr)), l2_normalize(np.asarray(Xte))
    ytr = np.asarray(list(ytr), dtype=object)
    if Xtr.ndim != 2 or Xte.ndim != 2 or Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"train/test features must be [N, D] with the same D, got {Xtr.shape} and {Xte.shape}")
    if len(ytr) != len(Xtr) or len(Xtr) == 0:
        raise ValueError(f"need a non-empty training set with one label per row, got {len(Xtr)} rows, {len(ytr)} labels")
    classes = np.asarray(sorted(set(ytr.tolist())), dtype=object)
    return Xtr, ytr, Xte, classes


def _constant(classes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, classes[0], dtype=object), np.ones((n, 1))


def _sklearn_predict(clf: Any, Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, classes: np.ndarray):
    index = {c: i for i, c in enumerate(classes)}
    y_idx = np.array([index[c] for c in ytr])
    clf.fit(Xtr, y_idx)
    if len(Xte) == 0:
        return np.zeros(0, dtype=object), np.zeros((0, len(classes)))
    proba = np.zeros((len(Xte), len(classes)))
    proba[:, clf.classes_] = clf.predict_proba(Xte)
    return classes[np.argmax(proba, axis=1)], proba


def logistic_probe(Xtr: ArrayLike, ytr: ArrayLike, Xte: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression, fixed C = 1.0, max_iter 2000, no class weights, on L2-normalised features.

    Returns (predicted labels [n_test], probabilities [n_test, C]) with columns in sorted class order.
    """
    from sklearn.linear_model import LogisticRegression

    Xtr, ytr, Xte, classes = _prepare(Xtr, ytr, Xte)
    if len(classes) == 1:
        return _constant(classes, len(Xte))
    clf = LogisticRegression(C=LOGISTIC_C, max_iter=LOGISTIC_MAX_ITER, class_weight=None)
    return _sklearn_predict(clf, Xtr, ytr, Xte, classes)


def knn_probe(Xtr: ArrayLike, ytr: ArrayLike, Xte: ArrayLike, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Cosine kNN with a uniform vote (ties: larger summed similarity, then first class); proba = vote shares."""
    Xtr, ytr, Xte, classes = _prepare(Xtr, ytr, Xte)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(int(k), len(Xtr))
    index = {c: i for i, c in enumerate(classes)}
    y_idx = np.array([index[c] for c in ytr])
    n_c = len(classes)
    votes = np.zeros((len(Xte), n_c))
    sim_sum = np.zeros((len(Xte), n_c))
    block = max(1, _BLOCK_ELEMENTS // len(Xtr))
    for start in range(0, len(Xte), block):
        stop = min(len(Xte), start + block)
        s = Xte[start:stop] @ Xtr.T
        if kk < len(Xtr):
            nn = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        else:
            nn = np.broadcast_to(np.arange(len(Xtr)), s.shape)
        rows = np.repeat(np.arange(stop - start), kk)
        cols = y_idx[nn].ravel()
        np.add.at(votes[start:stop], (rows, cols), 1.0)
        np.add.at(sim_sum[start:stop], (rows, cols), np.take_along_axis(s, nn, axis=1).ravel())
    # counts are integers; the tie-break term lies in [0, 1), so it only orders tied vote counts.
    key = votes + (sim_sum + kk) / (2 * kk + 1) * (votes > 0)
    return classes[np.argmax(key, axis=1)], votes / kk


def mlp_probe(Xtr: ArrayLike, ytr: ArrayLike, Xte: ArrayLike, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MLPClassifier (256 hidden, max_iter 300, random_state=seed); early stopping iff every class has >= 50."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    Xtr, ytr, Xte, classes = _prepare(Xtr, ytr, Xte)
    if len(classes) == 1:
        return _constant(classes, len(Xte))
    min_count = min(int(np.sum(ytr == c)) for c in classes)
    clf = MLPClassifier(
        hidden_layer_sizes=MLP_HIDDEN,
        max_iter=MLP_MAX_ITER,
        random_state=seed,
        early_stopping=min_count >= MLP_EARLY_STOPPING_MIN_PER_CLASS,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _sklearn_predict(clf, Xtr, ytr, Xte, classes)


def fit_predict(kind: str, Xtr: ArrayLike, ytr: ArrayLike, Xte: ArrayLike, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch by probe name: 'logistic', 'mlp' or 'knn<k>' (e.g. 'knn1', 'knn20')."""
    if kind == "logistic":
        return logistic_probe(Xtr, ytr, Xte)
    if kind == "mlp":
        return mlp_probe(Xtr, ytr, Xte, seed=seed)
    if kind.startswith("knn") and kind[3:].isdigit():
        return knn_probe(Xtr, ytr, Xte, k=int(kind[3:]))
    raise DataError(f"unknown probe '{kind}'; choose from logistic, mlp, knn<k> (e.g. knn1, knn20)")


# --------------------------------------------------------------------------------------------------
# Probes on feature sets
# --------------------------------------------------------------------------------------------------


def _labelled(fs: FeatureSet, label_fn: LabelFn, what: str) -> tuple[np.ndarray, list[str], int]:
    labels = list(label_fn(fs))
    if len(labels) != len(fs):
        raise ValueError(f"label_fn gave {len(labels)} labels for {len(fs)} {what} rows")
    keep = np.array([i for i, y in enumerate(labels) if y is not None], dtype=np.int64)
    return keep, [str(labels[i]) for i in keep], int(len(fs) - len(keep))


def _check_disjoint(train: FeatureSet, test: FeatureSet) -> None:
    shared = set(train.paths) & set(test.paths)
    if shared:
        example = sorted(shared)[0]
        raise DataError(f"train and test feature sets share {len(shared)} image(s) (e.g. {example}); probes never test on training images")


def _train_test_rows(
    train: FeatureSet, test: FeatureSet, label_fn: LabelFn, purpose: str
) -> tuple[np.ndarray, list[str], int, np.ndarray, list[str], int]:
    """Features and labels of the labelled rows of train and test (disjoint), with excluded counts."""
    _check_disjoint(train, test)
    tr_idx, ytr, ex_tr = _labelled(train, label_fn, "train")
    te_idx, yte, ex_te = _labelled(test, label_fn, "test")
    if not ytr:
        raise DataError(f"no labelled training rows for {purpose}")
    return train.features[tr_idx], ytr, ex_tr, test.features[te_idx], yte, ex_te


def run_probes(
    train: FeatureSet,
    test: FeatureSet,
    kinds: Sequence[str] = DEFAULT_KINDS,
    label_fn: LabelFn = _default_labels,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Fit each probe on `train` (the train split) and predict `test` (the test split) only.

    Returns {kind: {"y_true", "y_pred", "classes", "proba", "proba_classes", "n_train", "n_test",
    "excluded_train", "excluded_test", "unseen_test_labels"}}. ``classes`` is the sorted union of
    train and test labels (use it as the metric label order); ``proba`` columns follow
    ``proba_classes`` (sorted training labels). Test labels never seen in training are kept (always
    wrong) and listed in ``unseen_test_labels``.
    """
    Xtr, ytr, ex_tr, Xte, yte, ex_te = _train_test_rows(train, test, label_fn, "the probes")
    train_classes = sorted(set(ytr))
    classes = sorted(set(ytr) | set(yte))
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        pred, proba = fit_predict(kind, Xtr, ytr, Xte, seed=seed)
        out[kind] = {
            "y_true": list(yte),
            "y_pred": [str(p) for p in pred],
            "classes": classes,
            "proba": np.asarray(proba, dtype=np.float64),
            "proba_classes": train_classes,
            "n_train": len(ytr),
            "n_test": len(yte),
            "excluded_train": ex_tr,
            "excluded_test": ex_te,
            "unseen_test_labels": sorted(set(yte) - set(ytr)),
        }
    return out


def sample_per_class(labels: Sequence[str], n: int, seed: int) -> np.ndarray:
    """Indices of up to `n` rows per label: a seeded permutation per (sorted) label, first n taken."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(list(labels), dtype=object)
    chosen = []
    for label in sorted(set(labels_arr.tolist())):
        candidates = np.flatnonzero(labels_arr == label)
        chosen.append(rng.permutation(candidates)[:n])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def nshot_curve(
    train: FeatureSet,
    test: FeatureSet,
    shots: Sequence[int] = (1, 5, 10, 25, 50, 100, 200),
    seeds: Sequence[int] = (0, 1, 2),
    kinds: Sequence[str] = ("logistic", "knn1"),
    label_fn: LabelFn = _default_labels,
) -> list[dict[str, Any]]:
    """Probes trained on n examples per class, for every (shots, seed, kind), evaluated on all of `test`.

    Rows: {"kind", "shots" (requested), "seed", "y_true", "y_pred", "classes", "n_train",
    "per_class" ({label: actual count}, fewer than `shots` where a class has fewer images)}. For
    one (shots, seed) every kind sees the same training subset; `y_true` is shared between rows.
    """
    Xtr_all, ytr, _, Xte, yte, _ = _train_test_rows(train, test, label_fn, "the n-shot curve")
    ytr_arr = np.asarray(ytr, dtype=object)
    classes = sorted(set(ytr) | set(yte))
    rows: list[dict[str, Any]] = []
    for n in shots:
        if int(n) < 1:
            raise ValueError(f"shots must be >= 1, got {n}")
        for seed in seeds:
            pick = sample_per_class(ytr, int(n), int(seed))
            y_sub = ytr_arr[pick]
            per_class = {c: int(np.sum(y_sub == c)) for c in sorted(set(ytr))}
            for kind in kinds:
                pred, _ = fit_predict(kind, Xtr_all[pick], y_sub, Xte, seed=int(seed))
                rows.append(
                    {
                        "kind": kind,
                        "shots": int(n),
                        "seed": int(seed),
                        "y_true": yte,
                        "y_pred": [str(p) for p in pred],
                        "classes": classes,
                        "n_train": int(len(pick)),
                        "per_class": per_class,
                    }
                )
    return rows


# --------------------------------------------------------------------------------------------------
# The cytomorphology LVLM benchmark preset
# --------------------------------------------------------------------------------------------------

GPT4O_ZERO_SHOT_WEIGHTED_F1 = 0.22
GPT4O_FEW_SHOT_WEIGHTED_F1 = 0.36


@dataclass(frozen=True)
class LVLMBenchmarkPreset:
    """The cytomorphology LVLM benchmark protocol: 50 test images per class, weighted F1.

    The reference numbers (GPT-4o: zero-shot weighted F1 0.22, few-shot 0.36) are QUOTED from the
    published benchmark as constants for context; they are not reproduced by hemaclip, and the
    50-per-class subset drawn here with `seed` is not the benchmark's own image list, so a
    comparison is indicative only. Check that the dataset and class set match the benchmark's
    before putting the numbers side by side.
    """

    per_class: int = 50
    seed: int = 0
    split: str = "test"
    metric: str = "weighted_f1"
    reference_weighted_f1: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType(
            {"gpt-4o zero-shot": GPT4O_ZERO_SHOT_WEIGHTED_F1, "gpt-4o few-shot": GPT4O_FEW_SHOT_WEIGHTED_F1}
        )
    )
    reference_note: str = "quoted from the published cytomorphology LVLM benchmark, not reproduced here"


LVLM_BENCHMARK_PRESET = LVLMBenchmarkPreset()


def lvlm_test_subset(feature_set: FeatureSet, per_class: int = 50, seed: int = 0, split: str | None = "test") -> FeatureSet:
    """Up to `per_class` rows per label from split `split` (None = all rows), deterministic for `seed`.

    Candidates are ordered by path before sampling, so the chosen images do not depend on row
    order; the subset keeps the row order of `feature_set`.
    """
    rows = benchmark_rows(feature_set.paths, feature_set.labels, feature_set.splits, per_class=per_class, seed=seed, split=split)
    return feature_set.subset(rows)


def benchmark_rows(
    paths: Sequence[str], labels: Sequence[str], splits: Sequence[str], per_class: int = 50, seed: int = 0,
    split: str | None = "test",
) -> np.ndarray:
    """Sorted row indices of the LVLM benchmark sample: up to `per_class` rows per label of split `split`
    (None = all rows). Candidates are ordered by path before sampling, so the choice does not depend on
    row order; the feature-set preset of `evaluate` and `hemaclip lvlm run` draw the same cells this way."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rows = np.arange(len(paths)) if split is None else np.array([i for i, s in enumerate(splits) if s == split], dtype=np.int64)
    if len(rows) == 0:
        raise DataError(f"no rows in split '{split}' for the LVLM benchmark subset")
    rows = rows[np.argsort(np.asarray([str(paths[i]) for i in rows], dtype=object), kind="stable")]
    pick = sample_per_class([labels[i] for i in rows], per_class, seed)
    return np.sort(rows[pick])
