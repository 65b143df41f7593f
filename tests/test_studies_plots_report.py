"""Tests for hemaclip_research.plots (PNG figures) and hemaclip_research.report (metrics.json / md / html)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hemaclip
from hemaclip_research import plots
from hemaclip_research.report import FOOTER, Section, Table, fmt_ci, fmt_value, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]


def _assert_png(path: Path, min_size: tuple[int, int] = (250, 150), max_size: tuple[int, int] = (3000, 3000)) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], (width, height)


def _colour_mask(path: Path, colour: str, tolerance: int = 6) -> np.ndarray:
    """Pixels of `path` within `tolerance` of `colour` (a matplotlib colour) on every channel."""
    from matplotlib.colors import to_rgb

    target = np.array([round(255 * c) for c in to_rgb(colour)])
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.all(np.abs(pixels - target) <= tolerance, axis=-1)


def _bands(mask: np.ndarray) -> list[np.ndarray]:
    """Runs of consecutive image rows holding `mask` pixels: one per horizontal bar."""
    rows = np.flatnonzero(mask.any(axis=1))
    return [run for run in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(run) >= 5]


def _no_temp_files(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []


def _no_open_pyplot_figures() -> None:
    from matplotlib._pylab_helpers import Gcf

    assert Gcf.get_num_fig_managers() == 0


# --------------------------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("normalized", [False, True])
def test_plot_confusion_writes_png(tmp_path: Path, normalized: bool) -> None:
    counts = np.array([[50, 3, 0, 1, 0], [2, 40, 5, 0, 0], [0, 0, 0, 0, 0], [1, 0, 2, 30, 1], [0, 0, 1, 2, 9]])
    out = plots.plot_confusion(counts, LABELS, tmp_path / "sub" / "cm.png", normalized=normalized, title="CM")
    assert out == tmp_path / "sub" / "cm.png"
    # 5 classes: 6.25 x 5.25 inches at 110 dpi.
    _assert_png(out, min_size=(600, 500), max_size=(760, 640))
    _no_temp_files(tmp_path)
    _no_open_pyplot_figures()


def test_plot_confusion_rejects_bad_shape_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plots.plot_confusion(np.ones((3, 4)), ["a", "b", "c"], tmp_path / "cm.png", normalized=False, title=None)
    assert list(tmp_path.iterdir()) == []


def test_plot_per_attribute_f1_with_ci_and_reference(tmp_path: Path) -> None:
    rows = [
        {"name": "cell class", "n_choices": 5, "macro_f1": {"point": 0.95, "low": 0.93, "high": 0.96}},
        {"name": "nucleus shape", "n_choices": 6, "macro_f1": 0.80, "ci_low": 0.75, "ci_high": 0.84},
        {"name": "granularity", "macro_f1": 0.61},  # no interval
    ]
    out = plots.plot_per_attribute_f1(rows, tmp_path / "f1.png", reference=plots.HUMAN_INTER_ANNOTATOR_F1,
                                      highlight=["cell class"])
    _assert_png(out)
    # What the figure shows: the highlighted row in the second colour on top, then two bars in the bar colour, top
    # to bottom in input order, as long as their F1 (all start at x = 0); the reference as a grey dashed line.
    highlighted, plain = _bands(_colour_mask(out, plots._HIGHLIGHT_COLOUR)), _bands(_colour_mask(out, plots._BAR_COLOUR))
    assert len(highlighted) == 1 and len(plain) == 2 and highlighted[0].max() < plain[0].min()
    bar = _colour_mask(out, plots._BAR_COLOUR)
    widths = [bar[band].any(axis=0).sum() for band in plain]
    starts = [np.flatnonzero(bar[band].any(axis=0)).min() for band in plain]
    assert abs(starts[0] - starts[1]) <= 2 and widths[0] / widths[1] == pytest.approx(0.80 / 0.61, rel=0.03)
    cell_width = _colour_mask(out, plots._HIGHLIGHT_COLOUR)[highlighted[0]].any(axis=0).sum()
    assert cell_width / widths[0] == pytest.approx(0.95 / 0.80, rel=0.03)
    grey = _colour_mask(out, "gray", tolerance=20)
    line = np.flatnonzero(grey.sum(axis=0) > 20)  # a vertical dashed line: many grey pixels in one column
    assert len(line) and (line.mean() - starts[0]) / widths[0] == pytest.approx(plots.HUMAN_INTER_ANNOTATOR_F1 / 0.80, rel=0.03)
    out2 = plots.plot_per_attribute_f1(rows[2:], tmp_path / "f1_plain.png")
    _assert_png(out2)
    _no_temp_files(tmp_path)


def test_plot_nshot_curves_log_axis_and_zero_shot(tmp_path: Path) -> None:
    rows = [
        {"kind": kind, "shots": s, "macro_f1": base + 0.03 * np.log2(s), "low": base - 0.05 + 0.03 * np.log2(s),
         "high": base + 0.05 + 0.03 * np.log2(s)}
        for kind, base in (("linear", 0.55), ("prototype", 0.5))
        for s in (1, 2, 4, 8, 16)
    ]
    rows.append({"kind": "prompt", "shots": 0, "macro_f1": 0.4, "low": 0.38, "high": 0.42})
    out = plots.plot_nshot_curves(rows, tmp_path / "nshot.png")
    _assert_png(out)
    # What the figure shows: each probe's curve rises from left to right, linear above prototype; the zero-shot row
    # is a flat dotted line below both, across the plot.
    from scipy.stats import spearmanr

    linear_c, prototype_c, prompt_c = plots._categorical_colours(3)
    centres = {}
    for kind, colour in (("linear", linear_c), ("prototype", prototype_c)):
        mask = _colour_mask(out, colour, tolerance=2)
        xs = np.flatnonzero(mask.any(axis=0))
        top = np.array([np.flatnonzero(mask[:, x]).min() for x in xs])  # the curve's row in each column (legend lies below)
        assert xs.max() - xs.min() > 0.5 * mask.shape[1], kind
        assert spearmanr(xs, top).statistic < -0.95, kind  # image rows grow downwards: the curve rises
        # F1 grows with log2(shots) here, so on a log axis the curve is a straight line.
        assert np.corrcoef(xs, top)[0, 1] ** 2 > 0.98, kind
        centres[kind] = np.median(top)
    assert centres["linear"] < centres["prototype"]
    flat = _colour_mask(out, prompt_c, tolerance=30)
    row = int(np.argmax(flat.sum(axis=1)))
    drawn = np.flatnonzero(flat[row - 2 : row + 3].any(axis=0))
    assert drawn.max() - drawn.min() > 0.7 * flat.shape[1] and row > max(centres.values())  # dotted, across the plot
    _no_temp_files(tmp_path)


def test_plot_retrieval_grid_paths_and_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cell = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    cell_path = tmp_path / "cells" / "cell.png"
    cell_path.parent.mkdir()
    Image.fromarray(cell).save(cell_path)
    results = [
        [(cell_path, True, "neutrophil"), (cell, False, "monocyte"), (cell[..., 0], True, "")],
        [(cell, True, "lymphocyte")],  # fewer than k hits: the rest stays empty
    ]
    out = plots.plot_retrieval_grid(["segmented nucleus, coarse granules", "scant cytoplasm"], results,
                                    tmp_path / "grid.png", k=3)
    _assert_png(out, min_size=(700, 400))
    _no_temp_files(tmp_path / "cells")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "grid.png"]
    with pytest.raises(ValueError):
        plots.plot_retrieval_grid(["a"], [], tmp_path / "bad.png")


def test_embed_2d_shapes_and_methods() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 16))
    pca, method = plots.embed_2d(features, method="pca")
    assert pca.shape == (40, 2) and method == "pca" and np.all(np.isfinite(pca))
    tsne, method = plots.embed_2d(features, method="tsne", seed=1)
    assert tsne.shape == (40, 2) and method == "tsne"
    again, _ = plots.embed_2d(features, method="tsne", seed=1)
    np.testing.assert_allclose(tsne, again)
    tiny, method = plots.embed_2d(features[:3], method="tsne")
    assert tiny.shape == (3, 2) and method == "pca"
    points, method = plots.embed_2d(features[:10])
    assert points.shape == (10, 2) and method in ("umap", "tsne")
    with pytest.raises(ValueError):
        plots.embed_2d(np.zeros(5))


def test_embed_2d_auto_uses_pca_for_many_points_without_umap() -> None:
    if plots._umap_available():
        pytest.skip("umap installed: auto picks UMAP")
    features = np.random.default_rng(0).normal(size=(plots.TSNE_MAX_POINTS + 1, 4))
    points, method = plots.embed_2d(features)
    assert points.shape == (plots.TSNE_MAX_POINTS + 1, 2) and method == "pca"
    with pytest.raises(ImportError):
        plots.embed_2d(features[:20], method="umap")


def test_plot_embedding_map_images_and_text(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(60, 2))
    colours = [LABELS[i % 5] for i in range(60)]
    markers = ["image"] * 55 + ["text"] * 5
    out = plots.plot_embedding_map(points, colours, tmp_path / "map.png", "Image and text", markers=markers,
                                   method="tsne")
    _assert_png(out)
    out2 = plots.plot_embedding_map(points, colours, tmp_path / "map_plain.png", "Images only")
    _assert_png(out2)
    with pytest.raises(ValueError):
        plots.plot_embedding_map(points, colours[:-1], tmp_path / "bad.png", "x")
    _no_temp_files(tmp_path)
    _no_open_pyplot_figures()


def test_plot_selective_accuracy_and_robustness(tmp_path: Path) -> None:
    coverage = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    out = plots.plot_selective_accuracy(coverage, [0.99, 0.98, 0.97, 0.95, 0.93, 0.9], tmp_path / "sel.png")
    _assert_png(out)
    out2 = plots.plot_selective_accuracy(coverage, {"a": [0.9] * 6, "b": [0.95] * 6}, tmp_path / "sel2.png")
    _assert_png(out2)
    matrix = [[0.9, 0.8, np.nan], [0.7, 0.5, 0.2]]
    out3 = plots.plot_robustness_heatmap(matrix, ["blur", "jpeg"], ["1", "2", "3"], tmp_path / "rob.png",
                                         title="Robustness", row_title="perturbation", col_title="severity")
    _assert_png(out3)
    with pytest.raises(ValueError):
        plots.plot_robustness_heatmap(matrix, ["blur"], ["1", "2", "3"], tmp_path / "bad.png", title="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rob.png", "sel.png", "sel2.png"]


# --------------------------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------------------------- #


def test_fmt_ci_and_values() -> None:
    assert fmt_ci(0.9531, 0.9412, 0.9644) == "0.953 [0.941, 0.964]"
    assert fmt_ci(0.9531, None, None) == "0.953"
    assert fmt_ci(95.31, 94.12, 96.44, digits=1) == "95.3 [94.1, 96.4]"
    assert fmt_ci(None) == "–"
    assert fmt_value({"point": 0.5, "low": 0.4, "high": 0.6, "n_resamples": 10}) == "0.500 [0.400, 0.600]"
    assert fmt_value((0.5, 0.4, 0.6)) == "0.500 [0.400, 0.600]"
    assert fmt_value(np.int64(12)) == "12"
    assert fmt_value(np.float32(0.25)) == "0.250"
    assert fmt_value(float("nan")) == "n/a"
    assert fmt_value(None) == "–"
    assert fmt_value(True) == "yes"
    assert fmt_value("PBC") == "PBC"


def test_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError):
        Table(columns=["a", "b"], rows=[[1, 2], [3]])


@pytest.fixture()
def two_figures(tmp_path: Path) -> list[Path]:
    figs = tmp_path / "run" / "figures"
    a = plots.plot_confusion(np.eye(3, dtype=int) * 5, ["a", "b", "c"], figs / "confusion.png", normalized=True,
                             title=None)
    b = plots.plot_selective_accuracy([0.5, 1.0], [1.0, 0.9], figs / "selective.png")
    return [a, b]


def test_write_report_produces_three_self_contained_files(tmp_path: Path, two_figures: list[Path]) -> None:
    out_dir = tmp_path / "run" / "report"  # absent: must be created
    table = Table(
        columns=["Attribute", "Choices", "Macro F1"],
        rows=[["cell class", 5, {"point": 0.9531, "low": 0.9412, "high": 0.9644}], ["nucleus | shape", 6, 0.8]],
        caption="Per-attribute <script>alert('x')</script> results",
    )
    sections = [
        Section(title="Classification", text="Macro F1 on PBC & WBCAtt.\n\nSecond <b>paragraph</b>.",
                tables=[table], figures=[two_figures[0]]),
        Section(title="Confidence", figures=[(two_figures[1], "Selective accuracy <i>curve</i>")]),
    ]
    metrics = {"macro_f1": np.float64(0.9531), "n": np.int64(1200), "recall": float("nan"),
               "per_class": np.array([0.9, 0.8]), "checkpoint": "wbc-clip-b16.pt"}
    paths = write_report(out_dir, "Evaluation <PBC>", sections, metrics, date=dt.date(2026, 11, 23))

    assert set(paths) == {"metrics", "markdown", "html"}
    assert {p.name for p in paths.values()} == {"metrics.json", "report.md", "report.html"}
    assert all(p.parent == out_dir and p.is_file() for p in paths.values())
    _no_temp_files(out_dir)

    # metrics.json: strict JSON, numpy values converted, NaN -> null.
    loaded = json.loads(paths["metrics"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert loaded == {"macro_f1": 0.9531, "n": 1200, "recall": None, "per_class": [0.9, 0.8],
                      "checkpoint": "wbc-clip-b16.pt"}

    md = paths["markdown"].read_text()
    assert "| cell class | 5 | 0.953 [0.941, 0.964] |" in md
    assert "| nucleus \\| shape | 6 | 0.800 |" in md
    assert "(../figures/confusion.png)" in md and "(../figures/selective.png)" in md
    assert "<script>" not in md
    assert FOOTER in md and "How to read this" in md and hemaclip.__version__ in md
    assert "wbc-clip-b16.pt" in md and "2026-11-23" in md

    page = paths["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == 2
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(embedded[0]) == two_figures[0].read_bytes()
    assert "http:" not in page and "https:" not in page
    assert "<script" not in page.lower() and "javascript" not in page.lower()
    assert "&lt;script&gt;" in page and "&lt;b&gt;paragraph&lt;/b&gt;" in page and "&lt;i&gt;curve&lt;/i&gt;" in page
    assert "Evaluation &lt;PBC&gt;" in page and "PBC &amp; WBCAtt" in page
    assert "0.953 [0.941, 0.964]" in page
    assert FOOTER in page and "How to read this" in page and "weighted F1" in page and "95 %" in page
    assert hemaclip.__version__ in page and "wbc-clip-b16.pt" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere


def test_write_report_missing_figure_writes_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    with pytest.raises(FileNotFoundError):
        write_report(out_dir, "t", [Section(title="s", figures=[tmp_path / "missing.png"])], {})
    assert not out_dir.exists()


def test_write_report_overwrites_and_checkpoint_argument(tmp_path: Path) -> None:
    write_report(tmp_path, "first", [Section(title="a", text="one")], {"x": 1})
    paths = write_report(tmp_path, "second", [Section(title="b", text="two")], {"x": 2},
                         checkpoint=Path("/models/best.pt"))
    assert json.loads(paths["metrics"].read_text()) == {"x": 2}
    page = paths["html"].read_text()
    assert "second" in page and "first" not in page and "best.pt" in page and "/models" not in page
    _no_temp_files(tmp_path)
