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


def _near_duplicates(cells: int, crops: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """`crops` near-identical crops of each of `cells` source cells; a cell's class is random (its embedding says
    nothing about the class of any other cell), and the model is uninformed (uniform probabilities)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(cells, 8))
    labels = rng.integers(0, len(CLASSES), size=cells)
    x = np.repeat(centres, crops, axis=0) + 0.01 * rng.normal(size=(cells * crops, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    probs = np.full((cells * crops, len(CLASSES)), 1.0 / len(CLASSES))
    return x, probs, [CLASSES[i] for i in np.repeat(labels, crops)], [f"cell{i}" for i in np.repeat(np.arange(cells), crops)]


def test_cross_validation_keeps_source_cells_whole() -> None:
    """Random folds over crops leak: a held-out crop's near-duplicates are in the fitting part, so memorising wins
    (weakest penalty, low loss). Folds by source cell see that nothing carries to a new cell (largest penalty)."""
    from hemaclip.tasks.adapter import L2_GRID, chosen_penalty, cv_losses, group_folds

    x, p, y, groups = _near_duplicates(cells=12, crops=4, seed=4)
    for fold in group_folds(groups, seed=0):
        inside = {groups[i] for i in fold}
        assert all(groups[i] not in inside for i in np.setdiff1d(np.arange(len(groups)), fold))
    by_crop = cv_losses(x, p, y, CLASSES)
    by_cell = cv_losses(x, p, y, CLASSES, groups=groups)
    assert min(by_crop, key=by_crop.get) == min(L2_GRID)  # the leak rewards memorising
    assert by_cell[min(L2_GRID)] > np.log(len(CLASSES)) > by_crop[min(L2_GRID)]  # worse than the uninformed model
    assert chosen_penalty(by_crop) == min(L2_GRID) and chosen_penalty(by_cell) == max(L2_GRID)
    assert fit_adapter(x, p, y, CLASSES, groups=groups).l2 == max(L2_GRID)  # fit_adapter folds by the groups given


def test_groups_must_match_cells_and_one_group_is_not_cross_validated() -> None:
    from hemaclip.tasks.adapter import L2_GRID, cv_losses

    x, p, y, groups = _near_duplicates(cells=3, crops=5, seed=5)
    with pytest.raises(HemaclipError, match="groups for"):
        fit_adapter(x, p, y, CLASSES, groups=groups[:-1])
    assert cv_losses(x, p, y, CLASSES, groups=["one"] * len(y)) == {}
    assert fit_adapter(x, p, y, CLASSES, groups=["one"] * len(y)).l2 == max(L2_GRID)


def test_store_groups_join_copies_of_one_picture_and_keep_other_cells_apart() -> None:
    from hemaclip.tasks.adapter import store_groups

    cells = [{"file_sha1": "aa", "cell": 0}, {"file_sha1": "aa", "cell": 0}, {"file_sha1": "aa", "cell": 1},
             {"file_sha1": "bb", "cell": 0}, {"file_sha1": "cc", "cell": 0, "group": "lisc-17"}]
    assert store_groups(cells) == ["aa:0", "aa:0", "aa:1", "bb:0", "lisc-17"]
