"""The generated reference pages (issue 29): docs/reference/cli.md from the typer app and docs/reference/python-api.md
from the public API's docstrings. The committed pages must be what scripts/render_docs.py writes now, so a changed
option or docstring fails here until the pages are re-rendered; every command `--help` lists has its section."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest
import typer
from typer.testing import CliRunner

import hemaclip
from hemaclip import api
from hemaclip.cli import app

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "render_docs.py"
HELP_ENV = {"COLUMNS": "200", "NO_COLOR": "1"}  # wide enough that command names are never wrapped
PANEL_ROW = re.compile(r"^│ (\S+)\s{2,}", flags=re.M)


def _script() -> ModuleType:
    """scripts/render_docs.py as a module (scripts/ is not a package); registered so its dataclasses resolve."""
    spec = importlib.util.spec_from_file_location("render_docs", SCRIPT)
    assert spec and spec.loader
    sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_docs = _script()


def help_commands(path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path below `path`, read from the Commands panel of `hemaclip ... --help` (not from the walk the
    generator does, so a command the generator missed is caught)."""
    result = CliRunner().invoke(app, [*path, "--help"], env=HELP_ENV)
    assert result.exit_code == 0, result.output
    if "Commands" not in result.output:
        return []
    found = []
    for name in PANEL_ROW.findall(result.output.split("Commands", 1)[1]):
        found += [(*path, name), *help_commands((*path, name))]
    return found


def test_the_committed_reference_pages_are_what_the_code_gives_now() -> None:
    problems = render_docs.render_reference(check=True)
    assert not problems, f"re-render the reference pages ({render_docs.RERENDER}): " + "; ".join(map(str, problems))


def test_every_sub_command_appears_in_the_cli_reference() -> None:
    commands = help_commands()
    assert len(commands) >= 30 and ("lab", "fit") in commands and ("data", "check") in commands, commands
    page = (ROOT / render_docs.CLI_PAGE).read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} hemaclip (.+)$", page, flags=re.M))
    missing = [" ".join(c) for c in commands if " ".join(c) not in headings]
    assert not missing, f"commands without a section in {render_docs.CLI_PAGE}: {missing}"


def test_every_option_of_every_command_is_in_its_section() -> None:
    page = (ROOT / render_docs.CLI_PAGE).read_text(encoding="utf-8")
    sections = dict(re.findall(r"^#{2,3} (hemaclip[^\n]*)\n(.*?)(?=^#{2,3} hemaclip|\Z)", page, flags=re.M | re.S))
    for path, command in render_docs.cli_commands(typer.main.get_command(app), ("hemaclip",)):
        for param in command.params:
            for flag in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                if param.param_type_name == "option":
                    assert f"`{flag}" in sections[" ".join(path)], (path, flag)


def test_a_changed_option_leaves_the_page_stale_until_rendered(tmp_path: Path) -> None:
    def build(help_text: str) -> typer.Typer:
        demo = typer.Typer()

        @demo.command()
        def run(steps: int = typer.Option(3, min=1, help=help_text)) -> None:  # noqa: B008 (typer's older style: the
            # annotation stays evaluable under `from __future__ import annotations`, the help comes from the closure)
            """Run the thing."""

        @demo.command()
        def other() -> None:
            """Another command, so the app is a group."""

        return demo

    before = render_docs.cli_reference(build("Steps to take."), prog="demo")
    after = render_docs.cli_reference(build("Steps to take, at most 10."), prog="demo")
    assert "| `--steps` | `int, x>=1` | `3` | Steps to take. |" in before
    assert before != after and "at most 10" in after
    page = render_docs.CLI_PAGE
    (tmp_path / page).parent.mkdir(parents=True)
    (tmp_path / page).write_text(before, encoding="utf-8")
    problems = render_docs.render_reference(tmp_path, check=True, pages={page: after})
    assert [p.message for p in problems] == [f"differs from what the code gives now: run `{render_docs.RERENDER}`"]
    assert (tmp_path / page).read_text(encoding="utf-8") == before  # a check writes nothing
    assert render_docs.render_reference(tmp_path, pages={page: after}) == []
    assert (tmp_path / page).read_text(encoding="utf-8") == after
    assert render_docs.render_reference(tmp_path, check=True, pages={page: after}) == []


def test_a_changed_docstring_changes_the_api_page(monkeypatch: pytest.MonkeyPatch) -> None:
    before = render_docs.api_reference()
    monkeypatch.setattr(api.Model.search, "__doc__", "Find cells; a docstring changed by the test.")
    after = render_docs.api_reference()
    assert before != after and "Find cells; a docstring changed by the test." in after


def test_the_api_page_documents_every_public_name_with_its_docstring() -> None:
    page = (ROOT / render_docs.API_PAGE).read_text(encoding="utf-8")
    for name in [*hemaclip.__all__, *api.__all__]:
        assert f"hemaclip.{name}" in page or f"hemaclip.api.{name}" in page, name
    for method in ("describe", "classify", "zero_shot", "embed_images", "embed_texts", "search", "calibrated"):
        assert f"#### Model.{method}" in page, method
    for field in ("runner_up_probability", "unfamiliar", "sentence"):
        assert re.search(rf"^\| `{field}` \| `[^`]+` \| required \|$", page, flags=re.M), field
    assert "*No docstring.*" not in page  # a public name without a docstring is shown, and fails here


def test_the_pages_hold_no_terminal_width_colour_date_or_machine_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")  # --help wraps to the terminal; the reference must not
    pages = render_docs.reference_pages()
    monkeypatch.setenv("COLUMNS", "250")
    assert render_docs.reference_pages() == pages
    for text in pages.values():
        assert "\x1b" not in text and "╭" not in text and "│" not in text
        assert str(ROOT) not in text and str(Path.home()) not in text
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text)


def test_help_and_docstring_text_is_shown_literally() -> None:
    assert render_docs.prose("DEST/<class>/x.png, runs/lvlm-*, `a<b*c`") == r"DEST/&lt;class>/x.png, runs/lvlm-\*, `a<b*c`"
    assert render_docs.prose("a | b", in_table=True) == r"a \| b"
    assert render_docs.prose("- not a list") == r"\- not a list"
    assert render_docs.prose(":class:`Model` and ``load()``") == "`Model` and `load()`"
    doc = "Read it.\n\n    Example::\n\n        x = 1\n        y = 2\n\n    After."
    assert render_docs.docstring_markdown(doc) == ["Read it.", "", "Example:", "", "```python", "x = 1", "y = 2", "```", "", "After."]


def test_option_types_read_from_click_as_well_as_typer() -> None:
    """typer >= 0.29 carries its own click; older typer hands out click's objects, which the walk also reads."""
    command = click.Command("run", params=[click.Option(["--steps"], type=click.IntRange(1, 9), default=3, help="Steps.")])
    context = click.Context(command, info_name="run")
    assert render_docs.param_type(command.params[0], context) == "integer, 1<=x<=9"
    assert render_docs.param_row(command.params[0], context) == "| `--steps` | `integer, 1<=x<=9` | `3` | Steps. |"


def test_signatures_are_written_as_python() -> None:
    def every_kind(a, b=1, /, c=2, *args, d, e: int = 3, **kw) -> str:  # noqa: ANN001, ANN002, ANN003
        return ""

    def keyword_only(a, *, b):  # noqa: ANN001, ANN202
        return None

    assert render_docs.signature_text("f", every_kind) == "f(a, b=1, /, c=2, *args, d, e: int = 3, **kw) -> str"
    assert render_docs.signature_text("g", keyword_only) == "g(a, *, b)"
    long = render_docs.signature_text("hemaclip.load", hemaclip.load)
    assert long.startswith("hemaclip.load(\n    model: str | os.PathLike[str] | None = None,\n    *,\n") and long.endswith("\n) -> Model")
