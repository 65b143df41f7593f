"""The README a newcomer reads and the docs/ pages behind it (issue 29): short, no broken link or anchor, the CLI
tour is the command list, and the README's Python example is the one tests/test_api.py runs verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
API_DOC = ROOT / "docs" / "python-api.md"
ENTRY_POINT = Path(sys.executable).with_name("hemaclip")
MAX_README_LINES = 250
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces, hyphens kept),
    spaces to hyphens."""
    text = unicodedata.normalize("NFC", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor, a repeated heading numbered as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", markdown).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            base = slug(match[1])
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [target for target in LINK.findall(text) if not target.startswith(EXTERNAL)]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    links = relative_links(page)
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    assert not broken, broken


def test_the_link_check_catches_a_broken_file_and_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## A section (`x`)\n\n[ok](#a-section-x) [no](#nowhere) [file](missing.md)\n"
                    "```\n[in code](ignored.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["#a-section-x", "#nowhere", "missing.md"]
    assert "a-section-x" in anchors(page.read_text(encoding="utf-8")) and "nowhere" not in anchors(page.read_text(encoding="utf-8"))


def test_slug_is_githubs() -> None:
    assert slug("Knowing what it does not know (`hemaclip trust`)") == "knowing-what-it-does-not-know-hemaclip-trust"
    assert slug("Reviewing a slide: corrections that teach, speed, examples") == "reviewing-a-slide-corrections-that-teach-speed-examples"
    assert anchors("## Results\n## Results\n") == {"results", "results-1"}


def test_readme_python_example_is_the_one_test_api_runs() -> None:
    """The README's Python blocks are docs/python-api.md's, verbatim; tests/test_api.py runs those against the shipped
    model (test_the_documented_example_runs_verbatim), so the model is not loaded a second time here."""
    readme = python_blocks(README.read_text(encoding="utf-8"))
    assert readme, "README.md has no python example"
    assert readme == python_blocks(API_DOC.read_text(encoding="utf-8"))
    for block in readme:
        compile(block, str(README), "exec")


def test_the_cli_tour_lists_every_command() -> None:
    """One line per command in the README, and every command `hemaclip --help` names (through the installed script)."""
    result = subprocess.run([str(ENTRY_POINT), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    commands_section = result.stdout.split("Commands", 1)[1]
    commands = set(re.findall(r"^│ (\S+)\s{2,}", commands_section, flags=re.M))
    assert len(commands) >= 15, result.stdout
    readme = README.read_text(encoding="utf-8")
    toured = set(re.findall(r"^\| `hemaclip ([a-z-]+)` \|", readme, flags=re.M))
    assert toured == commands


def test_readme_states_no_unmeasured_suite_time() -> None:
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert "`make test` runs the whole suite (about 15 minutes on 2 cores)" in readme
    assert not re.search(r"\d+ (tests|passed)", readme)  # counts go stale; the suite says them itself


def test_research_log_says_its_figures_are_as_measured() -> None:
    first_lines = (ROOT / "docs" / "research-log.md").read_text(encoding="utf-8").splitlines()[:4]
    assert any("as measured at the commits named" in line and "results table" in line for line in first_lines)
