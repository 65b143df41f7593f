"""Size of a fresh clone of the repository at given commits: the working tree a clone checks out and its .git.

For each commit a new repository fetches that commit alone from this one (so its .git holds exactly the history
reachable from it, packed as a clone would) and checks it out. Sizes are the files' apparent bytes (`du -sb`
counts folders too, so it reads a little higher). Compare a commit before generated HTML left the repository
with one after: the working tree shrinks; .git does not, since history keeps the old blobs.

    python -m bench.repo_size --before 9942365 --after HEAD     # writes bench/results/repo_size.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from hemaclip.io import write_json

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def tree_bytes(folder: Path, skip: str | None = None) -> tuple[int, int]:
    """Apparent bytes and number of the regular files under `folder`, leaving out the top-level entry `skip`."""
    total = count = 0
    for root, dirs, files in os.walk(folder):
        if skip is not None and Path(root) == folder and skip in dirs:
            dirs.remove(skip)
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
                count += 1
    return total, count


def clone_size(repo: Path, commit: str) -> dict[str, Any]:
    """A fresh single-commit clone of `repo` at `commit`: its working tree and its .git, in bytes and MiB."""
    sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}", cwd=repo)
    with tempfile.TemporaryDirectory(prefix="hemaclip-clone-") as tmp:
        clone = Path(tmp)
        _git("init", "-q", cwd=clone)
        _git("fetch", "-q", "--no-tags", str(repo), sha, cwd=clone)
        _git("checkout", "-q", "FETCH_HEAD", cwd=clone)
        work, files = tree_bytes(clone, skip=".git")
        git, _ = tree_bytes(clone / ".git")
        html = [n for n in _git("ls-files", "reports", cwd=clone).splitlines() if n.endswith(".html")]
    return {"commit": sha[:10], "working_tree_bytes": work, "working_tree_mib": round(work / MIB, 1), "working_tree_files": files,
            "git_dir_bytes": git, "git_dir_mib": round(git / MIB, 1), "total_mib": round((work + git) / MIB, 1),
            "committed_html_reports": len(html)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="commit before the change (e.g. the last one with HTML reports)")
    parser.add_argument("--after", default="HEAD", help="commit after it (default HEAD)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "repo_size.json")
    args = parser.parse_args()
    from bench.machine import machine_info  # imports torch: only when run

    before, after = clone_size(REPO, args.before), clone_size(REPO, args.after)
    result = {
        "what": "size of a fresh clone (working tree and .git) before and after generated HTML reports left the repository",
        "date": date.today().isoformat(),
        "machine": machine_info(),
        "method": "per commit: git init + git fetch <commit> from this repository + checkout; apparent bytes of regular files",
        "before": before,
        "after": after,
        "working_tree_saved_mib": round((before["working_tree_bytes"] - after["working_tree_bytes"]) / MIB, 1),
        "git_dir_change_mib": round((after["git_dir_bytes"] - before["git_dir_bytes"]) / MIB, 1),
        "note": "history keeps the removed HTML blobs, so .git does not shrink; only rewriting history would remove them",
    }
    write_json(args.out, result)
    print(f"before {before['commit']}: tree {before['working_tree_mib']} MiB, .git {before['git_dir_mib']} MiB; "
          f"after {after['commit']}: tree {after['working_tree_mib']} MiB, .git {after['git_dir_mib']} MiB -> {args.out}")


if __name__ == "__main__":
    main()
