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

The same run writes the reference pages (issue 29): docs/reference/cli.md from the typer app (every command and
sub-command, with each option's flags, type, default and help, walked through click's introspection) and
docs/reference/python-api.md from the public API's signatures and docstrings (`hemaclip.__all__`, `hemaclip.api`).
They hold no date, terminal width or absolute path, so a page differs from its render only when the code changed.

Usage: python scripts/render_docs.py [FILE ...] [--check]   (default: README.md, docs/onboarding.md and the reference pages)
  default mode  rewrites each file in place (atomically) with the figures its sources give now, and with no FILE
                the reference pages with what the code gives now;
  --check       changes nothing; exit status 1 and one line per figure that is stale, unsourced or unreadable, and
                (with no FILE) per reference page that differs from its render.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from hemaclip.io import atomic_write

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_FILES = (REPOSITORY / "README.md", REPOSITORY / "docs" / "onboarding.md")  # the pages with rendered figures
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



# ------------------------------------------------------------------------------------------------------------ #
# Reference pages (issue 29): docs/reference/cli.md from the typer app, docs/reference/python-api.md from the
# public API's signatures and docstrings. Written whole; `--check` compares them with what the code gives now.
# ------------------------------------------------------------------------------------------------------------ #

REFERENCE_FOLDER = Path("docs") / "reference"
CLI_PAGE = REFERENCE_FOLDER / "cli.md"
API_PAGE = REFERENCE_FOLDER / "python-api.md"
RERENDER = "python scripts/render_docs.py"
GENERATED_NOTE = f"<!-- Generated by scripts/render_docs.py from {{source}}; do not edit by hand: change the code, then run `{RERENDER}`. -->"
MAX_SIGNATURE_LINE = 100  # a longer signature is written one parameter per line
NO_DEFAULT = "—"
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
REST_ROLE = re.compile(r":[a-z]+:`([^`]+)`")
REST_LITERAL = re.compile(r"``([^`]+)``")
# A line that Markdown would read as a heading, quote, list item or thematic break if written as it stands.
BLOCK_START = re.compile(r"^(#+|>|[-+*]|\d+[.)])(\s|$)")
ADDRESS_IN_REPR = " at 0x"  # an object's default repr holds its address: different on every run


class UnstablePage(Exception):
    """The code cannot be rendered into a stable page (the message says which part)."""


def prose(text: str, *, in_table: bool = False) -> str:
    """One line of help or docstring text as Markdown shows it literally: reST roles and ``literals`` become code
    spans; outside code spans `<` (an HTML tag to Markdown) and `*` (emphasis) are escaped; in a table `|` too."""
    text = REST_ROLE.sub(r"`\1`", REST_LITERAL.sub(r"`\1`", text))
    out, last = [], 0
    for match in CODE_SPAN.finditer(text):
        out.append(text[last:match.start()].replace("\\", "\\\\").replace("<", "&lt;").replace("*", "\\*"))
        out.append(match.group(0))
        last = match.end()
    out.append(text[last:].replace("\\", "\\\\").replace("<", "&lt;").replace("*", "\\*"))
    line = "".join(out)
    if in_table:
        return line.replace("|", "\\|")
    return f"\\{line}" if BLOCK_START.match(line) else line


def code(text: str) -> str:
    """`text` as an inline code span inside a table cell (GFM reads `\\|` there as a literal bar)."""
    fence = "``" if "`" in text else "`"
    return f"{fence}{text.replace('|', chr(92) + '|')}{fence}"


def help_paragraphs(text: str) -> list[str]:
    """A command's help as Markdown paragraphs, its line breaks kept (as `--help` prints them) by hard breaks."""
    paragraphs = [p for p in re.split(r"\n\s*\n", inspect.cleandoc(text)) if p.strip()]
    return [" \\\n".join(prose(line.strip()) for line in p.splitlines() if line.strip()) for p in paragraphs]


def docstring_markdown(doc: str | None) -> list[str]:
    """A docstring as Markdown lines: prose as written (Markdown joins wrapped lines), and a reST literal block
    (`Example::` and an indented block) as a fenced Python block."""
    if not doc:
        return []
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if not line.endswith("::"):
            out.append(prose(line.strip()) if line.strip() else "")
            continue
        out.append(prose(line[:-1].strip()))
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
            block.append(lines[i].rstrip())
            i += 1
        while block and not block[-1]:
            block.pop()
        out += ["", "```python", *textwrap.dedent("\n".join(block)).strip("\n").splitlines(), "```", ""]
    while out and not out[-1]:
        out.pop()
    return out


def default_text(value: Any) -> str:
    """A default as the code gives it: paths and strings as written, no repr of objects with addresses."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(default_text(v) for v in value)
    text = repr(value)
    if ADDRESS_IN_REPR in text:
        raise UnstablePage(f"a default without a stable text: {text}")
    return text


# --- CLI ------------------------------------------------------------------------------------------------------ #


def cli_commands(command: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(name path, command) for a command and every visible sub-command below it, in `--help` order. Duck-typed
    on click's introspection (`commands`, `list_commands`, `params`): typer >= 0.29 carries its own copy of click."""
    yield path, command
    if hasattr(command, "list_commands"):
        context = command.context_class(command, info_name=path[-1])
        for name in command.list_commands(context):
            sub = command.commands[name]
            if not getattr(sub, "hidden", False):
                yield from cli_commands(sub, (*path, name))


def param_type(param: Any, context: Any) -> str:
    """The value type as `--help` names it (its metavar if given), with a number range."""
    if param.metavar is not None:
        label = param.metavar
    elif hasattr(param, "display_type"):  # typer >= 0.29
        label = param.display_type(context).strip("<>")
    else:  # click
        label = param.type.name
    low = getattr(param, "min", getattr(getattr(param, "type", None), "min", None))
    high = getattr(param, "max", getattr(getattr(param, "type", None), "max", None))
    if low is not None and high is not None:
        label = f"{label.removesuffix(' range')}, {low}<=x<={high}"
    elif low is not None or high is not None:
        label = f"{label.removesuffix(' range')}, x" + (f">={low}" if low is not None else f"<={high}")
    return label


def param_row(param: Any, context: Any) -> str:
    """One table row: names, type, default, help."""
    if param.param_type_name == "argument":
        names = code((param.metavar or param.name) + ("..." if param.nargs == -1 else ""))
    else:
        names = " / ".join(code(", ".join(opts)) for opts in (param.opts, param.secondary_opts) if opts)
    if param.required:
        default = "required"
    elif param.default is None or callable(param.default):
        default = NO_DEFAULT
    elif isinstance(param.default, str):  # as typed on the command line
        default = code(param.default) if param.default else '`""`'
    else:
        default = code(default_text(param.default))
    notes = [prose(" ".join((getattr(param, "help", None) or "").split()), in_table=True)]
    if param.multiple:
        notes.append("Repeatable.")
    if param.envvar:
        notes.append(f"Environment variable: {code(str(param.envvar))}.")
    return f"| {names} | {code(param_type(param, context))} | {default} | {' '.join(n for n in notes if n)} |"


def cli_section(path: tuple[str, ...], command: Any) -> list[str]:
    """A command's heading, help, usage line and table of arguments and options."""
    name = " ".join(path)
    context = command.context_class(command, info_name=path[-1])
    level = "#" * (2 + max(0, len(path) - 2))
    lines = [f"{level} {name}", ""]
    if getattr(command, "deprecated", False):
        lines += ["Deprecated.", ""]
    for paragraph in help_paragraphs(command.help or command.short_help or ""):
        lines += [paragraph, ""]
    lines += [f"Usage: `{name} {' '.join(command.collect_usage_pieces(context))}`", ""]
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument or option | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [param_row(p, context) for p in params] + [""]
    return lines


def cli_reference(app: Any, prog: str = "hemaclip", source: str = "the typer app in src/hemaclip/cli.py") -> str:
    """The Markdown reference of a typer app: every visible command and sub-command with its options."""
    import typer

    commands = list(cli_commands(typer.main.get_command(app), (prog,)))
    lines = [
        "# Command-line reference", "",
        GENERATED_NOTE.format(source=source), "",
        f"Every command of `{prog}` with its arguments and options, as `{prog} COMMAND --help` prints them (every command "
        "also takes `--help`). Worked command lines, grouped by task, are in [the command-line guide](../cli.md).", "",
    ]
    for path, _ in commands[1:]:
        indent = "  " * (len(path) - 2)
        lines.append(f"{indent}- [{' '.join(path[1:])}](#{'-'.join(path)})")
    lines.append("")
    for path, command in commands:
        lines += cli_section(path, command)
    return "\n".join(lines).rstrip("\n") + "\n"


# --- Python API ----------------------------------------------------------------------------------------------- #


def annotation_text(annotation: Any) -> str:
    """An annotation as written in the code (string annotations as they stand; typing objects spelled out)."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, typing.ForwardRef):
        return annotation.__forward_arg__
    if typing.get_origin(annotation) is typing.Union:
        return " | ".join(annotation_text(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__ if annotation.__module__ == "builtins" else f"{annotation.__module__}.{annotation.__qualname__}"
    return repr(annotation).replace("typing.", "")


def signature_text(name: str, function: Any, *, skip_self: bool = False, prefix: str = "") -> str:
    """`name(params) -> return`, from `inspect.signature`, one parameter per line when it is long."""
    signature = inspect.signature(function)
    parts: list[str] = []
    previous = None
    for param in list(signature.parameters.values())[1 if skip_self else 0:]:
        if previous is param.POSITIONAL_ONLY and param.kind is not param.POSITIONAL_ONLY:
            parts.append("/")
        if param.kind is param.KEYWORD_ONLY and previous not in (param.KEYWORD_ONLY, param.VAR_POSITIONAL):
            parts.append("*")
        text = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "") + param.name
        if param.annotation is not param.empty:
            text += f": {annotation_text(param.annotation)}"
        if param.default is not param.empty:  # spaced only after an annotation, as PEP 8 writes it
            text += (" = " if param.annotation is not param.empty else "=") + default_text(param.default)
        parts.append(text)
        previous = param.kind
    if previous is inspect.Parameter.POSITIONAL_ONLY:
        parts.append("/")
    returns = "" if signature.return_annotation is signature.empty else f" -> {annotation_text(signature.return_annotation)}"
    one_line = f"{prefix}{name}({', '.join(parts)}){returns}"
    if len(one_line) <= MAX_SIGNATURE_LINE or not parts:
        return one_line
    return f"{prefix}{name}(\n" + "".join(f"    {p},\n" for p in parts) + f"){returns}"


def own_docstring(obj: Any) -> str | None:
    """The object's own docstring: not inherited, and not the `Name(field, ...)` text dataclasses write."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if isinstance(obj, type) and doc and doc.startswith(f"{obj.__name__}("):
        return None
    return doc


def api_block(heading: str, signature: str, doc: str | None, level: str = "##") -> list[str]:
    """A heading, the signature as a Python block, and the docstring (or a visible note that there is none)."""
    return [f"{level} {heading}", "", "```python", signature, "```", "",
            *(docstring_markdown(doc) or ["*No docstring.*"]), ""]


def class_members(cls: type, shown: str) -> list[str]:
    """The public methods and properties a class defines itself, in the order of its source."""
    lines: list[str] = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            annotation = inspect.signature(member.fget).return_annotation
            signature = f"{shown}.{name}" + ("" if annotation is inspect.Signature.empty else f": {annotation_text(annotation)}")
            lines += api_block(f"{shown}.{name} (property)", signature, own_docstring(member.fget), "###")
        elif isinstance(member, (classmethod, staticmethod)):
            kind = "classmethod" if isinstance(member, classmethod) else "staticmethod"
            lines += api_block(f"{shown}.{name} ({kind})", signature_text(f"{shown}.{name}", member.__func__, skip_self=kind == "classmethod"),
                               own_docstring(member.__func__), "###")
        elif inspect.isfunction(member):
            lines += api_block(f"{shown}.{name}", signature_text(f"{shown}.{name}", member, skip_self=True), own_docstring(member), "###")
    return lines


def dataclass_fields(cls: type) -> list[str]:
    """A table of a dataclass's fields: name, type as written, default."""
    rows = ["| field | type | default |", "| --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = code(default_text(field.default))
        elif field.default_factory is not dataclasses.MISSING:
            default = code(f"{field.default_factory.__name__}()")
        else:
            default = "required"
        rows.append(f"| `{field.name}` | {code(annotation_text(field.type))} | {default} |")
    return [*rows, ""]


def api_reference() -> str:
    """The Markdown reference of `hemaclip.__all__` and `hemaclip.api.__all__`: functions, classes with their public
    methods, result dataclasses with their fields, type aliases and constants."""
    import hemaclip
    from hemaclip import api

    names = list(dict.fromkeys([*hemaclip.__all__, *api.__all__]))
    objects = {n: getattr(hemaclip, n) if n in hemaclip.__all__ else getattr(api, n) for n in names}
    shown = {n: f"hemaclip.{n}" if n in hemaclip.__all__ else f"hemaclip.api.{n}" for n in names}
    functions = [n for n in names if inspect.isfunction(objects[n])]
    records = [n for n in names if inspect.isclass(objects[n]) and dataclasses.is_dataclass(objects[n])]
    classes = [n for n in names if inspect.isclass(objects[n]) and n not in records]
    aliases = [n for n in names if typing.get_origin(objects[n]) is not None]
    constants = [n for n in names if n not in {*functions, *records, *classes, *aliases}]
    lines = [
        "# Python API reference", "",
        GENERATED_NOTE.format(source="hemaclip.__all__ and src/hemaclip/api.py"), "",
        "Every public name of `hemaclip` (`hemaclip.__all__`) and `hemaclip.api`, with its signature and docstring. "
        "A guided tour with a worked example is [the Python guide](../python-api.md).", "",
        *docstring_markdown(own_docstring(api)), "",
    ]
    lines += ["## Functions", ""] if functions else []
    for n in functions:
        lines += api_block(shown[n], signature_text(shown[n], objects[n]), own_docstring(objects[n]), "###")
    for title, group in (("Classes", classes), ("Result records", records)):
        if not group:
            continue
        lines += [f"## {title}", ""]
        for n in group:
            cls = objects[n]
            if n in records:  # built by hemaclip, read by the user: the fields table says what the constructor takes
                frozen = "(frozen=True)" if cls.__dataclass_params__.frozen else ""
                lines += api_block(shown[n], f"@dataclass{frozen}\nclass {shown[n]}", own_docstring(cls), "###")
                lines += dataclass_fields(cls)
            else:
                constructor = signature_text(shown[n], cls.__init__, skip_self=True, prefix="class ").removesuffix(" -> None")
                lines += api_block(shown[n], constructor, own_docstring(cls), "###")
            lines += [line.replace("### ", "#### ", 1) if line.startswith("### ") else line for line in class_members(cls, n)]
    if aliases:
        lines += ["## Types", ""]
        lines += [f"- `{shown[n]}` = `{annotation_text(objects[n])}`" for n in aliases] + [""]
    if constants:
        lines += ["## Constants", ""]
        lines += [f"- `{shown[n]}` = `{default_text(objects[n])}`" for n in constants] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def reference_pages() -> dict[Path, str]:
    """Each reference page (path relative to the repository) with the text the code gives now."""
    from hemaclip.cli import app

    return {CLI_PAGE: cli_reference(app), API_PAGE: api_reference()}


def render_reference(root: Path = REPOSITORY, *, check: bool = False, pages: dict[Path, str] | None = None) -> list[Problem]:
    """Write the reference pages under `root` (only those that changed, atomically); with `check`, write nothing and
    report each page that is missing or differs from what the code gives now."""
    problems = []
    for relative, text in (reference_pages() if pages is None else pages).items():
        path = root / relative
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        if check:
            state = "missing" if current is None else "differs from what the code gives now"
            problems.append(Problem(relative, 1, f"{state}: run `{RERENDER}`", stale=True))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            handle.write(text)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md, docs/onboarding.md and the reference pages)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any figure or reference page is stale or unsourced")
    args = parser.parse_args(argv)
    failed = False
    for path in args.files or DEFAULT_FILES:
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
    if not args.files:  # the default run renders (or checks) the reference pages too
        try:
            problems = render_reference(check=args.check)
        except UnstablePage as error:
            print(f"error: reference pages: {error}", file=sys.stderr)
            return 1
        for problem in problems:
            print(problem, file=sys.stderr)
        failed |= bool(problems)
        print(f"{REFERENCE_FOLDER}: {len(problems)} stale pages" if args.check else f"{REFERENCE_FOLDER}: rendered")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
