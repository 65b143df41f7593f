"""Render the measured figures of README.md (or any Markdown page) from the committed JSON they come from.

A figure is written between two HTML comments that name its source, so the text can be read as it is and
checked against the JSON at any time (issue 27, "one source per figure"):

    <!-- fig: bench/results/eval_default.json :: metrics.test_zs_class_macro_f1 :: .3f -->0.995<!-- /fig -->

- the source is a JSON file, relative to the Markdown file's own folder (as a link would be);
- the key is a dotted path into it; a list is indexed by a number (`sets.0.mean`), and a key that itself holds
  dots or spaces is matched whole (`in_lab.pbc test.flagged_share`, the longest key that fits wins);
- the format is a Python format spec (`.3f`, `,d`, `.2f`); `100*` in front multiplies by 100 first
  (`100*.1f` writes 0.0472 as 4.7), so the text around the marker can carry the unit (" %").

A *measured figure* in the Markdown's results section (the `## Results...` heading and its subsections, up to the
next `## ` heading) is any decimal number (a digit, a point, a digit: 0.995, 4.7) or percentage (a number followed
by `%`, with or without a space) outside a marker, an HTML comment, a code span or a link target. Such a figure has
no source and `--check` reports it, as it reports a figure that differs from its source or whose source or key is
missing. Integers (cell counts) may stand unmarked; the README marks the measured ones anyway.

Usage: python scripts/render_docs.py [FILE ...] [--check]   (default FILE: README.md at the repository root)
  default mode  rewrites each file in place (atomically) with the figures its sources give now;
  --check       changes nothing; exit status 1 and one line per figure that is stale, unsourced or unreadable.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hemaclip.io import atomic_write

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_FILES = (REPOSITORY / "README.md",)
MARKER = re.compile(r"<!-- fig: (?P<source>.+?) :: (?P<key>.+?) :: (?P<spec>\S+?) -->(?P<text>.*?)<!-- /fig -->")
RESULTS_HEADING = re.compile(r"^## Results\b")
NEXT_SECTION = re.compile(r"^## ")
PERCENT_FACTOR = "100*"
# What is not prose in a line: markers (checked apart), HTML comments, code spans, link targets.
NOT_PROSE = re.compile(r"<!-- fig: .*?<!-- /fig -->|<!--.*?-->|`[^`]*`|\]\([^)]*\)")
MEASURED = re.compile(r"(?<![\w.])\d+\.\d+(?:\s?%)?|(?<![\w.])\d+\s?%")


@dataclass(frozen=True)
class Problem:
    """One figure that cannot be trusted as written, with where it stands."""

    file: Path
    line: int
    message: str
    stale: bool = False  # the source reads fine and a rewrite fixes it

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class SourceError(Exception):
    """A figure's source file or key cannot be read; the message says which."""


def lookup(data: Any, key: str) -> Any:
    """The value at a dotted key path; a dict key may itself contain dots (the longest key that fits is taken)."""
    rest = key
    while rest:
        if isinstance(data, dict):
            fits = [k for k in data if rest == k or rest.startswith(f"{k}.")]
            if not fits:
                raise SourceError(f"no key {rest.split('.')[0]!r}")
            name = max(fits, key=len)
        elif isinstance(data, list):
            name = rest.split(".", 1)[0]
            if not name.isdigit() or int(name) >= len(data):
                raise SourceError(f"no list item {name!r}")
        else:
            raise SourceError(f"{rest!r} goes below a value")
        data = data[name] if isinstance(data, dict) else data[int(name)]
        rest = rest[len(name) + 1:]
    return data


def render_value(value: Any, spec: str) -> str:
    """The value as the Markdown shows it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SourceError(f"not a number: {value!r}")
    if spec.startswith(PERCENT_FACTOR):
        value, spec = value * 100, spec[len(PERCENT_FACTOR):]
    try:
        return format(value, spec)
    except ValueError as error:
        raise SourceError(f"bad format {spec!r}: {error}") from None


class Sources:
    """JSON files read once each, relative to the Markdown file's folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.loaded: dict[str, Any] = {}

    def value(self, source: str, key: str) -> Any:
        if source not in self.loaded:
            path = self.folder / source
            try:
                self.loaded[source] = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise SourceError(f"{source}: no such file") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise SourceError(f"{source}: not readable JSON ({error})") from None
        try:
            return lookup(self.loaded[source], key)
        except SourceError as error:
            raise SourceError(f"{source} :: {key}: {error}") from None


def unsourced_figures(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, figure) for each measured figure of the results section that stands outside a marker."""
    found, inside, fenced = [], False, False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
        if RESULTS_HEADING.match(line):
            inside = True
            continue
        if inside and NEXT_SECTION.match(line):
            inside = False
        if inside and not fenced:
            found += [(number, m.group(0)) for m in MEASURED.finditer(NOT_PROSE.sub(" ", line))]
    return found


def render(path: Path) -> tuple[str, list[Problem], int]:
    """The file's text with every figure rendered from its source, the problems found, and the number of figures."""
    text = path.read_text(encoding="utf-8")
    sources = Sources(path.parent)
    problems: list[Problem] = []
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        line = text.count("\n", 0, match.start()) + 1
        try:
            fresh = render_value(sources.value(match["source"], match["key"]), match["spec"])
        except SourceError as error:
            problems.append(Problem(path, line, str(error)))
            return match.group(0)
        if fresh != match["text"]:
            problems.append(Problem(path, line, f"{match['source']} :: {match['key']}: the page says "
                                                f"{match['text']!r}, the source gives {fresh!r}", stale=True))
        return match.group(0).replace(f"-->{match['text']}<!--", f"-->{fresh}<!--", 1)

    rendered = MARKER.sub(replace, text)
    problems += [Problem(path, line, f"figure {figure!r} in the results section has no source marker")
                 for line, figure in unsourced_figures(text.splitlines())]
    return rendered, problems, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, default=list(DEFAULT_FILES), help="Markdown files (default README.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any figure is stale or unsourced")
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 1
        rendered, problems, count = render(path)
        stale = [p for p in problems if p.stale]
        unfixable = [p for p in problems if not p.stale]
        if args.check:
            for problem in problems:
                print(problem, file=sys.stderr)
            failed |= bool(problems)
            print(f"{path}: {count} figures, {len(problems)} problems")
            continue
        for problem in unfixable:  # a missing source or an unsourced figure is not something a rewrite can fix
            print(problem, file=sys.stderr)
        failed |= bool(unfixable)
        if stale and not unfixable:
            with atomic_write(path) as handle:
                handle.write(rendered)
        print(f"{path}: {count} figures, {len(stale)} rewritten" + (", nothing written" if unfixable else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
