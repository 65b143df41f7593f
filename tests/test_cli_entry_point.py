"""Usage errors through the installed `hemaclip` entry point (the console script pip writes beside the
interpreter), not the in-process runner: typer >= 0.29 raises its own copies of click's exceptions, which
only the real `hemaclip.cli:main` sees. Each must give the usage line, a help hint and one error line
(at most 3 lines on stderr), no traceback, and exit status 2, as click does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The console script of the interpreter running the tests (the project's venv locally, CI's fresh venv).
ENTRY_POINT = Path(sys.executable).parent / "hemaclip"

USAGE_ERRORS = {
    "unknown command": (["nosuch"], "No such command 'nosuch'"),
    "unknown option": (["describe", "--nosuch"], "No such option: --nosuch"),
    "missing --out (evaluate)": (["evaluate"], "Missing option '--out'"),
    "missing --out (index build)": (["index", "build", "--dataset", "wbcatt"], "Missing option '--out'"),
    "serve --port abc": (["serve", "--port", "abc"], "'--port'"),
    "serve --port 0": (["serve", "--port", "0"], "'--port'"),
    "index build --shard-size 0": (["index", "build", "--out", "x.index", "--shard-size", "0"], "'--shard-size'"),
    "evaluate --n-boot 50": (["evaluate", "--out", "report", "--n-boot", "50"], "'--n-boot'"),
}


def run_entry_point(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.is_file():
        pytest.fail(f"{ENTRY_POINT}: the hemaclip console script is not installed beside {sys.executable} (pip install -e .)")
    return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "COLUMNS": "80"})


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_three_lines_and_exit_2(case: str, tmp_path: Path) -> None:
    args, needle = USAGE_ERRORS[case]
    result = run_entry_point(*args, cwd=tmp_path)
    lines = result.stderr.rstrip("\n").splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert 1 <= len(lines) <= 3, result.stderr
    assert lines[-1].startswith("Error: ") and needle in lines[-1], result.stderr
    assert lines[0].startswith("Usage: hemaclip")
    assert list(tmp_path.iterdir()) == []  # nothing was started, so nothing was written


def test_user_error_is_still_one_line_and_exit_1(tmp_path: Path) -> None:
    result = run_entry_point("export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "nope.pt" in result.stderr and "Traceback" not in result.stderr


def test_bare_command_prints_help(tmp_path: Path) -> None:
    result = run_entry_point(cwd=tmp_path)
    assert result.returncode == 2 and "Usage" in result.stdout and "Traceback" not in result.stderr


def test_starting_the_command_line_imports_neither_torch_nor_the_trainer() -> None:
    """`hemaclip --help` and every usage error must answer at once: loading the command table must not import
    PyTorch, torchvision or the trainer (a command imports what it needs when it runs). A module-level import of
    a study in one command once made every start take 10 s on 2 cores."""
    code = "import sys, hemaclip.cli; print(sorted(m for m in ('torch', 'torchvision', 'hemaclip.train.trainer') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported at start-up: {result.stdout.strip()}"


def test_calibrate_with_an_unknown_unfamiliarity_score_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """The score's name is checked before any work: one error line, exit 1, the shipped sidecars untouched."""
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.familiarity import familiarity_path

    sidecar = familiarity_path(resolve_checkpoint(None))
    before = sidecar.stat().st_mtime_ns
    result = run_entry_point("calibrate", "--unfamiliarity", "nearest", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: unknown unfamiliarity score 'nearest'; choose from knn, mahalanobis"]
    assert sidecar.stat().st_mtime_ns == before and not any(tmp_path.iterdir())


BAD_DESCRIBE_CHOICES = {
    "unknown adaptation": (["--adapt", "tent"], "error: unknown adaptation 'tent' (choose none, bn, entropy)"),
    "unknown class": (["--classes", "lymphocyte,blast"],
                      "error: unknown class(es) blast: the model reads basophil, eosinophil, erythroblast, ig, lymphocyte, "
                      "monocyte, neutrophil, platelet"),
}


@pytest.mark.parametrize("args, line", list(BAD_DESCRIBE_CHOICES.values()), ids=list(BAD_DESCRIBE_CHOICES))
def test_describe_with_an_unknown_choice_is_one_line_naming_the_choices(tmp_path: Path, args: list[str], line: str) -> None:
    """--adapt and --classes are checked before any image is read: one error line naming what can be chosen, exit 1,
    nothing written."""
    from PIL import Image

    folder = tmp_path / "cells"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 150, 180)).save(folder / "cell.png")
    result = run_entry_point("describe", str(folder), "--json", "--index", "none", *args, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [line]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells"]
