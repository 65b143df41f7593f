"""How unfamiliar an image is to the model: a per-cell score and flag, and a folder-level shift warning.

Why: a classifier's probability says how sure it is *among its classes on its own lab's images*; on a
cell of a class it never saw, or on another lab's stain and camera, it stays confident and wrong. The
score here is the distance of the image's embedding from the training distribution. Two are built in:

* ``knn`` (the default): one minus the cosine similarity of the embedding to its `KNN_K`-th nearest
  training embedding (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors");
* ``mahalanobis``: the smallest class-conditional Mahalanobis distance (Lee et al. 2018) to the class
  means of the training split, one Ledoit-Wolf covariance shared by all classes.

The default and `KNN_K` were chosen on PBC **val** with a model trained without basophils (the held-out
class's val cells against the seen classes' val cells: AUROC 0.922 for kNN k = 3 against 0.891 for
Mahalanobis); test only confirms (reports/trust lists every candidate on both).

* **Per cell.** `unfamiliar = score > threshold`, the threshold set on the in-lab validation split only
  (`FLAG_QUANTILE` of its scores), so that about 4-5 % of in-lab cells are flagged.
* **Per folder.** A folder of cells from another lab is shifted as a whole even when few cells cross the
  per-cell threshold. The folder's median score is compared with the in-lab validation scores: the shift
  is the median's excess over the in-lab median in units of the in-lab inter-quartile range, and a
  folder is called shifted when that effect is large (`SHIFT_EFFECT`) *and* unlikely by chance for a
  folder of its size (`SHIFT_P`, a one-sided rank test), or when clearly more cells than expected are
  flagged (binomial test). The warning says what to do: readings may be unreliable; check a few cells by
  eye and correct them in `hemaclip review` (the measured route: reviewed cells adapt the reading to the
  lab); `--adapt bn` exists but lowered accuracy on every other lab measured (reports/other-labs).
* **Per cell inside a shifted folder.** There the in-lab threshold is too lenient: on two of the three other
  labs, a third of the cells under it were still read wrong (reports/trust). So a cell of a folder the warning fires on passes
  only if its score lies within the range of the `SHIFTED_FOLDER_QUANTILE` most typical in-lab validation cells
  (:attr:`Familiarity.shifted_threshold`, :meth:`Familiarity.folder_flags`); each description also carries
  that stricter flag (`unfamiliar_in_shifted_folder`) and the sentence under it (`sentence_in_shifted_folder`: the
  plain warning where only the stricter bar flags the cell), since a streamed record is written before its folder's
  verdict is known; `hemaclip review`, which has the whole folder, re-flags and re-words its stored cells.

Everything is fitted by `hemaclip calibrate` (training split for the reference embeddings, means and
covariance, validation split for the threshold and reference scores, never test) and stored beside the
checkpoint in ``<checkpoint>.familiarity.npz``. Files of format 1 (Mahalanobis only) still load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import CheckpointError, DataError, HemaclipError

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = [
    "FAMILIARITY_SUFFIX",
    "FLAG_QUANTILE",
    "DEFAULT_METHOD",
    "KNN_K",
    "METHODS",
    "Familiarity",
    "check_method",
    "FolderShift",
    "familiarity_path",
    "fit_familiarity",
    "fit_familiarity_for",
    "load_familiarity",
]

FAMILIARITY_SUFFIX = ".familiarity.npz"
FAMILIARITY_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: Mahalanobis only, no reference embeddings
METHODS = ("knn", "mahalanobis")
DEFAULT_METHOD = "knn"
# The k-th nearest training embedding: chosen on PBC val with basophil held out (k in 1..100 tried; 1-10
# all within 0.005 AUROC of the best, k = 3).
KNN_K = 3
# Share of in-lab validation cells left below the per-cell threshold: 0.96 flags about 4 % of them, so
# that the false-flag rate on unseen in-lab cells stays at or under 5 % (checked on test in the report).
FLAG_QUANTILE = 0.96
# Folder-level shift: the median score's excess over the in-lab median, in in-lab inter-quartile ranges,
# must exceed SHIFT_EFFECT with a one-sided rank-test p below SHIFT_P; or the flagged share must exceed
# the expected one with a binomial p below SHIFT_P and be at least FLAG_SHARE_WARN.
SHIFT_EFFECT = 0.5
SHIFT_P = 1e-3
FLAG_SHARE_WARN = 0.15
MIN_FOLDER = 10  # fewer cells than this: no folder-level verdict (too little evidence either way)
# Inside a folder the shift warning fires on, a cell passes only at or under this quantile of the in-lab validation
# scores. Chosen by bench/shifted_folder_bar.py on the other labs' *val* parts: the largest of 0.96/0.9/0.75/0.5/0.25
# whose unflagged val cells are read right >= 90 % of the time (the same when any one lab is left out of the choice).
SHIFTED_FOLDER_QUANTILE = 0.75


def check_method(method: str) -> str:
    """`method` if it is a built-in unfamiliarity score, else one clear error naming the choices."""
    if method not in METHODS:
        raise HemaclipError(f"unknown unfamiliarity score '{method}'; choose from {', '.join(METHODS)}")
    return method


@dataclass
class FolderShift:
    """The folder-level verdict: how far the folder's cells lie from the training lab as a whole."""

    cells: int
    median_score: float
    effect: float  # (folder median - in-lab median) / in-lab IQR
    p_value: float  # one-sided rank test, folder scores > in-lab validation scores
    flagged_share: float
    expected_share: float
    flagged_p: float  # binomial, more flagged than expected
    shifted: bool
    message: str
    bar: float = float("inf")  # the per-cell threshold that applies to this folder's cells
    cleared: int = 0  # cells at or under `bar` (read without a flag)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Familiarity:
    """What the score compares with (training embeddings for kNN; class means and shared precision for
    Mahalanobis), the flag threshold and the in-lab validation scores (the reference for folder shift)."""

    checkpoint_sha1: str
    classes: list[str]
    means: np.ndarray  # [C, D]
    precision: np.ndarray  # [D, D]
    threshold: float
    reference_scores: np.ndarray  # in-lab validation scores, sorted
    fitted_on: str
    method: str = "mahalanobis"
    k: int = KNN_K
    train_features: np.ndarray | None = None  # [N, D] L2-normalised training embeddings (kNN)

    def score(self, features: np.ndarray, method: str | None = None) -> np.ndarray:
        """Unfamiliarity of each embedding [N, D] by this file's method (or `method`, to compare)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.means.shape[1]:
            raise HemaclipError(f"familiarity expects embeddings [N, {self.means.shape[1]}], got {features.shape}")
        if not len(features):
            return np.empty(0)
        return _SCORERS[method or self.method](self, features)

    def _mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """The smallest squared Mahalanobis distance to a class mean."""
        distances = []
        for mean in self.means:
            centred = features - mean
            distances.append(np.einsum("ij,jk,ik->i", centred, self.precision, centred))
        return np.min(np.stack(distances, axis=1), axis=1)

    def _knn(self, features: np.ndarray) -> np.ndarray:
        """One minus the cosine similarity to the k-th nearest training embedding."""
        if self.train_features is None:
            raise HemaclipError("this familiarity file holds no training embeddings; the kNN score needs them")
        unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        reference = np.asarray(self.train_features, dtype=np.float32)
        k = min(self.k, len(reference))
        out = np.empty(len(unit))
        for start in range(0, len(unit), 512):  # bounded memory: 512 x N similarities at a time
            sims = unit[start:start + 512].astype(np.float32) @ reference.T
            out[start:start + 512] = 1.0 - np.partition(sims, -k, axis=1)[:, -k]
        return out

    @property
    def label(self) -> str:
        """The score in words, for reports and messages: "knn (k = 3)" or "mahalanobis"."""
        return f"{self.method} (k = {self.k})" if self.method == "knn" else self.method

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """Per-cell flags with the in-lab threshold (a cell on its own, or a folder without a shift)."""
        return np.asarray(scores) > self.threshold

    def cell_flags(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's flag under the in-lab bar and under the stricter bar of a shifted folder: a streamed
        description carries both, since it is written before its folder's verdict is known."""
        return self.flags(scores), np.asarray(scores) > self.shifted_threshold

    @property
    def shifted_threshold(self) -> float:
        """The stricter per-cell bar inside a shifted folder (never above the in-lab threshold)."""
        return min(self.threshold, float(np.quantile(self.reference_scores, SHIFTED_FOLDER_QUANTILE)))

    def bar_for(self, verdict: FolderShift | None) -> float:
        """The per-cell threshold a folder's verdict sets: the stricter :attr:`shifted_threshold` when the folder is
        shifted, the in-lab threshold otherwise (or with too few cells for a verdict)."""
        return verdict.bar if verdict is not None else self.threshold

    def folder_flags(self, scores: Sequence[float]) -> tuple[FolderShift | None, np.ndarray]:
        """The folder's verdict and each cell's flag under the bar it sets (:meth:`bar_for`)."""
        verdict = self.folder_shift(scores)
        return verdict, np.asarray(scores, dtype=np.float64) > self.bar_for(verdict)

    @property
    def expected_share(self) -> float:
        """Share of in-lab validation cells above the threshold."""
        return float(np.mean(self.reference_scores > self.threshold))

    def folder_shift(self, scores: Sequence[float]) -> FolderShift | None:
        """The folder-level verdict for the scores of a folder's cells (None below `MIN_FOLDER` cells)."""
        from scipy.stats import binomtest, mannwhitneyu

        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) < MIN_FOLDER:
            return None
        reference = self.reference_scores
        q1, median, q3 = np.percentile(reference, [25, 50, 75])
        effect = float((np.median(scores) - median) / max(q3 - q1, 1e-9))
        p_value = float(mannwhitneyu(scores, reference, alternative="greater").pvalue)
        flagged = int(np.sum(scores > self.threshold))
        expected = max(self.expected_share, 1e-6)
        flagged_p = float(binomtest(flagged, len(scores), expected, alternative="greater").pvalue)
        share = flagged / len(scores)
        shifted = (effect > SHIFT_EFFECT and p_value < SHIFT_P) or (share >= FLAG_SHARE_WARN and flagged_p < SHIFT_P)
        bar = self.shifted_threshold if shifted else self.threshold
        cleared = int(np.sum(scores <= bar))
        if shifted:
            message = (
                f"warning: these {len(scores)} images lie far from the training data as a whole (median unfamiliarity "
                f"{effect:+.1f} in-lab IQRs, {share:.0%} of cells flagged vs {expected:.0%} in the training lab): readings "
                f"may be unreliable; only {cleared} of {len(scores)} cells lie within the range of the "
                f"{SHIFTED_FOLDER_QUANTILE:.0%} most typical training-lab cells (unfamiliarity <= {bar:.4g}; in --json records, read unfamiliar_in_shifted_folder and sentence_in_shifted_folder), treat the rest as unverified; "
                "check a few cells by eye and correct them with `hemaclip review` (its reviewed cells adapt the reading "
                "to this lab); --adapt bn is available but lowered accuracy on the other labs measured"
            )
        else:
            message = f"{len(scores)} images: no folder-level shift detected ({share:.0%} of cells flagged, {expected:.0%} expected)"
        return FolderShift(len(scores), float(np.median(scores)), effect, p_value, share, self.expected_share, flagged_p, shifted,
                           message, float(bar), cleared)

    def save(self, path: str | Path) -> Path:
        from hemaclip.io import atomic_write

        path = Path(path)
        with atomic_write(path, "wb") as handle:
            np.savez_compressed(
                handle,
                format=np.array(FAMILIARITY_FORMAT),
                checkpoint_sha1=np.array(self.checkpoint_sha1),
                classes=np.array(self.classes),
                means=self.means.astype(np.float32),
                precision=self.precision.astype(np.float32),
                threshold=np.array(self.threshold),
                reference_scores=self.reference_scores.astype(np.float32),
                fitted_on=np.array(self.fitted_on),
                method=np.array(self.method),
                k=np.array(self.k),
                train_features=(np.zeros((0, self.means.shape[1]), np.float16) if self.train_features is None
                                else np.asarray(self.train_features, dtype=np.float16)),
            )
        return path


_SCORERS = {"mahalanobis": Familiarity._mahalanobis, "knn": Familiarity._knn}


def familiarity_path(checkpoint: str | Path) -> Path:
    """Where the familiarity of `checkpoint` lives: ``<name>.familiarity.npz`` beside it."""
    from hemaclip.models.checkpoint import sidecar_path

    return sidecar_path(checkpoint, FAMILIARITY_SUFFIX)


def load_familiarity(checkpoint: str | Path, checkpoint_sha1: str) -> tuple[Familiarity | None, str]:
    """(familiarity, "") if a sidecar fitted for these exact weights exists, else (None, the reason)."""
    path = familiarity_path(checkpoint)
    if not path.is_file():
        return None, f"no {path.name} beside the checkpoint (run `hemaclip calibrate`)"
    try:
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format"])
            if version not in READABLE_FORMATS:
                raise ValueError(f"format {version}, this version reads {', '.join(map(str, READABLE_FORMATS))}")
            method = str(data["method"]) if version >= 2 else "mahalanobis"
            if method not in METHODS:
                raise ValueError(f"unknown unfamiliarity score {method!r}")
            train = np.asarray(data["train_features"], dtype=np.float32) if version >= 2 else np.zeros((0, 0))
            familiarity = Familiarity(
                checkpoint_sha1=str(data["checkpoint_sha1"]),
                classes=[str(c) for c in data["classes"]],
                means=np.asarray(data["means"], dtype=np.float64),
                precision=np.asarray(data["precision"], dtype=np.float64),
                threshold=float(data["threshold"]),
                reference_scores=np.sort(np.asarray(data["reference_scores"], dtype=np.float64)),
                fitted_on=str(data["fitted_on"]),
                method=method,
                k=int(data["k"]) if version >= 2 else KNN_K,
                train_features=train if len(train) else None,
            )
            if method == "knn" and familiarity.train_features is None:
                raise ValueError("kNN method without training embeddings")
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a valid familiarity file ({err})") from err
    if familiarity.checkpoint_sha1 != checkpoint_sha1:
        return None, f"{path.name} was fitted for other weights (SHA-1 {familiarity.checkpoint_sha1[:10]})"
    return familiarity, ""


def fit_familiarity(
    train_features: np.ndarray,
    train_labels: Sequence[str],
    val_features: np.ndarray,
    checkpoint_sha1: str,
    fitted_on: str,
    quantile: float = FLAG_QUANTILE,
    method: str = DEFAULT_METHOD,
    k: int = KNN_K,
) -> Familiarity:
    """Class means and a shared Ledoit-Wolf covariance (and, for kNN, the L2-normalised embeddings) of the
    training cells; the flag threshold as the `quantile` of the validation scores (in-lab cells the model
    did not train on)."""
    from sklearn.covariance import LedoitWolf

    check_method(method)
    if int(k) < 1:
        raise HemaclipError(f"k must be >= 1, got {k}")
    train_features = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(list(train_labels))
    classes = sorted(set(labels.tolist()))
    if len(val_features) < MIN_FOLDER:
        raise HemaclipError(f"need at least {MIN_FOLDER} validation images to set the familiarity threshold, got {len(val_features)}")
    means = np.stack([train_features[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([train_features[labels == c] - means[i] for i, c in enumerate(classes)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(centred).covariance_)
    stored = None
    if method == "knn":  # stored as float16 in the file; scored from the same rounding here so fit and use agree
        unit = train_features / np.maximum(np.linalg.norm(train_features, axis=1, keepdims=True), 1e-12)
        stored = unit.astype(np.float16).astype(np.float32)
    familiarity = Familiarity(checkpoint_sha1, classes, means, precision, 0.0, np.empty(0), fitted_on,
                              method=method, k=int(k), train_features=stored)
    reference = np.sort(familiarity.score(val_features))
    familiarity.reference_scores = reference
    familiarity.threshold = float(np.quantile(reference, quantile))
    return familiarity


def fit_familiarity_for(
    model: DualEncoder, checkpoint: str | Path, data_root: str | Path | None = None, *, batch_size: int = 128, progress: bool = False,
    write: bool = True, method: str = DEFAULT_METHOD,
) -> Familiarity:
    """Fit the unfamiliarity score of a checkpoint (:func:`fit_familiarity` on its embeddings): class means and
    covariance on the embeddings of the PBC train split (the images the shipped recipe trains on), the
    flag threshold and the reference scores on the PBC val split; never test. Writes
    ``<checkpoint>.familiarity.npz`` when `write`."""
    from hemaclip.cache import file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.features import extract_features

    checkpoint = Path(checkpoint)
    sha1 = file_sha1(checkpoint)
    pbc = load_dataset("pbc", data_root=data_root)
    known = set(model.class_names)
    train = [r for r in pbc.split("train") if r.label in known]
    val = [r for r in pbc.split("val") if r.label in known]
    if not train:
        raise DataError("no PBC train image has a class the model knows; cannot fit the unfamiliarity score")
    ft = extract_features(model, train, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    fv = extract_features(model, val, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    familiarity = fit_familiarity(
        ft.features, [r.label for r in train], fv.features, sha1,
        fitted_on=f"reference embeddings, means and covariance: pbc train ({len(train)} images); threshold: pbc val ({len(val)} images)",
        method=method,
    )
    if write:
        familiarity.save(familiarity_path(checkpoint))
    return familiarity
