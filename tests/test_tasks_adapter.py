"""The review adapter: the model's scores plus a penalised linear correction learned from reviewed cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hemaclip.errors import HemaclipError
from hemaclip.tasks.adapter import CorrectionAdapter, fit_adapter

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def _lab(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Another lab: embeddings cluster by class, but the model calls every monocyte a lymphocyte."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(len(CLASSES), 16))
    y = rng.integers(0, len(CLASSES), size=n)
    x = centres[y] + 0.3 * rng.normal(size=(n, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    model_idx = np.where(y == CLASSES.index("monocyte"), CLASSES.index("lymphocyte"), y)
    probs = np.full((n, len(CLASSES)), 0.05)
    probs[np.arange(n), model_idx] = 0.8
    return x, probs, [CLASSES[i] for i in y]


def test_no_reviewed_cells_is_the_model() -> None:
    x, p, _ = _lab(30, 0)
    adapter = fit_adapter(x[:0], p[:0], [], CLASSES)
    assert adapter.n_cells == 0
    assert adapter.predict(x, p) == [CLASSES[i] for i in np.argmax(p, axis=1)]
    np.testing.assert_allclose(adapter.probabilities(x, p), p / p.sum(axis=1, keepdims=True), atol=1e-9)


def test_reviewed_cells_fix_a_systematic_confusion_and_keep_the_rest(tmp_path: Path) -> None:
    x, p, y = _lab(60, 1)
    xt, pt, yt = _lab(400, 2)
    model = [CLASSES[i] for i in np.argmax(pt, axis=1)]
    adapter = fit_adapter(x, p, y, CLASSES)
    pred = adapter.predict(xt, pt)
    acc_model = np.mean([a == b for a, b in zip(model, yt)])
    acc_adapted = np.mean([a == b for a, b in zip(pred, yt)])
    assert acc_model < 0.85 and acc_adapted > 0.95
    assert adapter.l2 in (1e-3, 1e-2, 1e-1, 1.0) and adapter.n_cells == 60
    again = CorrectionAdapter.load(adapter.save(tmp_path / "adapter.npz"))
    assert again.predict(xt, pt) == pred and again.classes == CLASSES


def test_unknown_reviewed_label_is_refused() -> None:
    x, p, _ = _lab(12, 3)
    with pytest.raises(HemaclipError, match="not classes of the model"):
        fit_adapter(x, p, ["dragon"] * 12, CLASSES)
