"""Result figures as PNG files: confusion matrices, per-attribute F1, n-shot curves, retrieval grids,
embedding maps, selective accuracy and robustness heatmaps.

Every function draws on a standalone :class:`matplotlib.figure.Figure` attached to an Agg canvas:
no pyplot, no global backend switch, no display needed, and nothing left registered after return
(figures are cleared once saved). PNGs are rendered into memory and then written atomically with
:func:`hemaclip.io.atomic_write`, so a crash never leaves a half-written image; each function
returns the written :class:`~pathlib.Path`.

Inputs are plain Python / numpy values, the same shapes :mod:`hemaclip.metrics.classification`,
:mod:`hemaclip.metrics.statistics` and :mod:`hemaclip.metrics.calibration` return.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from hemaclip.metrics.classification import row_normalize
from hemaclip.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "HUMAN_INTER_ANNOTATOR_F1",
    "TSNE_MAX_POINTS",
    "embed_2d",
    "plot_confusion",
    "plot_embedding_map",
    "plot_nshot_curves",
    "plot_per_attribute_f1",
    "plot_retrieval_grid",
    "plot_robustness_heatmap",
    "plot_selective_accuracy",
]

DPI = 110
# Above this many points embed_2d("auto") uses PCA instead of t-SNE when UMAP is not installed.
TSNE_MAX_POINTS = 5_000
# Macro F1 agreement between human annotators on WBCAtt attributes: a useful ceiling to draw.
HUMAN_INTER_ANNOTATOR_F1 = 0.947

_CORRECT_COLOUR = "#2ca02c"
_WRONG_COLOUR = "#d62728"
_BAR_COLOUR = "#4C72B0"
_HIGHLIGHT_COLOUR = "#DD8452"
_MARKERS = ("o", "^", "s", "D", "P", "X", "v", "*")


# --------------------------------------------------------------------------------------------- #
# shared helpers
# --------------------------------------------------------------------------------------------- #


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(2.0, width), max(1.5, height)), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, tight: bool = True) -> Path:
    """Render `fig` to PNG in memory, write it atomically and release the figure's artists."""
    path = Path(path)
    try:
        if tight:
            fig.tight_layout()
        buffer = io.BytesIO()
        # No "Software" tEXt chunk: identical inputs give identical bytes across matplotlib builds.
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        fig.clear()
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def _categorical_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


def _unique_in_order(values: Iterable[Any]) -> list[Any]:
    seen: dict[Any, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def _score_point_ci(row: Mapping[str, Any], key: str = "macro_f1") -> tuple[float, float | None, float | None]:
    """(point, low, high) from a row holding ``key`` as a number or a bootstrap_ci dict.

    An interval may also come as ``ci`` ((low, high) or {"low", "high"}), ``ci_low``/``ci_high``
    or ``low``/``high`` (the n-shot row layout); missing bounds are None.
    """
    score = row.get(key)
    if score is None and key == "macro_f1":
        score = row.get("mean")
    if score is None:
        raise ValueError(f"row needs {key!r}, got keys {sorted(row)}")
    low = high = None
    if isinstance(score, Mapping):
        point = float(score.get("point", score.get("mean", math.nan)))
        low, high = score.get("low"), score.get("high")
    else:
        point = float(score)
        ci = row.get("ci")
        if ci is not None:
            low, high = (ci.get("low"), ci.get("high")) if isinstance(ci, Mapping) else ci
        elif "ci_low" in row or "ci_high" in row:
            low, high = row.get("ci_low"), row.get("ci_high")
        else:
            low, high = row.get("low"), row.get("high")
    return point, (None if low is None else float(low)), (None if high is None else float(high))


def _heatmap(
    ax: Axes,
    values: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cmap: str,
    vmin: float | None,
    vmax: float | None,
    fmt: str,
    colorbar_label: str,
    annotate: bool,
) -> None:
    """Annotated heatmap on `ax`; NaN cells are grey and marked with a dash."""
    from matplotlib import colormaps

    colour_map = colormaps[cmap].with_extremes(bad="#d9d9d9")
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, cmap=colour_map, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    cbar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(colorbar_label)
    ax.set_xticks(range(len(col_labels)))
    ax.set_yticks(range(len(row_labels)))
    ax.set_xticklabels([str(c) for c in col_labels], rotation=45 if len(col_labels) > 3 else 0,
                       ha="right" if len(col_labels) > 3 else "center", rotation_mode="anchor")
    ax.set_yticklabels([str(r) for r in row_labels])
    ax.set_xticks(np.arange(-0.5, len(col_labels), 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(row_labels), 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if not annotate:
        return
    n_cells = max(values.shape)
    fontsize = 9 if n_cells <= 8 else 7 if n_cells <= 14 else 5.5
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "–", ha="center", va="center", fontsize=fontsize, color="black")
                continue
            red, green, blue, _ = colour_map(image.norm(v))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")


# --------------------------------------------------------------------------------------------- #
# confusion matrix
# --------------------------------------------------------------------------------------------- #


def plot_confusion(
    matrix_counts: ArrayLike,
    labels: Sequence[str],
    path: str | Path,
    normalized: bool = False,
    title: str | None = None,
) -> Path:
    """Confusion matrix heatmap (rows = true class, columns = predicted), annotated cell by cell.

    `matrix_counts` is the ``[C, C]`` count matrix (``classification_report_dict(...)
    ["confusion_matrix"]``). With ``normalized=True`` each row is divided by its support (rows
    without items stay zero) and the colour scale is fixed to [0, 1], so figures are comparable;
    the y tick labels then show each class's support. Annotations are skipped above 30 classes.
    """
    counts = np.asarray(matrix_counts, dtype=np.float64)
    names = [str(x) for x in labels]
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(names):
        raise ValueError(f"need a square [C, C] matrix with C = len(labels) = {len(names)}, got {counts.shape}")
    if counts.size == 0 or not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise ValueError("confusion counts must be finite and non-negative")
    n = len(names)
    size = min(16.0, max(4.5, 0.55 * n + 2.5))
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot(1, 1, 1)
    if normalized:
        values = row_normalize(counts)
        support = counts.sum(axis=1).astype(int)
        row_names = [f"{name} (n={s})" for name, s in zip(names, support)]
        _heatmap(ax, values, row_names, names, cmap="Blues", vmin=0.0, vmax=1.0, fmt=".2f",
                 colorbar_label="fraction of true class", annotate=n <= 30)
    else:
        integral = np.all(counts == np.round(counts))
        _heatmap(ax, counts, names, names, cmap="Blues", vmin=0.0, vmax=max(1.0, float(counts.max())),
                 fmt=".0f" if integral else ".1f", colorbar_label="items", annotate=n <= 30)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    default = "Confusion matrix (row-normalised)" if normalized else "Confusion matrix (counts)"
    ax.set_title(title or default)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- #
# per-attribute F1
# --------------------------------------------------------------------------------------------- #


def plot_per_attribute_f1(
    rows: Iterable[Mapping[str, Any]],
    path: str | Path,
    reference: float | None = None,
    reference_label: str = "human inter-annotator",
    title: str | None = None,
    highlight: Sequence[str] = (),
) -> Path:
    """Horizontal bars of macro F1 per attribute (top to bottom in input order) with CI whiskers.

    Rows are :func:`hemaclip.metrics.classification.attribute_table` rows or anything with ``name`` and
    ``macro_f1`` (a number or a ``bootstrap_ci`` dict; an interval may also be ``ci`` or
    ``ci_low``/``ci_high``); ``n_choices`` when present is shown next to the name. Rows named in
    `highlight` (e.g. the cell-class row) get a second colour. `reference` draws a dashed vertical
    line, e.g. :data:`HUMAN_INTER_ANNOTATOR_F1`.
    """
    from matplotlib.lines import Line2D

    parsed = []
    for row in rows:
        if "name" not in row:
            raise ValueError(f"attribute row needs 'name', got keys {sorted(row)}")
        point, low, high = _score_point_ci(row)
        label = str(row["name"])
        if row.get("n_choices") is not None:
            label += f" ({int(row['n_choices'])})"
        parsed.append((str(row["name"]), label, point, low, high))
    if not parsed:
        raise ValueError("no rows to plot")
    n = len(parsed)
    fig = _new_figure(7.0, 0.42 * n + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    points = np.array([p[2] for p in parsed])
    highlighted = {str(h) for h in highlight}
    colours = [_HIGHLIGHT_COLOUR if p[0] in highlighted else _BAR_COLOUR for p in parsed]
    ax.barh(y, points, color=colours, height=0.65, edgecolor="black", linewidth=0.4)
    with_ci = [i for i, p in enumerate(parsed) if p[3] is not None and p[4] is not None]
    if with_ci:
        lows = np.array([max(0.0, parsed[i][2] - parsed[i][3]) for i in with_ci])
        highs = np.array([max(0.0, parsed[i][4] - parsed[i][2]) for i in with_ci])
        ax.errorbar(points[with_ci], y[with_ci], xerr=[lows, highs], fmt="none", ecolor="black",
                    elinewidth=1.0, capsize=3)
    for i, p in enumerate(parsed):
        right = p[4] if p[4] is not None else p[2]
        ax.text(min(right + 0.01, 1.0), i, f"{p[2]:.3f}", va="center", ha="left", fontsize=8)
    handles = []
    if reference is not None:
        ax.axvline(float(reference), color="gray", linestyle="--", linewidth=1.2)
        handles.append(Line2D([], [], color="gray", linestyle="--", label=f"{reference_label} ({float(reference):.3f})"))
    if with_ci:
        handles.append(Line2D([], [], color="black", marker="|", linestyle="-", label="95 % bootstrap CI"))
    if handles:
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=8,
                  frameon=False, borderaxespad=0.2)
    ax.set_yticks(y)
    ax.set_yticklabels([p[1] for p in parsed])
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.08)
    ax.set_xlabel("macro F1")
    ax.set_title(title or "Macro F1 per attribute (choices in brackets)", pad=22 if handles else 6)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- #
# n-shot curves
# --------------------------------------------------------------------------------------------- #


def plot_nshot_curves(
    rows: Iterable[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    ylabel: str = "macro F1",
) -> Path:
    """Macro F1 against shots per class, one line per probe ``kind``, shaded between ``low``/``high``.

    Rows: ``kind``, ``shots`` and ``macro_f1`` (the mean over repeats, a number or a dict with
    ``point``/``low``/``high``; ``mean`` is accepted too) plus optional ``low``/``high``. The x
    axis is logarithmic with a tick at every shot count used. Rows with ``shots <= 0`` (zero-shot
    baselines) cannot sit on a log axis and are drawn as dotted horizontal lines instead.
    """
    curves: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
    for row in rows:
        if "kind" not in row or "shots" not in row:
            raise ValueError(f"n-shot row needs 'kind' and 'shots', got keys {sorted(row)}")
        point, low, high = _score_point_ci(row)
        curves.setdefault(str(row["kind"]), []).append((float(row["shots"]), point, low, high))
    if not curves:
        raise ValueError("no rows to plot")
    colours = dict(zip(curves, _categorical_colours(len(curves))))
    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    all_shots: set[float] = set()
    for kind, points in curves.items():
        points.sort(key=lambda p: p[0])
        positive = [p for p in points if p[0] > 0]
        for zero in (p for p in points if p[0] <= 0):
            ax.axhline(zero[1], color=colours[kind], linestyle=":", linewidth=1.4, label=f"{kind} (zero-shot)")
            if zero[2] is not None and zero[3] is not None:
                ax.axhspan(zero[2], zero[3], color=colours[kind], alpha=0.08)
        if not positive:
            continue
        x = np.array([p[0] for p in positive])
        y = np.array([p[1] for p in positive])
        all_shots.update(x.tolist())
        ax.plot(x, y, marker="o", markersize=4, color=colours[kind], label=kind)
        banded = [p for p in positive if p[2] is not None and p[3] is not None]
        if len(banded) >= 2:
            ax.fill_between([p[0] for p in banded], [p[2] for p in banded], [p[3] for p in banded],
                            color=colours[kind], alpha=0.2, linewidth=0)
        elif len(banded) == 1:
            p = banded[0]
            ax.errorbar([p[0]], [p[1]], yerr=[[p[1] - p[2]], [p[3] - p[1]]], color=colours[kind], capsize=3)
    if all_shots:
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.set_xscale("log")
        ticks = sorted(all_shots)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        if len(ticks) == 1:
            ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_xlabel("training examples per class (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Few-shot performance (shaded: interval over repeats)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- #
# retrieval grid
# --------------------------------------------------------------------------------------------- #


def _as_image_array(image: Any) -> np.ndarray:
    """An image path, PIL image or array (HW, HWC or CHW; uint8 or float in [0, 1]) as an RGB(A) array."""
    if isinstance(image, (str, Path)):
        from hemaclip.data.preprocess import decode_image

        return np.asarray(decode_image(image))
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    if hasattr(image, "mode") and hasattr(image, "size") and not isinstance(image, np.ndarray):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be HW, HWC or CHW with 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        arr = np.clip(arr, 0.0, 1.0)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def plot_retrieval_grid(
    queries: Sequence[str],
    results: Sequence[Sequence[tuple[Any, bool, str]]],
    path: str | Path,
    k: int = 3,
    title: str | None = None,
    wrap: int = 28,
) -> Path:
    """Text-to-image retrieval examples: one row per query, its text on the left, then the top-`k` hits.

    ``results[i]`` lists ``(image, is_correct, caption)`` in rank order for ``queries[i]``; an image
    is a file path (decoded with :func:`hemaclip.data.preprocess.decode_image`), a PIL image or an
    array (uint8 HWC, HW grey, CHW, or float in [0, 1]). Each hit is framed green when correct and
    red when wrong, with its rank and caption underneath; missing hits (fewer than `k`) stay empty.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(queries) != len(results):
        raise ValueError(f"{len(queries)} queries but {len(results)} result lists")
    if not queries:
        raise ValueError("no queries to plot")
    n = len(queries)
    text_width, cell = 2.6, 1.75
    fig = _new_figure(text_width + k * cell, n * (cell + 0.45) + 0.5)
    grid = fig.add_gridspec(n, k + 1, width_ratios=[text_width / cell] + [1.0] * k, wspace=0.08, hspace=0.3)
    for i, (query, hits) in enumerate(zip(queries, results)):
        text_ax = fig.add_subplot(grid[i, 0])
        text_ax.axis("off")
        text_ax.text(0.0, 0.5, textwrap.fill(str(query), width=wrap), ha="left", va="center", fontsize=8.5,
                     transform=text_ax.transAxes)
        for j in range(k):
            ax = fig.add_subplot(grid[i, j + 1])
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(hits):
                for spine in ax.spines.values():
                    spine.set_visible(False)
                ax.text(0.5, 0.5, "—", ha="center", va="center", color="gray", transform=ax.transAxes)
                continue
            image, correct, caption = hits[j]
            arr = _as_image_array(image)
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="antialiased")
            colour = _CORRECT_COLOUR if bool(correct) else _WRONG_COLOUR
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            label = f"#{j + 1} " + ("✓" if bool(correct) else "✗")
            if caption:
                label += " " + textwrap.shorten(str(caption), width=60, placeholder="…")
            ax.set_xlabel(textwrap.fill(label, width=24), fontsize=6.5, color=colour, labelpad=3)
    fig.suptitle(title or f"Top-{k} retrieved cells per query (green frame: correct, red: wrong)", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=1.0 - 0.45 / fig.get_figheight(), bottom=0.04)
    return _save(fig, path, tight=False)


# --------------------------------------------------------------------------------------------- #
# embedding maps
# --------------------------------------------------------------------------------------------- #


def _umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except Exception:  # ImportError, or a broken numba install failing at import time
        return False
    return True


def embed_2d(
    features: ArrayLike, method: str = "auto", seed: int = 0, *, l2_normalize: bool = True
) -> tuple[np.ndarray, str]:
    """Project ``[N, D]`` features to 2-D for a map; returns ``(points [N, 2], method_used)``.

    ``method``: ``"umap"`` (needs the optional ``umap-learn`` package), ``"tsne"`` (scikit-learn,
    ``init="pca"``, perplexity capped for small N, features first reduced to 50 PCA dimensions),
    ``"pca"`` or ``"auto"``: UMAP when importable, else PCA above :data:`TSNE_MAX_POINTS` points
    and t-SNE otherwise. Fewer than 5 points always use PCA (t-SNE/UMAP are meaningless there).
    Rows are L2-normalised first by default, matching the cosine geometry of CLIP embeddings, so
    image and text features from one model can be projected together (stack them, then split
    the points). ``method_used`` is ``"umap"``, ``"tsne"`` or ``"pca"``. Deterministic per `seed`.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features must be finite")
    method = str(method).lower().replace("-", "")
    if method not in ("auto", "umap", "tsne", "pca"):
        raise ValueError(f"method must be 'auto', 'umap', 'tsne' or 'pca', got {method!r}")
    if l2_normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    n = x.shape[0]
    if method == "umap" and not _umap_available():
        raise ImportError("method='umap' needs the optional package umap-learn (pip install umap-learn)")
    if method == "auto":
        method = "umap" if _umap_available() else ("pca" if n > TSNE_MAX_POINTS else "tsne")
    if n < 5:
        method = "pca"
    if method == "pca":
        return _pca_2d(x, seed), "pca"
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64), "umap"
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed, learning_rate="auto")
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), "tsne"


def _pca_2d(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    n, d = x.shape
    k = min(2, n, d)
    out = np.zeros((n, 2))
    if n >= 2 and np.ptp(x, axis=0).max() > 0:
        out[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(x)
    return out


_AXIS_NAMES = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PC"}


def plot_embedding_map(
    points_2d: ArrayLike,
    colour_labels: Sequence[Any],
    path: str | Path,
    title: str | None = None,
    markers: Sequence[Any] | None = None,
    method: str | None = None,
) -> Path:
    """Scatter a 2-D embedding, coloured by category (class, attribute value) with a legend.

    `markers` optionally names a group per point (e.g. ``"image"`` / ``"text"``) drawn with its own
    marker shape; groups after the first (typically text prompts, few and important) are drawn
    larger, on top and edged in black. `method` (from :func:`embed_2d`) only names the axes.
    """
    from matplotlib.lines import Line2D

    pts = np.asarray(points_2d, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise ValueError(f"points_2d must be a non-empty [N, 2] array, got shape {pts.shape}")
    n = pts.shape[0]
    colours_of = [str(c) for c in colour_labels]
    if len(colours_of) != n:
        raise ValueError(f"{len(colours_of)} colour labels for {n} points")
    groups = ["" for _ in range(n)] if markers is None else [str(m) for m in markers]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} markers for {n} points")
    categories = _unique_in_order(colours_of)
    palette = dict(zip(categories, _categorical_colours(len(categories))))
    group_names = _unique_in_order(groups)
    shape = {g: _MARKERS[i % len(_MARKERS)] for i, g in enumerate(group_names)}
    base_size = float(np.clip(3000.0 / n, 3.0, 40.0))

    fig = _new_figure(8.2, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    colour_idx = np.array([categories.index(c) for c in colours_of])
    group_arr = np.array(groups, dtype=object)
    for gi, g in enumerate(group_names):
        mask = group_arr == g
        primary = gi == 0
        ax.scatter(pts[mask, 0], pts[mask, 1], c=[palette[categories[i]] for i in colour_idx[mask]],
                   marker=shape[g], s=base_size if primary else max(60.0, base_size * 3),
                   alpha=0.7 if primary else 0.95, linewidths=0.0 if primary else 0.8,
                   edgecolors="none" if primary else "black", zorder=2 + gi)
    handles = [Line2D([], [], marker="o", linestyle="", color=palette[c], label=c) for c in categories]
    if markers is not None and len(group_names) > 1:
        handles += [Line2D([], [], marker=shape[g], linestyle="", color="gray", markeredgecolor="black", label=g)
                    for g in group_names]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              ncol=1 if len(handles) <= 24 else 2, frameon=False)
    axis = _AXIS_NAMES.get(str(method).lower().replace("-", "") if method else "", "dim ")
    sep = "" if axis in ("PC", "dim ") else "-"
    ax.set_xlabel(f"{axis}{sep}1")
    ax.set_ylabel(f"{axis}{sep}2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or (f"Embedding map ({_AXIS_NAMES.get(str(method), method)})" if method else "Embedding map"))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- #
# selective accuracy, robustness
# --------------------------------------------------------------------------------------------- #


def plot_selective_accuracy(
    coverage: Sequence[float],
    accuracy: Sequence[float] | Mapping[str, Sequence[float]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Accuracy on the most confident fraction of items against that fraction (coverage).

    Takes the ``coverage`` and ``accuracy`` lists of
    :func:`hemaclip.metrics.calibration.selective_accuracy`; pass a mapping ``name -> accuracies``
    to compare several models on the same coverages. A dotted line marks each curve's accuracy
    at full coverage: a useful confidence lies above it everywhere to the left.
    """
    cov = np.asarray(coverage, dtype=np.float64)
    curves = dict(accuracy) if isinstance(accuracy, Mapping) else {"": accuracy}
    if cov.ndim != 1 or cov.size == 0:
        raise ValueError("coverage must be a non-empty 1-D sequence")
    fig = _new_figure(5.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    colours = _categorical_colours(len(curves))
    order = np.argsort(cov)
    for colour, (name, acc) in zip(colours, curves.items()):
        a = np.asarray(acc, dtype=np.float64)
        if a.shape != cov.shape:
            raise ValueError(f"accuracy {name!r} has shape {a.shape}, coverage {cov.shape}")
        ax.plot(cov[order], a[order], marker="o", markersize=4, color=colour, label=name or "model")
        full = a[np.argmax(cov)]
        ax.axhline(full, color=colour, linestyle=":", linewidth=1.0)
    ax.set_xlim(0.0, 1.02)
    ax.set_xlabel("coverage (fraction of most confident items kept)")
    ax.set_ylabel("accuracy on kept items")
    ax.set_title(title or "Selective accuracy (dotted: accuracy at full coverage)")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_robustness_heatmap(
    matrix: ArrayLike,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str | None = None,
    value_label: str = "macro F1",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = ".3f",
    row_title: str | None = None,
    col_title: str | None = None,
) -> Path:
    """Annotated heatmap of a score per (row, column), e.g. perturbation x severity or train x test site.

    NaN cells (not measured) are grey with a dash. The colour scale spans the data unless
    `vmin`/`vmax` are given (fix them, e.g. to 0 and 1, to compare several figures).
    `row_title`/`col_title` label the axes (e.g. "perturbation", "severity").
    """
    values = np.asarray(matrix, dtype=np.float64)
    rows, cols = [str(r) for r in row_labels], [str(c) for c in col_labels]
    if values.ndim != 2 or values.shape != (len(rows), len(cols)) or values.size == 0:
        raise ValueError(f"matrix must be [{len(rows)}, {len(cols)}] to match the labels, got {values.shape}")
    fig = _new_figure(max(4.5, 0.9 * len(cols) + 3.0), max(3.0, 0.45 * len(rows) + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    _heatmap(ax, values, rows, cols, cmap=cmap, vmin=vmin, vmax=vmax, fmt=fmt, colorbar_label=value_label,
             annotate=values.size <= 600)
    if row_title:
        ax.set_ylabel(row_title)
    if col_title:
        ax.set_xlabel(col_title)
    ax.set_title(title or f"Robustness: {value_label}")
    return _save(fig, path)


def plot_reliability(bins: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Draw a reliability diagram from :func:`reliability_bins` output and write it as PNG atomically.

    Uses a standalone Agg figure (no pyplot state, no display needed). Bars show per-bin accuracy
    for non-empty bins; the diagonal is perfect calibration; ECE is printed in the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = np.asarray(bins["edges"], dtype=np.float64)
    count = np.asarray(bins["count"])
    acc = np.asarray(bins["accuracy"], dtype=np.float64)
    conf = np.asarray(bins["confidence"], dtype=np.float64)
    nonempty = count > 0
    left, width = edges[:-1], np.diff(edges)

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(left[nonempty], acc[nonempty], width=width[nonempty], align="edge", edgecolor="black",
           color="#4C72B0", label="accuracy")
    ax.bar(left[nonempty], (conf - acc)[nonempty], bottom=acc[nonempty], width=width[nonempty], align="edge",
           color="#DD8452", alpha=0.45, edgecolor="#DD8452", label="gap")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect")
    ece = bins.get("ece")
    if ece is not None:
        ax.plot([], [], " ", label=f"ECE = {float(ece):.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def plot_roc_curves(curves: Mapping[str, tuple[Any, Any, float]], path: str | Path, title: str | None = None) -> Path:
    """ROC curves (false- against true-positive rate), one per ``name -> (fpr, tpr, auroc)``, with the chance diagonal."""
    if not curves:
        raise ValueError("no ROC curves to plot")
    fig = _new_figure(5.2, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for colour, (name, (fpr, tpr, auc)) in zip(_categorical_colours(len(curves)), curves.items()):
        ax.plot(np.asarray(fpr), np.asarray(tpr), color=colour, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1.0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (familiar cells flagged)")
    ax.set_ylabel("true-positive rate (unfamiliar cells flagged)")
    ax.set_title(title or "Unfamiliarity score: ROC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_score_histograms(groups: Mapping[str, Any], threshold: float, path: str | Path, title: str | None = None) -> Path:
    """Histograms of a score per group (density, shared bins) with the flag threshold as a vertical line."""
    if not groups:
        raise ValueError("no score groups to plot")
    values = {k: np.asarray(v, dtype=np.float64) for k, v in groups.items() if len(v)}
    everything = np.concatenate(list(values.values()))
    bins = np.linspace(np.quantile(everything, 0.001), np.quantile(everything, 0.995), 60)
    fig = _new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for colour, (name, v) in zip(_categorical_colours(len(values)), values.items()):
        ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, histtype="step", linewidth=1.4, color=colour,
                label=f"{name} (n={v.size})")
    ax.axvline(float(threshold), color="black", linestyle="--", linewidth=1.0, label="flag threshold")
    ax.set_xlabel("unfamiliarity score")
    ax.set_ylabel("density")
    ax.set_title(title or "Unfamiliarity score per group")
    ax.legend(fontsize=7)
    return _save(fig, path)
