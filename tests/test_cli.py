"""The command line as a user meets it: help that teaches, the shipped model, export, and the demo."""

from __future__ import annotations

from pathlib import Path

import pytest

from hemaclip.models.default import default_checkpoint_path


@pytest.mark.parametrize("command", [[], ["train"], ["data", "summary"], ["captions"], ["export"], ["demo"]])
def test_every_command_has_help_with_an_example(command: list[str], run_cli) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    if command:
        assert "Example" in result.stdout or "hemaclip" in result.stdout


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
