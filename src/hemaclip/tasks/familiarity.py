"""How unfamiliar an image is to the model: a per-cell score and flag, and a folder-level shift warning.

Why: a classifier's probability says how sure it is *among its classes on its own lab's images*; on a
cell of a class it never saw, or on another lab's stain and camera, it stays confident and wrong. The
score here is the distance of the image's embedding from the training distribution: the smallest
class-conditional Mahalanobis distance (Lee et al. 2018) to the class means of the training split, with
one covariance shared by all classes (Ledoit-Wolf shrinkage, so 256 dimensions are well conditioned).
The other candidates (nearest-neighbour cosine distance to the training cells, energy, maximum
softmax probability) were measured against it in the trust report; Mahalanobis separated best.

* **Per cell.** `unfamiliar = score > threshold`, the threshold set on the in-lab validation split only
  (`FLAG_QUANTILE` of its scores), so that about 4-5 % of in-lab cells are flagged.
* **Per folder.** A folder of cells from another lab is shifted as a whole even when few cells cross the
  per-cell threshold. The folder's median score is compared with the in-lab validation scores: the shift
  is the median's excess over the in-lab median in units of the in-lab inter-quartile range, and a
  folder is called shifted when that effect is large (`SHIFT_EFFECT`) *and* unlikely by chance for a
  folder of its size (`SHIFT_P`, a one-sided rank test), or when clearly more cells than expected are
  flagged (binomial test). The warning says what to do: readings may be unreliable, try `--adapt bn`,
  look at a few cells.

Everything is fitted by `hemaclip calibrate` (training split for the means and covariance, validation
split for the threshold and reference scores, never test) and stored beside the checkpoint in
``<checkpoint>.familiarity.npz``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.errors import CheckpointError, HemaclipError

__all__ = [
    "FAMILIARITY_SUFFIX",
    "FLAG_QUANTILE",
    "Familiarity",
    "FolderShift",
    "familiarity_path",
    "fit_familiarity",
    "load_familiarity",
]

FAMILIARITY_SUFFIX = ".familiarity.npz"
FAMILIARITY_FORMAT = 1
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

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Familiarity:
    """Class means and shared precision of the training embeddings, the flag threshold and the in-lab
    validation scores (the reference for folder-level shift)."""

    checkpoint_sha1: str
    classes: list[str]
    means: np.ndarray  # [C, D]
    precision: np.ndarray  # [D, D]
    threshold: float
    reference_scores: np.ndarray  # in-lab validation scores, sorted
    fitted_on: str

    def score(self, features: np.ndarray) -> np.ndarray:
        """Unfamiliarity of each embedding [N, D]: the smallest squared Mahalanobis distance to a class mean."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.means.shape[1]:
            raise HemaclipError(f"familiarity expects embeddings [N, {self.means.shape[1]}], got {features.shape}")
        distances = []
        for mean in self.means:
            centred = features - mean
            distances.append(np.einsum("ij,jk,ik->i", centred, self.precision, centred))
        return np.min(np.stack(distances, axis=1), axis=1) if len(features) else np.empty(0)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

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
        if shifted:
            message = (
                f"warning: these {len(scores)} images lie far from the training data as a whole (median unfamiliarity "
                f"{effect:+.1f} in-lab IQRs, {share:.0%} of cells flagged vs {expected:.0%} in the training lab): readings "
                "may be unreliable; try --adapt bn (re-estimates the model's normalisation on these images) and check "
                "a few cells by eye"
            )
        else:
            message = f"{len(scores)} images: no folder-level shift detected ({share:.0%} of cells flagged, {expected:.0%} expected)"
        return FolderShift(len(scores), float(np.median(scores)), effect, p_value, share, self.expected_share, flagged_p, shifted, message)

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
            )
        return path


def familiarity_path(checkpoint: str | Path) -> Path:
    """Where the familiarity of `checkpoint` lives: ``<name>.familiarity.npz`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + FAMILIARITY_SUFFIX)


def load_familiarity(checkpoint: str | Path, checkpoint_sha1: str) -> tuple[Familiarity | None, str]:
    """(familiarity, "") if a sidecar fitted for these exact weights exists, else (None, the reason)."""
    path = familiarity_path(checkpoint)
    if not path.is_file():
        return None, f"no {path.name} beside the checkpoint (run `hemaclip calibrate`)"
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != FAMILIARITY_FORMAT:
                raise ValueError(f"format {int(data['format'])}, expected {FAMILIARITY_FORMAT}")
            familiarity = Familiarity(
                checkpoint_sha1=str(data["checkpoint_sha1"]),
                classes=[str(c) for c in data["classes"]],
                means=np.asarray(data["means"], dtype=np.float64),
                precision=np.asarray(data["precision"], dtype=np.float64),
                threshold=float(data["threshold"]),
                reference_scores=np.sort(np.asarray(data["reference_scores"], dtype=np.float64)),
                fitted_on=str(data["fitted_on"]),
            )
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
) -> Familiarity:
    """Class means and a shared Ledoit-Wolf covariance from training embeddings; the flag threshold as the
    `quantile` of the validation scores (in-lab cells the model did not train on)."""
    from sklearn.covariance import LedoitWolf

    train_features = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(list(train_labels))
    classes = sorted(set(labels.tolist()))
    if len(val_features) < MIN_FOLDER:
        raise HemaclipError(f"need at least {MIN_FOLDER} validation images to set the familiarity threshold, got {len(val_features)}")
    means = np.stack([train_features[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([train_features[labels == c] - means[i] for i, c in enumerate(classes)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(centred).covariance_)
    familiarity = Familiarity(checkpoint_sha1, classes, means, precision, 0.0, np.empty(0), fitted_on)
    reference = np.sort(familiarity.score(val_features))
    familiarity.reference_scores = reference
    familiarity.threshold = float(np.quantile(reference, quantile))
    return familiarity
