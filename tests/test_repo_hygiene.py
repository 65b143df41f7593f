"""What a clone of the repository holds: Python files that import by package, never by editing the import path
(bench is a package run as `python -m bench.NAME`), and no generated HTML reports (rendered on demand)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# sys.path.insert / .append / .extend, or an assignment to sys.path (or a slice of it).
PATH_EDIT = re.compile(r"\bsys\.path\s*(?:\.\s*(?:insert|append|extend)\s*\(|(?:\[[^\]]*\])?\s*\+?=(?!=))")


def repository_files(*patterns: str) -> list[Path]:
    """Files a clone holds plus new files not ignored (what the next commit could add), matching `patterns`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *patterns],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    return [REPO / name for name in listed if name and (REPO / name).is_file()]


def path_edits(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if PATH_EDIT.search(line)]


def test_the_path_edit_pattern_finds_each_form_and_nothing_else() -> None:
    sp = "sys" + ".path"  # spelt in two pieces so that this file passes its own check
    edits = [f"{sp}.insert(0, str(BENCH))", f"{sp}.append('x')", f"{sp}.extend(paths)", f"{sp} = ['a']",
             f"{sp}[0:0] = [here]", f"{sp} += [here]"]
    assert path_edits("\n".join(edits)) == edits
    assert path_edits(f"if {sp} == before:\n    print({sp}[0])\nnot_{sp}_insert = 1") == []


def test_no_python_file_edits_the_import_path() -> None:
    files = repository_files("*.py")
    assert len(files) > 100 and any(f.parent.name == "bench" for f in files)
    found = {str(f.relative_to(REPO)): edits for f in files if (edits := path_edits(f.read_text(encoding="utf-8", errors="replace")))}
    assert found == {}


def test_bench_scripts_run_as_modules_of_the_bench_package() -> None:
    """`python -m bench.run_all --help` from the repository root imports bench.machine like any package."""
    assert (REPO / "bench" / "__init__.py").is_file()
    result = subprocess.run([sys.executable, "-m", "bench.run_all", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "python -m bench.run_all" in result.stdout


def test_no_generated_html_report_is_committed_or_addable() -> None:
    assert repository_files("reports/*.html") == []  # git's pathspec '*' also crosses '/'
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", "reports/some-run/report.html"], cwd=REPO)
    assert ignored.returncode == 0, "reports/**/*.html is not in .gitignore"
    assert repository_files("reports/*/metrics.json"), "the reports' metrics.json stay committed"


def test_clone_size_counts_what_a_clone_of_each_commit_holds(tmp_path: Path) -> None:
    """bench/repo_size.py on a two-commit repository: a committed 5,000-byte HTML report, then removed. The working
    tree loses exactly its bytes; the second clone's .git still holds its blob (history keeps it)."""
    from bench.repo_size import clone_size

    repo = tmp_path / "repo"
    (repo / "reports" / "r").mkdir(parents=True)
    (repo / "reports" / "r" / "metrics.json").write_text("{}\n")
    (repo / "reports" / "r" / "report.html").write_bytes(bytes(range(256)) * 19 + bytes(136))  # 5,000 bytes
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "with html"], cwd=repo, check=True)
    subprocess.run([*git, "rm", "-q", "--cached", "reports/r/report.html"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "without html"], cwd=repo, check=True)
    before, after = clone_size(repo, "HEAD~1"), clone_size(repo, "HEAD")
    assert (before["committed_html_reports"], after["committed_html_reports"]) == (1, 0)
    assert (before["working_tree_files"], after["working_tree_files"]) == (2, 1)
    assert before["working_tree_bytes"] - after["working_tree_bytes"] == 5000
    assert after["git_dir_bytes"] > before["git_dir_bytes"] - 1000  # the blob stays in the history (its index is a line shorter)
