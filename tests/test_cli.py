"""The command line as a user meets it: help that teaches, the shipped model, export, and the demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hemaclip.models.default import default_checkpoint_path


ENTRY_POINT = Path(sys.executable).with_name("hemaclip")  # the installed console script, as a user runs it


def _help(*command: str) -> list[str]:
    """`hemaclip COMMAND --help` through the installed entry point, wide enough that no line wraps."""
    result = subprocess.run([str(ENTRY_POINT), *command, "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("command", [["train"], ["data", "summary"], ["captions"], ["export"], ["demo"]])
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    """Besides the usage line, the help shows the command run with at least one option (an example to copy)."""
    lines = _help(*command)
    words = " ".join(command)
    assert any(line.strip().startswith(f"Usage: hemaclip {words} [OPTIONS]") for line in lines), "\n".join(lines)
    example = re.compile(rf"\bhemaclip(?:\.cli)? {re.escape(words)} --?\w")
    assert any(example.search(line) for line in lines if "Usage:" not in line), "\n".join(lines)


def test_top_level_help_lists_every_command() -> None:
    from hemaclip.cli import app

    lines = _help()
    assert any(line.strip().startswith("Usage: hemaclip [OPTIONS] COMMAND") for line in lines), "\n".join(lines)
    names = [c.name for c in app.registered_commands if c.hidden is not True] + \
            [g.name for g in app.registered_groups if g.hidden is not True]
    listed = {line.strip("│ ").split(" ")[0] for line in lines if line.startswith("│ ")}
    assert len(names) > 10 and set(names) <= listed, sorted(set(names) - listed)


def test_the_default_model_is_shipped_and_small() -> None:
    path = default_checkpoint_path()
    assert path.stat().st_size < 25 * 2**20


def test_missing_checkpoint_is_a_one_line_error(tmp_path: Path, run_cli) -> None:
    result = run_cli("export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "nope.pt" in result.stderr


@pytest.mark.slow
def test_bad_set_option_is_a_one_line_error(tmp_path: Path, run_cli) -> None:
    result = run_cli("train", "--config", "tiny", "--out", str(tmp_path / "r"), "--set", "no_such_option=1")
    assert result.returncode == 1 and "no_such_option" in result.stderr


@pytest.mark.slow
def test_demo_reads_real_cells_with_the_shipped_model(data_root: Path, tmp_path: Path, run_cli) -> None:
    # --no-reference skips embedding the 6,169 reference cells (minutes); the demo index is 20 cells.
    out = tmp_path / "demo"
    result = run_cli("demo", "--data", str(data_root), "-n", "1", "--index-size", "20", "--no-reference", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "describe real WBCAtt test cells" in result.stdout
    assert result.stdout.count("/11") >= 5
    assert "hits annotated" in " ".join(result.stdout.split())
    assert (out / "report.html").is_file() and (out / "search-results.png").is_file()
