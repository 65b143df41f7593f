"""Evaluation reports: ``metrics.json``, ``report.md`` and a self-contained ``report.html``.

A report is a title, a list of :class:`Section` (text, :class:`Table`, figure files) and the raw
metrics dictionary. :func:`write_report` writes all three files atomically into one folder:

* ``metrics.json``: the metrics, made strictly JSON-valid (numpy values become Python numbers,
  NaN and infinities become ``null``);
* ``report.md``: Markdown that references figures by path relative to the report folder;
* ``report.html``: one file to mail or archive: figures embedded as base64 ``data:`` URIs, a small
  inline stylesheet, no JavaScript and no external resources; every piece of text is HTML-escaped.

Both documents carry a header (hemaclip version, date, checkpoint), a "How to read this" block and
a fixed research-software footer (:data:`FOOTER`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import hemaclip
from hemaclip.io import atomic_write, write_json

__all__ = [
    "FOOTER",
    "HOW_TO_READ",
    "Section",
    "Table",
    "fmt_ci",
    "fmt_value",
    "write_report",
]

FOOTER = "Research software: these numbers describe a model on a dataset, not a diagnostic claim."

HOW_TO_READ: tuple[str, ...] = (
    "Macro F1 is the unweighted mean of the per-class F1 scores: every class counts the same, so a "
    "rare cell type weighs as much as a common one. Weighted F1 weights each class by its number of "
    "test items and so follows the class mix of this test set (closer to accuracy). A macro F1 well "
    "below the weighted F1 means the model does worse on rare classes.",
    "Numbers written as 0.953 [0.941, 0.964] are a point estimate with its 95 % bootstrap interval: "
    "the test set was resampled with replacement (within each true class) many times and the middle "
    "95 % of the recomputed scores is shown. The interval reflects the finite size of this test set "
    "only; it says nothing about other laboratories, scanners or staining protocols. Overlapping "
    "intervals do not by themselves show that two models are equal: use a paired test for that.",
)

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:60rem;
margin:2rem auto;padding:0 1rem;color:#222;line-height:1.45}
header{border-bottom:1px solid #ccc;margin-bottom:1.5rem}
header p{color:#555;margin:.2rem 0 .8rem 0;font-size:.9rem}
h1{margin-bottom:.3rem}h2{margin-top:2rem;border-bottom:1px solid #eee}
.how{background:#f5f7fa;border-left:4px solid #4c72b0;padding:.4rem 1rem;font-size:.92rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
footer{border-top:1px solid #ccc;margin-top:2.5rem;padding-top:.6rem;font-size:.85rem;color:#555}
""".strip()


@dataclass
class Table:
    """A results table: column names, rows of cells, an optional caption.

    Cells are formatted with :func:`fmt_value`: floats to `digits` decimals, a
    ``bootstrap_ci`` dict (``point``/``low``/``high``) or a ``(point, low, high)`` tuple as
    ``0.953 [0.941, 0.964]``, None as a dash; strings are shown as they are.
    """

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    digits: int = 3

    def __post_init__(self) -> None:
        self.columns = [str(c) for c in self.columns]
        self.rows = [list(r) for r in self.rows]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table row {i} has {len(row)} cells for {len(self.columns)} columns")


@dataclass
class Section:
    """One report section: a heading, plain text (blank lines separate paragraphs), tables, figures.

    A figure is a path to an existing image file (PNG usually) or a ``(path, caption)`` pair.
    """

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- #
# number formatting
# --------------------------------------------------------------------------------------------- #


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _fmt_number(x: Any, digits: int) -> str:
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    v = float(x)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.{digits}f}"


def fmt_ci(point: Any, low: Any = None, high: Any = None, digits: int = 3) -> str:
    """``0.953 [0.941, 0.964]``; just the point when a bound is missing, a dash when the point is."""
    if point is None:
        return "–"
    text = _fmt_number(float(point), digits)
    if low is None or high is None:
        return text
    return f"{text} [{_fmt_number(float(low), digits)}, {_fmt_number(float(high), digits)}]"


def fmt_value(value: Any, digits: int = 3) -> str:
    """Format one table cell consistently (see :class:`Table`)."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if _is_number(value):
        return _fmt_number(value, digits)
    if isinstance(value, Mapping) and "point" in value:
        return fmt_ci(value["point"], value.get("low"), value.get("high"), digits)
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(v is None or _is_number(v) for v in value):
        return fmt_ci(value[0], value[1], value[2], digits)
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def _is_numeric_cell(value: Any) -> bool:
    return value is not None and (
        _is_number(value)
        or (isinstance(value, Mapping) and "point" in value)
        or (isinstance(value, (tuple, list)) and len(value) == 3 and all(v is None or _is_number(v) for v in value))
    )


# --------------------------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------------------------- #


def _jsonable(value: Any) -> Any:
    """Deep copy of `value` that ``json`` writes as strict JSON (no NaN, numpy turned into Python)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _figure_entry(figure: Any) -> tuple[Path, str]:
    if isinstance(figure, (tuple, list)):
        if len(figure) != 2:
            raise ValueError(f"a figure is a path or a (path, caption) pair, got {figure!r}")
        return Path(figure[0]), str(figure[1])
    return Path(figure), ""


def _checkpoint_name(checkpoint: Any, metrics: Mapping[str, Any]) -> str:
    if checkpoint is None:
        meta = metrics.get("meta") if isinstance(metrics.get("meta"), Mapping) else {}
        checkpoint = metrics.get("checkpoint", meta.get("checkpoint"))
    if checkpoint is None or str(checkpoint) == "":
        return "not given"
    return Path(checkpoint).name if isinstance(checkpoint, Path) else str(checkpoint)


def _date_text(date: Any) -> str:
    if date is None:
        date = _dt.datetime.now(_dt.timezone.utc)
    if isinstance(date, _dt.datetime):
        if date.tzinfo is not None:
            date = date.astimezone(_dt.timezone.utc)
            return date.strftime("%Y-%m-%d %H:%M UTC")
        return date.strftime("%Y-%m-%d %H:%M")
    if isinstance(date, _dt.date):
        return date.isoformat()
    return str(date)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _md_text(text: str) -> str:
    """Keep Markdown syntax but stop raw HTML (a caption with ``<script>``) from being rendered."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.resolve().as_posix()


# --------------------------------------------------------------------------------------------- #
# renderers
# --------------------------------------------------------------------------------------------- #


def _render_markdown(title: str, header: list[tuple[str, str]], sections: Sequence[Section],
                     figures: dict[int, list[tuple[Path, str]]], out_dir: Path) -> str:
    lines = [f"# {_md_text(title)}", "", " · ".join(f"**{k}:** {_md_text(v)}" for k, v in header), ""]
    lines += ["> **How to read this**", ">"]
    for i, para in enumerate(HOW_TO_READ):
        lines.append(f"> {para}")
        if i < len(HOW_TO_READ) - 1:
            lines.append(">")
    lines.append("")
    for s_idx, section in enumerate(sections):
        lines += [f"## {_md_text(section.title)}", ""]
        for para in _paragraphs(section.text):
            lines += [_md_text(para), ""]
        for table in section.tables:
            if table.caption:
                lines += [f"*{_md_cell(table.caption)}*", ""]
            numeric = [any(_is_numeric_cell(r[j]) for r in table.rows) for j in range(len(table.columns))]
            lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
            lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
            for row in table.rows:
                lines.append("| " + " | ".join(_md_cell(fmt_value(v, table.digits)) for v in row) + " |")
            lines.append("")
        for path, caption in figures[s_idx]:
            alt = caption or path.stem.replace("_", " ")
            rel = _relative(path, out_dir).replace(" ", "%20").replace("(", "%28").replace(")", "%29")
            lines += [f"![{_md_cell(alt).replace('[', '(').replace(']', ')')}]({rel})", ""]
            if caption:
                lines += [f"*{_md_cell(caption)}*", ""]
    lines += ["---", "", f"*{FOOTER}*", ""]
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _render_html(title: str, header: list[tuple[str, str]], sections: Sequence[Section],
                 figures: dict[int, list[tuple[Path, str]]]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{esc(title)}</h1>",
        "<p>" + " · ".join(f"<strong>{esc(k)}:</strong> {esc(v)}" for k, v in header) + "</p>",
        "</header>",
        '<section class="how">',
        "<h3>How to read this</h3>",
        *(f"<p>{esc(p)}</p>" for p in HOW_TO_READ),
        "</section>",
    ]
    for s_idx, section in enumerate(sections):
        out += ["<section>", f"<h2>{esc(section.title)}</h2>"]
        for para in _paragraphs(section.text):
            out.append("<p>" + esc(para).replace("\n", "<br>\n") + "</p>")
        for table in section.tables:
            out.append("<table>")
            if table.caption:
                out.append(f"<caption>{esc(table.caption)}</caption>")
            out.append("<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr></thead>")
            out.append("<tbody>")
            for row in table.rows:
                cells = []
                for v in row:
                    cls = ' class="num"' if _is_numeric_cell(v) else ""
                    cells.append(f"<td{cls}>{esc(fmt_value(v, table.digits))}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
        for path, caption in figures[s_idx]:
            alt = caption or path.stem.replace("_", " ")
            out.append("<figure>")
            out.append(f'<img src="{_data_uri(path)}" alt="{esc(alt)}">')
            if caption:
                out.append(f"<figcaption>{esc(caption)}</figcaption>")
            out.append("</figure>")
        out.append("</section>")
    out += [f"<footer><p>{esc(FOOTER)}</p></footer>", "</body>", "</html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- #
# entry point
# --------------------------------------------------------------------------------------------- #


def write_report(
    out_dir: str | Path,
    title: str,
    sections: Sequence[Section],
    metrics: Mapping[str, Any],
    *,
    checkpoint: str | Path | None = None,
    date: _dt.datetime | _dt.date | str | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and ``report.html`` into `out_dir` (created if absent).

    `checkpoint` names the evaluated model in the header (a path shows its file name); without
    it ``metrics["checkpoint"]`` or ``metrics["meta"]["checkpoint"]`` is used. `date` defaults to
    now (UTC). Figure paths may be absolute or relative to the current directory; they must exist
    (checked before anything is written). Each file is written atomically (temporary file, then
    rename). Returns ``{"metrics": ..., "markdown": ..., "html": ...}`` paths.
    """
    out = Path(out_dir)
    sections = list(sections)
    for section in sections:
        if not isinstance(section, Section):
            raise TypeError(f"sections must be Section objects, got {type(section).__name__}")
    figures: dict[int, list[tuple[Path, str]]] = {}
    missing = []
    for i, section in enumerate(sections):
        figures[i] = [_figure_entry(f) for f in section.figures]
        missing += [str(p) for p, _ in figures[i] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"report figures not found: {', '.join(missing)}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping, got {type(metrics).__name__}")

    header = [
        ("hemaclip", str(hemaclip.__version__)),
        ("date", _date_text(date)),
        ("checkpoint", _checkpoint_name(checkpoint, metrics)),
    ]
    markdown = _render_markdown(str(title), header, sections, figures, out)
    page = _render_html(str(title), header, sections, figures)

    paths = {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}
    out.mkdir(parents=True, exist_ok=True)
    write_json(paths["metrics"], _jsonable(metrics))
    with atomic_write(paths["markdown"]) as handle:
        handle.write(markdown)
    with atomic_write(paths["html"]) as handle:
        handle.write(page)
    return paths
