"""Issue 28, items 1-4 and 15-18, through the installed `hemaclip` console script as a hostile user runs it:
honest exit codes (Ctrl+C -> 130 with one line, an incomplete `lvlm run` -> 2), a file where a folder is expected,
a damaged run config, refused runs that leave nothing behind, file names that are not UTF-8, a damaged index,
half-filled split columns and duplicate rows, the LVLM client's deadline / size limit / `choices` check, and
folder walks that say what they skipped and follow symlinked folders."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemaclip.data.attributes import ATTRIBUTE_NAMES

ENTRY_POINT = Path(sys.executable).parent / "hemaclip"
PBC_DIR = "PBC_dataset_normal_DIB"
ATTRS = {"cell_size": "big", "cell_shape": "round", "nucleus_shape": "segmented-multilobed",
         "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
         "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "small",
         "granule_colour": "pink", "granularity": "yes"}


def hemaclip(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`hemaclip ARGS` through the console script pip installed beside the interpreter."""
    if not ENTRY_POINT.is_file():
        pytest.fail(f"{ENTRY_POINT}: the hemaclip console script is not installed (pip install -e .)")
    return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line(result: subprocess.CompletedProcess, needle: str, code: int = 1) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and needle in lines[0], result.stderr


def write_pngs(folder: Path, n: int, size: int = 32, prefix: str = "cell") -> list[Path]:
    """`n` random PNGs; the seed follows the prefix, so two classes never share a picture (those are deduplicated)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(list(prefix.encode()))
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ #
# 1. exit codes
# ------------------------------------------------------------------------------------------------ #


def test_ctrl_c_during_describe_exits_130_with_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """SIGINT to a real `describe` of 300 images once its first record is out: status 130, one line saying so."""
    write_pngs(tmp_path / "cells", 300, size=64)
    proc = subprocess.Popen([str(ENTRY_POINT), "describe", str(tmp_path / "cells"), "--checkpoint", str(tiny_checkpoint),
                             "--index", "none", "--json", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            # as in a terminal: an ignored SIGINT is inherited across exec, and an earlier test of the
                            # suite may leave this process ignoring it (the child then never sees Ctrl+C)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()  # the run is under way
        assert first.startswith("{"), first
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    records = 1 + rest.count("\n")
    assert records < 300, "the run finished before the interrupt; the test needs a longer workload"
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    interrupted = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(interrupted) == 1 and stderr.strip().splitlines()[-1] == interrupted[0], stderr


# A tiny OpenAI-compatible server on 127.0.0.1 that misbehaves in one chosen way; how each case is run: through
# the console script, or through the same `hemaclip.cli.main` in this process (no interpreter start-up).
MODES = {"always500": "entry point", "rate_limit": "in process", "malformed": "in process", "no_choices": "in process",
         "drip": "entry point", "huge": "in process"}


class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "always500"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.requests += 1  # type: ignore[attr-defined]
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode in ("always500", "rate_limit"):
            body = b'{"error": "try later"}'
            self.send_response(500 if mode == "always500" else 429)
            if mode == "rate_limit":
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if mode == "drip":  # headers, then a byte every 0.3 s for a minute: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            for _ in range(200):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.3)
            return
        body = {"malformed": b"{not json", "no_choices": b'{"id": "x", "object": "chat.completion"}',
                "huge": b'{"choices": [{"message": {"content": "' + b"a" * 3_000_000 + b'"}}]}'}[mode]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if mode != "huge":  # the huge answer declares no length: the client must count while it reads
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def bad_server() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.mode = "always500"  # type: ignore[attr-defined]
    server.requests = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def one_cell_sample(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.lvlm.runner import Cell, write_cells

    image = sorted((data_root / PBC_DIR / "basophil").iterdir())[0]
    path = tmp_path_factory.mktemp("lvlm-sample") / "sample.csv"
    write_cells(path, [Cell(index=0, path=image, rel=f"{PBC_DIR}/basophil/{image.name}", label="basophil", split="test",
                            image_sha1=file_sha1(image))])
    return path


@pytest.mark.parametrize("mode", MODES)
def test_incomplete_lvlm_run_exits_2(mode: str, bad_server: _Server, one_cell_sample: Path, data_root: Path, tmp_path: Path,
                                     main_in_process) -> None:
    bad_server.mode = mode  # type: ignore[attr-defined]
    args = ("lvlm", "run", "--endpoint", f"http://127.0.0.1:{bad_server.server_address[1]}/v1", "--model", "m",
            "--out", str(tmp_path / "run"), "--sample", str(one_cell_sample), "--data", str(data_root),
            "--max-retries", "0", "--timeout", "1.5", "--max-response-mb", "1")
    start = time.monotonic()
    if MODES[mode] == "entry point":
        result = hemaclip(*args, cwd=tmp_path)
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        code, stdout, stderr = main_in_process(*args)
    elapsed = time.monotonic() - start
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stderr and "incomplete" in stdout
    answers = [json.loads(line) for line in (tmp_path / "run" / "answers" / "zero-shot.jsonl").read_text().splitlines()]
    assert [a["status"] for a in answers] == ["failed"]
    expected = {"always500": "HTTP 500", "rate_limit": "HTTP 429", "malformed": "not JSON", "no_choices": "without 'choices'",
                "drip": "timed out after 1.5 s", "huge": "larger than 1048576 bytes"}[mode]
    assert expected in answers[0]["error"], answers[0]
    if mode == "drip":  # one whole-request deadline, not 1.5 s per dripped byte
        assert elapsed < 30, elapsed


def test_no_choices_is_not_cached_and_budget_spent_exits_2(bad_server: _Server, one_cell_sample: Path, data_root: Path,
                                                           tmp_path: Path) -> None:
    """A 200 without `choices` is retried (not an answer, so nothing is cached); a spent budget is incomplete too."""
    from hemaclip.tasks.lvlm.cache import CACHE_FILE

    bad_server.mode = "no_choices"  # type: ignore[attr-defined]
    common = ("lvlm", "run", "--endpoint", f"http://127.0.0.1:{bad_server.server_address[1]}/v1", "--model", "m",
              "--out", str(tmp_path / "run"), "--sample", str(one_cell_sample), "--data", str(data_root), "--timeout", "5")
    first = hemaclip(*common, "--max-retries", "1", cwd=tmp_path)
    assert first.returncode == 2 and bad_server.requests == 2, (first.stdout, first.stderr)  # type: ignore[attr-defined]
    cache = tmp_path / "run" / CACHE_FILE
    if cache.exists():  # its table of answers holds none
        import sqlite3

        con = sqlite3.connect(cache)
        try:
            assert con.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0
        finally:
            con.close()
    spent = hemaclip(*common, "--max-requests", "0", cwd=tmp_path)
    assert spent.returncode == 2 and "1 not sent" in spent.stdout, (spent.stdout, spent.stderr)


def test_timeout_must_be_finite_and_positive(tmp_path: Path, main_in_process) -> None:
    args = ("lvlm", "run", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "run"), "--timeout")
    result = hemaclip(*args, "nan", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result)[-1].startswith("Error: Invalid value for '--timeout'"), result.stderr
    for value in ("inf", "-inf", "0", "-1"):
        code, _, stderr = main_in_process(*args, value)
        assert code == 2 and stderr.strip().splitlines()[-1].startswith("Error: Invalid value for '--timeout'"), (value, stderr)
    code, _, stderr = main_in_process(*args[:-1], "--max-response-mb", "nan")
    assert code == 2 and "'--max-response-mb'" in stderr
    assert not (tmp_path / "run").exists()


def test_usage_and_user_errors_keep_their_codes(tmp_path: Path) -> None:
    assert hemaclip("describe", "--nosuch", cwd=tmp_path).returncode == 2
    assert_one_line(hemaclip("export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x"), cwd=tmp_path),
                    "nope.pt")
    assert hemaclip("--version", cwd=tmp_path).returncode == 0


# ------------------------------------------------------------------------------------------------ #
# 2. a file where a folder is expected; 3. damaged run config, refused runs leave nothing
# ------------------------------------------------------------------------------------------------ #


def test_a_file_where_a_folder_is_expected_is_one_line(tiny_checkpoint: Path, tmp_path: Path, main_in_process) -> None:
    """Two through the console script, all seven through `hemaclip.cli.main` in this process."""
    image = write_pngs(tmp_path / "cells", 1)[0]
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    ckpt = ("--checkpoint", str(tiny_checkpoint))
    cases = {
        "describe --saliency": ("describe", str(image), *ckpt, "--index", "none", "--saliency", str(blocker)),
        "review --out": ("review", str(image.parent), *ckpt, "--out", str(blocker)),
        "index build --out": ("index", "build", "--data", str(tmp_path / "cells"), *ckpt, "--out", str(blocker)),
        "evaluate --out": ("evaluate", *ckpt, "--out", str(blocker)),
        "export --out": ("export", *ckpt, "--out", str(blocker / "below")),
        "lvlm run --out": ("lvlm", "run", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(blocker)),
        "train --out": ("train", "--config", "tiny", "--out", str(blocker)),
    }
    for name in ("describe --saliency", "lvlm run --out"):
        assert_one_line(hemaclip(*cases[name], cwd=tmp_path), "not a folder")
    for name, args in cases.items():
        code, _, stderr = main_in_process(*args)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 1 and "Traceback" not in stderr, (name, stderr)
        assert lines[-1].startswith("error: ") and "not a folder" in lines[-1] and str(blocker) in lines[-1], (name, stderr)
    assert blocker.read_text() == "a file, not a folder\n"


def test_resume_with_damaged_config_is_one_line(tmp_path: Path, main_in_process) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"train": {"epochs": 2,')  # cut short
    (run / "last.pt").write_bytes(b"")
    assert_one_line(hemaclip("train", "--out", str(run), "--resume", cwd=tmp_path), "config.json")
    (run / "config.json").write_text('["not", "a", "run", "config"]')
    code, _, stderr = main_in_process("train", "--out", str(run), "--resume")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "config.json" in stderr, stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "last.pt"]


@pytest.mark.slow  # 16-19 s here: two real runs through the console script
def test_refused_training_leaves_nothing_behind(tmp_path: Path) -> None:
    """A folder training refused after its split was drawn (too few images for a batch) leaves no run.log,
    config.json or splits/; a refused --resume leaves no folder."""
    for cls in ("lymphocyte", "neutrophil"):
        write_pngs(tmp_path / "cells" / cls, 5, prefix=cls)
    run = tmp_path / "run"
    result = hemaclip("train", "--config", "tiny", "--out", str(run), "--data", str(tmp_path / "cells"),
                      "--set", "dataset=folder", "--set", "val_dataset=folder", "--set", "batch_size=64", cwd=tmp_path)
    assert_one_line(result, "training images")
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    result = hemaclip("train", "--config", "tiny", "--out", str(kept), "--data", str(tmp_path / "cells"),
                      "--set", "dataset=folder", "--set", "val_dataset=folder", "--set", "batch_size=64", cwd=tmp_path)
    assert result.returncode == 1
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    assert_one_line(hemaclip("train", "--out", str(tmp_path / "nothing"), "--resume", cwd=tmp_path), "nothing to resume")
    assert not (tmp_path / "nothing").exists()


# ------------------------------------------------------------------------------------------------ #
# 4. file names that are not UTF-8
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture
def latin1_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cells" / "lymphocyte"
    write_pngs(folder, 2)
    odd = os.path.join(os.fsencode(folder), b"caf\xe9 cell.png")  # Latin-1 bytes: not valid UTF-8
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(os.fsdecode(odd))
    return tmp_path / "cells"


@pytest.mark.slow  # 16-19 s here: two real runs through the console script
def test_review_takes_a_file_name_that_is_not_utf8(tiny_checkpoint: Path, latin1_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "review"
    first = hemaclip("review", str(latin1_folder), "--checkpoint", str(tiny_checkpoint), "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    assert first.stdout.startswith("3 cells"), first.stdout
    assert "caf\\xe9 cell.png" in (out / "cells.csv").read_text()
    again = hemaclip("review", str(latin1_folder), "--checkpoint", str(tiny_checkpoint), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("3 cells"), again.stderr
    from hemaclip.tasks.review import REVIEW_STORE, ReviewStore

    store = ReviewStore(out / REVIEW_STORE)
    try:
        assert store.meta()["reused"] == 3  # the odd name was found again: not described twice
    finally:
        store.close()


def test_index_build_takes_a_file_name_that_is_not_utf8(tiny_checkpoint: Path, latin1_folder: Path, tmp_path: Path) -> None:
    from hemaclip.tasks.index import CellIndex

    out = tmp_path / "cells.index"
    result = hemaclip("index", "build", "--data", str(latin1_folder), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                      cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    index = CellIndex.load(out)
    paths = [index.image_path(row) for row in range(len(index))]
    assert len(paths) == 3 and all(p.is_file() for p in paths)  # the odd name is found again on disk
    odd = next(p for p in paths if os.fsencode(p.name) == b"caf\xe9 cell.png")
    assert index.row_for_path(odd) is not None


# ------------------------------------------------------------------------------------------------ #
# 15. a damaged index
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture(scope="module")
def small_index(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hemaclip.cache import file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.tasks.index import CellIndex

    root = tmp_path_factory.mktemp("index-src")
    for cls in ("lymphocyte", "neutrophil"):
        write_pngs(root / "cells" / cls, 40, prefix=cls)
    model, _ = load_for_inference(tiny_checkpoint)
    records = load_dataset("folder", folder=root / "cells").records
    CellIndex.build(model, records, root / "cells.index", checkpoint_id=file_sha1(tiny_checkpoint), kind="flat",
                    progress=False, checkpoint_path=tiny_checkpoint).close()
    return root / "cells.index"


def _copy_index(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_corrupt_page_in_index_metadata_is_one_line(small_index: Path, tmp_path: Path) -> None:
    """The page of the label index overwritten: opening and counting rows still work, `index info` (which groups
    by label) used to die with a DatabaseError traceback."""
    import sqlite3

    index = _copy_index(small_index, tmp_path / "damaged.index")
    meta = index / "meta.sqlite"
    con = sqlite3.connect(meta)
    try:
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'by_label'").fetchone()
    finally:
        con.close()
    with meta.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xa5" * page_size)
    assert_one_line(hemaclip("index", "info", str(index), cwd=tmp_path), "meta.sqlite")


def test_nan_embeddings_are_refused_and_search_never_prints_nan(small_index: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    index = _copy_index(small_index, tmp_path / "nan.index")
    embeddings = np.load(index / "embeddings.npy")
    embeddings[5] = np.nan
    np.save(index / "embeddings.npy", embeddings)  # same shape, same dtype
    result = hemaclip("search", "round nucleus", "--index", str(index), "--checkpoint", str(tiny_checkpoint), "--json", cwd=tmp_path)
    assert_one_line(result, "row 5")
    assert "NaN" not in result.stdout
    assert_one_line(hemaclip("index", "info", str(index), cwd=tmp_path), "embeddings.npy")


def test_search_refuses_a_nan_query(small_index: Path) -> None:
    from hemaclip.errors import HemaclipError
    from hemaclip.tasks.index import CellIndex

    index = CellIndex.load(small_index)
    query = np.full((1, index.dim), np.nan, np.float32)
    with pytest.raises(HemaclipError, match="NaN"):
        index.search(query, k=3)


# ------------------------------------------------------------------------------------------------ #
# 16. attributes.csv: half-filled split column, duplicate rows
# ------------------------------------------------------------------------------------------------ #


def _folder_with_csv(root: Path, rows: list[dict[str, str]]) -> Path:
    import csv

    for cls in ("lymphocyte", "neutrophil"):
        write_pngs(root / cls, 4, prefix=cls)
    with (root / "attributes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["img_name", *ATTRIBUTE_NAMES, "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _rows(split_of: dict[str, str]) -> list[dict[str, str]]:
    names = [f"{cls}{i:04d}.png" for cls in ("lymphocyte", "neutrophil") for i in range(4)]
    return [{"img_name": n, **ATTRS, "split": split_of.get(n, "")} for n in names]


def test_split_column_filled_for_some_rows_is_refused(tmp_path: Path) -> None:
    root = _folder_with_csv(tmp_path / "cells", _rows({"lymphocyte0000.png": "test", "neutrophil0000.png": "train"}))
    result = hemaclip("data", "check", "--dataset", "folder", "--data", str(root), cwd=tmp_path)
    assert_one_line(result, "'split' column is filled for 2 of 8 images")
    assert "line 3" in result.stderr  # the first row without a split (line 2 is lymphocyte0000.png)


def test_full_or_empty_split_column_is_accepted(tmp_path: Path) -> None:
    from hemaclip.data.datasets import load_dataset

    names = [f"{cls}{i:04d}.png" for cls in ("lymphocyte", "neutrophil") for i in range(4)]
    full = _folder_with_csv(tmp_path / "full", _rows({n: "test" if n.endswith("0.png") else "train" for n in names}))
    loaded = load_dataset("folder", folder=full)
    assert {r.path.name: r.split for r in loaded.records}["lymphocyte0000.png"] == "test"
    empty = _folder_with_csv(tmp_path / "empty", _rows({}))
    assert len(load_dataset("folder", folder=empty).records) == 8


def test_duplicate_rows_are_refused(tmp_path: Path) -> None:
    rows = _rows({})
    root = _folder_with_csv(tmp_path / "cells", [*rows, dict(rows[1])])
    result = hemaclip("data", "check", "--dataset", "folder", "--data", str(root), cwd=tmp_path)
    assert_one_line(result, "lymphocyte0001.png")
    assert "line 3" in result.stderr and f"{root / 'attributes.csv'}:{len(rows) + 2}" in result.stderr


# ------------------------------------------------------------------------------------------------ #
# 18. folder walks: say what was skipped, follow symlinked folders (no loop)
# ------------------------------------------------------------------------------------------------ #


@pytest.fixture
def linked_tree(tmp_path: Path) -> Path:
    """cells/: two PNGs, a GIF, an extension-less PNG, a symlink to a folder of three PNGs elsewhere, and a
    link back to cells/ itself (a loop)."""
    root = tmp_path / "cells"
    write_pngs(root, 2)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "anim.gif")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "noext", format="PNG")
    write_pngs(tmp_path / "elsewhere", 3, prefix="linked")
    (root / "export").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "export" / "loop").symlink_to(root, target_is_directory=True)
    return root


def test_walk_follows_symlinked_folders_and_says_what_it_skipped(linked_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from hemaclip.tasks.describe import iter_image_paths

    package = logging.getLogger("hemaclip")  # the CLI's setup stops propagation to the root logger caplog watches
    package.addHandler(caplog.handler)
    try:
        found = list(iter_image_paths([linked_tree]))
    finally:
        package.removeHandler(caplog.handler)
    assert sorted(p.name for p in found) == ["cell0000.png", "cell0001.png", "linked0000.png", "linked0001.png", "linked0002.png"]
    notes = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(notes) == 1 and "skipped 2 file(s)" in notes[0] and "anim.gif" in notes[0] and "noext" in notes[0], notes


def test_describe_reports_skipped_files_and_reads_linked_folders(tiny_checkpoint: Path, linked_tree: Path, tmp_path: Path) -> None:
    result = hemaclip("describe", str(linked_tree), "--checkpoint", str(tiny_checkpoint), "--index", "none", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sources = [Path(json.loads(line)["source"]).name for line in result.stdout.splitlines()]
    assert sorted(sources) == ["cell0000.png", "cell0001.png", "linked0000.png", "linked0001.png", "linked0002.png"]
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "anim.gif" in skipped[0] and "noext" in skipped[0], result.stderr


def test_folder_dataset_says_what_it_skipped(tmp_path: Path) -> None:
    write_pngs(tmp_path / "cells" / "lymphocyte", 2)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "cells" / "lymphocyte" / "anim.gif")
    result = hemaclip("data", "check", "--dataset", "folder", "--data", str(tmp_path / "cells"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "skipped 1 file(s)" in line and "anim.gif" in line], result.stderr
