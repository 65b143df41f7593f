"""One source per figure (issue 27): every measured figure of the README is rendered from a committed JSON by
scripts/render_docs.py, and its --check fails when a figure drifts from its source, loses it, or has none."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "render_docs.py"
README = ROOT / "README.md"
CHANGED_SOURCE = "bench/results/eval_default.json"
CHANGED_KEY = "metrics.test_zs_class_macro_f1"


def load_script() -> ModuleType:
    """The script as a module (it lives outside the package, so it is loaded from its file, not from sys.path)."""
    spec = importlib.util.spec_from_file_location("render_docs", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


render_docs = load_script()


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    """README.md and every JSON it cites, at the same relative paths, in a tmp folder."""
    text = README.read_text(encoding="utf-8")
    sources = {m["source"] for m in render_docs.MARKER.finditer(text)}
    for source in sources:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / source, tmp_path / source)
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    return tmp_path / "README.md"


def set_value(path: Path, key: str, value: float) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    *parents, last = key.split(".")
    holder = data
    for name in parents:
        holder = holder[name]
    holder[last] = value
    path.write_text(json.dumps(data), encoding="utf-8")


def test_the_readme_figures_match_their_committed_sources() -> None:
    result = run("--check")
    assert result.returncode == 0, result.stderr
    _, problems, count = render_docs.render(README)
    assert problems == [] and count >= 40  # the results tables are rendered, not typed
    text = README.read_text(encoding="utf-8")
    assert "<!-- onboarding table: lead fills -->" not in text  # the onboarding table is rendered from its JSON
    # the onboarding table (3 labs x 7 figures from the study's curve and the fine-tune bench) is rendered, not typed
    onboarding = text[text.index("### Onboarding a new lab"):text.index("### Trust")]
    assert onboarding.count("reports/other-labs/onboarding/onboarding.json :: headline.") >= 9
    assert onboarding.count("bench/results/lab_finetune.json :: by_n.") >= 15


def test_a_changed_json_value_fails_the_check_and_a_render_fixes_it(copy: Path) -> None:
    assert run("--check", copy).returncode == 0  # the copy is complete: only the change below can fail it
    written = next(m["text"] for m in render_docs.MARKER.finditer(copy.read_text(encoding="utf-8")) if m["key"] == CHANGED_KEY)
    set_value(copy.parent / CHANGED_SOURCE, CHANGED_KEY, 0.5)
    result = run("--check", copy)
    assert result.returncode == 1
    assert f"{CHANGED_SOURCE} :: {CHANGED_KEY}: the page says {written!r}, the source gives '0.500'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # that figure only
    assert run(copy).returncode == 0  # default mode rewrites the figure from its source
    assert f":: {CHANGED_KEY} :: .3f -->0.500<!-- /fig -->" in copy.read_text(encoding="utf-8")
    assert run("--check", copy).returncode == 0


@pytest.mark.parametrize("figure", ["0.912", "12 %", "7%", "**0.5**"])
def test_an_unmarked_figure_in_the_results_section_fails(copy: Path, figure: str) -> None:
    text = copy.read_text(encoding="utf-8")
    heading = "### Trust: does it know what it does not know?\n"
    copy.write_text(text.replace(heading, f"{heading}\nA hand-typed figure: {figure}.\n", 1), encoding="utf-8")
    result = run("--check", copy)
    assert result.returncode == 1
    assert "in the results section has no source marker" in result.stderr
    before = copy.read_text(encoding="utf-8")
    assert run(copy).returncode == 1 and copy.read_text(encoding="utf-8") == before  # nothing to render it from


def test_numbers_that_are_not_measured_figures_pass(copy: Path) -> None:
    """Integers, code spans, link targets and comments in the results section, and figures outside it."""
    text = copy.read_text(encoding="utf-8")
    heading = "### Trust: does it know what it does not know?\n"
    allowed = "11 attributes, `--threshold 0.7`, [a link](docs/v0.1.md), <!-- note 0.5 -->.\n"
    text = text.replace(heading, f"{heading}\n{allowed}", 1).replace("## Documentation\n", "## Documentation\n\nSpeed 116.5 img/s.\n", 1)
    copy.write_text(text, encoding="utf-8")
    assert run("--check", copy).returncode == 0, run("--check", copy).stderr


def test_a_missing_source_file_or_key_fails(copy: Path) -> None:
    text = copy.read_text(encoding="utf-8")
    copy.write_text(text.replace(f":: {CHANGED_KEY} ::", ":: metrics.no_such_key ::", 1), encoding="utf-8")
    result = run("--check", copy)
    assert result.returncode == 1 and f"{CHANGED_SOURCE} :: metrics.no_such_key: no key 'no_such_key'" in result.stderr
    (copy.parent / "bench/results/wheel_size.json").unlink()
    result = run("--check", copy)
    assert "bench/results/wheel_size.json: no such file" in result.stderr


def test_a_missing_markdown_file_is_one_line(tmp_path: Path) -> None:
    result = run("--check", tmp_path / "nothing.md")
    assert result.returncode == 1 and result.stderr.strip() == f"error: {tmp_path / 'nothing.md'}: no such file"


def test_lookup_takes_keys_with_dots_spaces_and_list_items() -> None:
    data = {"in_lab": {"pbc test": {"share": 0.047}}, "a.b": {"c": 1}, "a": {"b": 2}, "sets": [{"mean": 0.4}]}
    assert render_docs.lookup(data, "in_lab.pbc test.share") == 0.047
    assert render_docs.lookup(data, "a.b.c") == 1  # the longest key that fits
    assert render_docs.lookup(data, "sets.0.mean") == 0.4
    for bad in ("sets.1.mean", "in_lab.pbc val.share", "in_lab.pbc test.share.more"):
        with pytest.raises(render_docs.SourceError):
            render_docs.lookup(data, bad)


def test_render_value_formats_and_scales() -> None:
    assert render_docs.render_value(0.04718, "100*.1f") == "4.7"
    assert render_docs.render_value(3092, ",d") == "3,092"
    assert render_docs.render_value(0.99519, ".3f") == "0.995"
    for value, spec in ((True, ".3f"), ("0.9", ".3f"), (None, ".3f"), (0.5, "d")):
        with pytest.raises(render_docs.SourceError):
            render_docs.render_value(value, spec)
