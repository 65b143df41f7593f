"""Run the whole benchmark suite: every bench/*.py, one after another, each in its own process.

From the repository root (bench is a package; each script runs as `python -m bench.NAME`):

    python -m bench.run_all                  # everything, on the CPU  (= `make bench`)
    python -m bench.run_all --device cuda    # where a GPU is lent: scripts that take --device use it
    python -m bench.run_all --only describe_speed,search_speed

Each script writes its own JSON (bench/results/<script>.json) with its figures beside a baseline measured
in the same process, so ratios, not absolute times, carry meaning on a noisy machine. This runner also
records each script's wall time, exit status and peak resident memory (from the kernel's accounting of
that child process), and gathers everything into bench/results/<machine>-<date>.json plus a Markdown
summary beside it. A failing script is recorded and the suite goes on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from hemaclip.io import atomic_write, display_path, write_json

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# Files in bench/ that are not benchmarks, and why.
NOT_BENCHMARKS = {
    "machine": "helper that describes the machine",
    "run_all": "this runner",
    "record_training": "records a finished training run (needs its run folder); see bench/results/default_training.json",
    "stain_studies": "a study that trains models with and without stain jitter (tens of minutes); run on its own",
    "fuzz_inputs": "bad-input fuzzing (outcome counts, not speed or quality); run on its own",
    "repo_size": "a fresh clone's size at two commits (needs --before); run on its own",
    "train_segmenter": "trains the cell segmenter on the Zheng val parts (about 15 minutes on 2 cores); run on its own",
    "cell_finding_out_of_sample": "scores the weights train_segmenter wrote (needs them); run after it",
}
# Words that mark the figures worth lifting into the summary.
KEY_FIGURE = re.compile(r"ratio|speedup|per_s|recall|p50|p99|seconds|peak|mib|f1", re.IGNORECASE)


def discover() -> list[Path]:
    return sorted(p for p in BENCH_DIR.glob("*.py") if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))


def target(script: Path) -> list[str]:
    """How Python runs `script`: a bench script as its module (`-m bench.NAME`, from the repository root, so
    it imports `bench.machine` like any package), any other file by its path."""
    return ["-m", f"bench.{script.stem}"] if script.resolve().parent == BENCH_DIR else [str(script)]


def _accepts(script: Path, flag: str) -> bool:
    """Whether the script's --help lists `flag` (benchmarks are argparse scripts)."""
    try:
        text = subprocess.run([sys.executable, *target(script), "--help"], capture_output=True, text=True, timeout=120,
                              cwd=REPO).stdout
    except subprocess.TimeoutExpired:
        return False
    return flag in text


# Runs a benchmark (`-m MODULE ARGS` or `PATH ARGS`) as __main__ and, at exit, writes the process's own peak
# resident memory (VmHWM, which a new program image starts afresh, unlike the rusage high-water mark a fork
# inherits from us). `python -c` puts the working folder (the repository root) first on the import path.
_CHILD = """
import atexit, os, runpy, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(os.environ['HEMACLIP_BENCH_PEAK'], 'w').write(line.split()[1])
atexit.register(_peak)
if sys.argv[1] == '-m':
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_one(script: Path, device: str, results_dir: Path, timeout: float, log_dir: Path) -> dict[str, Any]:
    """Run one benchmark in a child process; return its status, timings, peak memory and JSON output."""
    out = results_dir / f"{script.stem}.json"
    command = target(script)
    if _accepts(script, "--out"):
        command += ["--out", str(out)]
    if device != "cpu" and _accepts(script, "--device"):
        command += ["--device", device]
    log = log_dir / f"{script.stem}.log"
    peak_file = log_dir / f"{script.stem}.peak-kib"
    peak_file.unlink(missing_ok=True)
    start = time.perf_counter()
    before = out.stat().st_mtime if out.exists() else None
    timed_out = False
    with open(log, "w") as handle:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, *command],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "HEMACLIP_BENCH_PEAK": str(peak_file)},
        )
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            timed_out = True
    seconds = time.perf_counter() - start
    peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else None
    record: dict[str, Any] = {
        "command": "python " + " ".join(display_path(c) if Path(c).is_absolute() else c for c in command),
        "exit_status": child.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak, 1) if peak is not None else None,
        "timed_out": timed_out,
        "log": display_path(log),
    }
    fresh = out.exists() and (before is None or out.stat().st_mtime > before)
    if child.returncode == 0 and fresh:
        record["result"] = json.loads(out.read_text())
    elif child.returncode == 0:
        record["note"] = f"{script.name} wrote no fresh {out.name}"
    else:
        record["log_tail"] = log.read_text(errors="replace")[-1500:]
    return record


def key_figures(payload: Any, prefix: str = "", limit: int = 14) -> list[tuple[str, Any]]:
    """Numbers whose key names say they are ratios, rates, latencies or scores, found depth-first."""
    found: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "machine":
                    continue
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node[:8]):
                label = value.get("what") or value.get("name") or value.get("model") if isinstance(value, dict) else None
                walk(value, f"{path}[{label or i}]")
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and KEY_FIGURE.search(path.rsplit(".", 1)[-1]):
            found.append((path, node))

    walk(payload, prefix)
    return found


def summary_markdown(suite: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark suite, {suite['date']} ({suite['device']})",
        "",
        f"Machine: {suite['machine'].get('cpu')}, {suite['machine'].get('cores')} cores, "
        f"{suite['machine'].get('memory_gib')} GiB, torch {suite['machine'].get('torch')}, commit {suite['machine'].get('git_commit')}.",
        "Every figure stands beside a baseline measured in the same process; compare ratios across machines, not times.",
        "",
        "| benchmark | status | wall s | peak RSS MiB |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, record in suite["benchmarks"].items():
        status = "ok" if record["exit_status"] == 0 else ("timed out" if record.get("timed_out") else f"failed ({record['exit_status']})")
        lines.append(f"| {name} | {status} | {record['seconds']} | {record['peak_rss_mib']} |")
    for name, record in suite["benchmarks"].items():
        if "result" not in record:
            continue
        lines += ["", f"## {name}", ""]
        what = record["result"].get("what")
        if what:
            lines += [str(what), ""]
        for path, value in key_figures(record["result"]):
            lines.append(f"- `{path}`: {value}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; passed to scripts that take --device")
    parser.add_argument("--only", default="", help="comma-separated script names (without .py) to run")
    parser.add_argument("--skip", default="", help="comma-separated script names to leave out")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per script")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="folder for the JSON results")
    args = parser.parse_args()

    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    scripts = [s for s in discover() if (not only or s.stem in only) and s.stem not in skip]
    unknown = (only | skip) - {s.stem for s in discover()}
    if unknown:
        print(f"error: no benchmark named {', '.join(sorted(unknown))} in {BENCH_DIR}", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    log_dir = args.results / "logs"
    log_dir.mkdir(exist_ok=True)

    machine = machine_info()
    suite: dict[str, Any] = {
        "what": "hemaclip benchmark suite (python -m bench.run_all)",
        "date": date.today().isoformat(),
        "device": args.device,
        "machine": machine,
        "not_benchmarks": NOT_BENCHMARKS,
        "benchmarks": {},
    }
    for i, script in enumerate(scripts, 1):
        print(f"[{i}/{len(scripts)}] {script.name} ...", flush=True)
        record = run_one(script, args.device, args.results, args.timeout, log_dir)
        suite["benchmarks"][script.stem] = record
        print(f"    exit {record['exit_status']} in {record['seconds']} s, peak {record['peak_rss_mib']} MiB", flush=True)

    tag = "cuda" if args.device.startswith("cuda") else f"cpu{machine.get('cores')}"
    stem = f"{tag}-{suite['date']}"
    write_json(args.results / f"{stem}.json", suite)
    with atomic_write(args.results / f"{stem}.md", "w") as handle:
        handle.write(summary_markdown(suite))
    print(f"wrote {args.results / (stem + '.json')} and {args.results / (stem + '.md')}")
    return 0 if all(r["exit_status"] == 0 for r in suite["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
