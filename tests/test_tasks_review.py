"""`hemaclip review`: the store, resume, the differential with intervals, the queue, append-only corrections."""

from __future__ import annotations

import functools
import html
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from hemaclip.data.datasets import load_dataset
from hemaclip.errors import HemaclipError
from hemaclip.metrics.statistics import share_intervals
from hemaclip.tasks.describe import Describer
from hemaclip.tasks.review import REVIEW_STORE, ReviewStore, queue_order, review_folder, review_summary, write_review_reports


@pytest.fixture(scope="module")
def cell_folder(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 real PBC test cells (3 of each of 4 classes) copied into one flat folder."""
    test = load_dataset("wbcatt", data_root=data_root).split("test")
    folder = tmp_path_factory.mktemp("slide")
    for label in ("basophil", "eosinophil", "lymphocyte", "neutrophil"):
        for record in [r for r in test if r.label == label][:3]:
            shutil.copy(record.path, folder / Path(record.path).name)
    return folder


@pytest.fixture()
def describer(make_tiny_model, one_torch_thread) -> Describer:
    return Describer(make_tiny_model())


def test_queue_puts_unfamiliar_first_then_lowest_probability() -> None:
    cells = [
        {"id": 1, "probability": 0.99, "unfamiliar": False, "unfamiliarity": 10.0},
        {"id": 2, "probability": 0.40, "unfamiliar": False, "unfamiliarity": 20.0},
        {"id": 3, "probability": 0.95, "unfamiliar": True, "unfamiliarity": 300.0},
        {"id": 4, "probability": 0.70, "unfamiliar": None, "unfamiliarity": None},
        {"id": 5, "probability": 0.99, "unfamiliar": True, "unfamiliarity": 900.0},
    ]
    assert queue_order(cells) == [5, 3, 2, 4, 1]


def test_review_writes_differential_with_wilson_intervals_and_resumes(describer, cell_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "review"
    store = review_folder(describer, "tiny-sha", [cell_folder], out, progress=False)
    cells = store.cells()
    assert len(cells) == 12 and store.meta()["described_now"] == 12
    assert all(c["embedding"] is not None for c in store.cells(with_embeddings=True))
    assert all(store.thumbnail(c["id"])[:2] == b"\xff\xd8" for c in cells)  # JPEG thumbnails
    summary = write_review_reports(store, out)
    labels = [c["label"] for c in cells if c["label"] not in ("platelet", "erythroblast")]
    expected = share_intervals({k: labels.count(k) for k in summary["differential"]})
    assert summary["differential"] == expected
    assert summary["white_cells"] == len(labels)
    assert [q["id"] for q in summary["queue"]] == queue_order(cells)
    for name in ("review.json", "cells.csv", "report.html"):
        assert (out / name).stat().st_size > 0
    assert "Differential count" in (out / "report.html").read_text()
    assert not list(out.glob(".*.tmp"))
    store.close()

    # Running again describes nothing new and keeps the same cells.
    again = review_folder(describer, "tiny-sha", [cell_folder], out, progress=False)
    assert again.meta()["described_now"] == 0 and again.meta()["reused"] == 12
    assert [c["id"] for c in again.cells()] == [c["id"] for c in cells]
    again.close()
    # Another model may not write into the same review.
    with pytest.raises(HemaclipError, match="another model"):
        review_folder(describer, "other-sha", [cell_folder], out, progress=False)


def test_corrections_are_appended_never_overwritten_and_change_the_counts(describer, cell_folder: Path, tmp_path: Path) -> None:
    store = review_folder(describer, "tiny-sha", [cell_folder], tmp_path, progress=False)
    first = store.cells()[0]
    target = "monocyte" if first["label"] != "monocyte" else "lymphocyte"
    before = review_summary(store)["differential"][target]["count"]
    made = store.correct(first["id"], "class", target, "Ann Reviewer")
    assert made["old"] == first["label"] and made["new"] == target and made["model_sha1"] == "tiny-sha"
    store.correct(first["id"], "cytoplasm_vacuole", "yes", "Ann Reviewer")
    back = store.correct(first["id"], "class", first["label"], "Bob")  # changed again: a new row, the old one stays
    assert back["old"] == target
    assert [c["new"] for c in store.corrections()] == [target, "yes", first["label"]]
    summary = review_summary(store)
    assert summary["differential"][target]["count"] == before and summary["reviewed"] == 1
    store.correct(first["id"], "class", target, "Bob")
    assert review_summary(store)["differential"][target]["count"] == before + 1
    assert store.cells()[0]["current"]["cytoplasm_vacuole"] == "yes"
    for bad, match in (((first["id"], "class", "dragon", "Bob"), "unknown value"), ((first["id"], "colour", "red", "Bob"), "unknown field"),
                       ((first["id"], "class", target, "  "), "reviewer"), ((99999, "class", target, "Bob"), "no cell")):
        with pytest.raises(HemaclipError, match=match):
            store.correct(*bad)
    db = sqlite3.connect(tmp_path / REVIEW_STORE)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE corrections SET new = 'basophil'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM corrections")
    db.close()


def test_review_store_refuses_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(HemaclipError, match="no review store"):
        ReviewStore(tmp_path / "nothing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HemaclipError, match="not a review store"):
        ReviewStore(junk)


@pytest.mark.slow
def test_review_command_through_the_entry_point(run_cli, assert_one_line_error, tiny_checkpoint: Path, cell_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-review"
    result = run_cli("review", str(cell_folder), "--out", str(out), "--checkpoint", str(tiny_checkpoint), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "12 cells" in result.stdout and (out / "report.html").is_file()
    missing = run_cli("review", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--checkpoint", str(tiny_checkpoint))
    assert_one_line_error(missing, "no such file or folder")
    (tmp_path / "empty").mkdir()
    empty = run_cli("review", str(tmp_path / "empty"), "--out", str(tmp_path / "x"), "--checkpoint", str(tiny_checkpoint))
    assert_one_line_error(empty, "no image files")
    assert not (tmp_path / "x").exists()


def test_corrections_teach_an_adapter_that_reads_the_next_folder(describer, cell_folder: Path, tmp_path: Path) -> None:
    from hemaclip.tasks.adapter import fit_adapter_from_store

    first = review_folder(describer, "tiny-sha", [cell_folder], tmp_path / "first", progress=False)
    with pytest.raises(HemaclipError, match="no reviewed cells"):
        fit_adapter_from_store(first)
    for cell in first.cells():  # the reviewer gives each cell its true class (file-name prefix)
        truth = {"BA": "basophil", "EO": "eosinophil", "LY": "lymphocyte", "SNE": "neutrophil", "BNE": "neutrophil"}[Path(cell["source"]).name.split("_")[0]]
        first.correct(cell["id"], "class", truth, "Ann")
    adapter = fit_adapter_from_store(first)
    assert adapter.n_cells == 12
    second = review_folder(describer, "tiny-sha", [cell_folder], tmp_path / "second", progress=False, adapter=adapter, adapter_id="a1")
    cells = second.cells(with_embeddings=True)
    expected = adapter.predict(np.stack([c["embedding"] for c in cells]), np.stack([c["class_probabilities"] for c in cells]))
    assert [c["label"] for c in cells] == expected
    second.close()
    with pytest.raises(HemaclipError, match="with adapter a1"):
        review_folder(describer, "tiny-sha", [cell_folder], tmp_path / "second", progress=False)


def test_export_of_reviewed_cells_loads_as_a_folder_dataset(describer, cell_folder: Path, tmp_path: Path) -> None:
    from hemaclip.tasks.review import export_reviewed

    store = review_folder(describer, "tiny-sha", [cell_folder], tmp_path / "review", progress=False)
    cells = store.cells()
    with pytest.raises(HemaclipError, match="no reviewed white cells"):
        export_reviewed(store, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    store.correct(cells[0]["id"], "class", "monocyte", "Ann")
    store.correct(cells[1]["id"], "class", "basophil", "Ann")
    store.correct(cells[1]["id"], "granularity", "yes", "Ann")
    counts = export_reviewed(store, tmp_path / "export")
    assert counts == {"monocyte": 1, "basophil": 1}
    loaded = load_dataset("folder", folder=tmp_path / "export")
    by_name = {Path(r.path).name: r for r in loaded.records}
    assert by_name[f"cell-{cells[0]['id']}.png"].label == "monocyte"
    second = by_name[f"cell-{cells[1]['id']}.png"]
    assert second.label == "basophil" and second.attributes["granularity"] == "yes"
    assert {r.split for r in loaded.records} <= {"train", "val", "test"}
    with pytest.raises(HemaclipError, match="already exists"):
        export_reviewed(store, tmp_path / "export")


def test_a_folder_unlike_the_training_data_is_flagged_and_queued_first(describer, cell_folder: Path, tmp_path: Path) -> None:
    from hemaclip.tasks.familiarity import fit_familiarity

    # "Training data" far from these cells: embeddings clustered around one random direction.
    rng = np.random.default_rng(0)
    width = describer.model.config.embed_dim
    centre = rng.normal(size=width)
    fake = centre + 0.05 * rng.normal(size=(400, width))
    fake /= np.linalg.norm(fake, axis=1, keepdims=True)
    describer.familiarity = fit_familiarity(fake[:300], ["basophil"] * 150 + ["neutrophil"] * 150, fake[300:], "tiny-sha", "synthetic")
    store = review_folder(describer, "tiny-sha", [cell_folder], tmp_path, progress=False)
    summary = write_review_reports(store, tmp_path)
    assert summary["unfamiliar"] == 12
    assert summary["warning"] and "far from the training data" in summary["warning"]
    assert html.escape(summary["warning"]) in (tmp_path / "report.html").read_text()
    scores = [q["unfamiliarity"] for q in summary["queue"]]
    assert scores == sorted(scores, reverse=True) and all(q["unfamiliar"] for q in summary["queue"])
    bar = store.meta()["folder_shift"]["bar"]  # the shifted folder's stricter bar decides every stored flag
    assert bar < describer.familiarity.threshold
    assert all(q["unfamiliar"] == (q["unfamiliarity"] > bar) for q in summary["queue"])


def _review_with_synthetic_familiarity(describer, cell_folder: Path, out: Path) -> ReviewStore:
    """A review of the slide by a describer whose familiarity was fitted on random embeddings."""
    from hemaclip.tasks.familiarity import fit_familiarity

    fake = np.random.default_rng(0).normal(size=(400, describer.model.config.embed_dim))
    describer.familiarity = fit_familiarity(fake[:300], ["basophil"] * 300, fake[300:], "tiny-sha", "synthetic")
    return review_folder(describer, "tiny-sha", [cell_folder], out, progress=False)


def test_the_folder_bar_sets_every_stored_flag(describer, cell_folder: Path, tmp_path: Path) -> None:
    from hemaclip.tasks.review import reword_cell

    store = _review_with_synthetic_familiarity(describer, cell_folder, tmp_path)
    scores = sorted(c["unfamiliarity"] for c in store.cells())
    middle = scores[len(scores) // 2]
    store.apply_flag_bar(middle, reword=functools.partial(reword_cell, describer))
    assert [c["unfamiliar"] for c in store.cells()] == [c["unfamiliarity"] > middle for c in store.cells()]
    assert 0 < sum(c["unfamiliar"] for c in store.cells()) < len(scores)


def test_a_re_flagged_cell_is_re_worded_and_flagging_back_restores_its_sentence(describer, cell_folder: Path, tmp_path: Path) -> None:
    from hemaclip.tasks.describe import UNFAMILIAR_WARNING
    from hemaclip.tasks.review import reword_cell

    store = _review_with_synthetic_familiarity(describer, cell_folder, tmp_path)
    reword = functools.partial(reword_cell, describer)
    store.apply_flag_bar(float("inf"), reword=reword)  # nothing flagged: the confident sentences
    confident = {c["id"]: (c["sentence"], c["attributes"]) for c in store.cells()}
    assert not any(s.startswith(UNFAMILIAR_WARNING) for s, _ in confident.values())

    assert store.apply_flag_bar(float("-inf"), reword=reword) == len(confident)  # every cell flagged now
    for cell in store.cells():
        assert cell["unfamiliar"] and cell["sentence"].startswith(UNFAMILIAR_WARNING)
        stated = [a for a in cell["attributes"].values() if a["stated"]]
        assert all(a["probability"] > describer.settings.unfamiliar_attribute_threshold for a in stated)

    assert store.apply_flag_bar(float("inf"), reword=reword) == len(confident)
    assert {c["id"]: (c["sentence"], c["attributes"]) for c in store.cells()} == confident


# -- issue 28: stable ids, one writer, damaged stores, changed and removed files -------------------------------


def test_a_cell_described_again_keeps_its_id_and_its_corrections(describer, cell_folder: Path, tmp_path: Path) -> None:
    store = review_folder(describer, "tiny-sha", [cell_folder], tmp_path, progress=False)
    cells = store.cells()
    made = store.correct(cells[0]["id"], "class", "monocyte", "Ann")
    columns = ("cell", "label", "probability", "runner_up", "abstain", "unfamiliar", "unfamiliarity", "attributes", "sentence",
               "box", "cell_found", "embedding", "class_probabilities", "thumbnail")
    db = sqlite3.connect(tmp_path / REVIEW_STORE)  # what a second writer describing the same file stores: the same row again
    row = dict(zip(columns, db.execute(f"SELECT {', '.join(columns)} FROM cells WHERE id = ?", (cells[0]["id"],)).fetchone()))
    db.close()
    store.add_file(cells[0]["source"], cells[0]["file_sha1"], "tiny-sha", [row])
    after = store.cells()
    assert [c["id"] for c in after] == [c["id"] for c in cells]
    assert after[0]["current"]["class"] == "monocyte" and made["cell_id"] == after[0]["id"]
    store.close()


def test_a_second_writer_is_refused_while_the_first_holds_the_review(describer, cell_folder: Path, tmp_path: Path) -> None:
    first = review_folder(describer, "tiny-sha", [cell_folder], tmp_path, progress=False)
    with pytest.raises(HemaclipError, match="another `hemaclip review` is writing"):
        review_folder(describer, "tiny-sha", [cell_folder], tmp_path, progress=False)
    reader = ReviewStore(tmp_path / REVIEW_STORE)  # the review server (corrections only) needs no lock
    reader.correct(first.cells()[0]["id"], "class", "monocyte", "Ann")
    reader.close()
    first.close()
    review_folder(describer, "tiny-sha", [cell_folder], tmp_path, progress=False).close()


def _damaged_stores(describer, cell_folder: Path, root: Path) -> dict[str, Path]:
    """A review folder per kind of damage: a page of the cells table overwritten, the tables dropped, a 0-byte file."""
    stores = {}
    for kind in ("corrupt page", "missing tables", "empty file"):
        out = root / kind.replace(" ", "-")
        review_folder(describer, "tiny-sha", [cell_folder], out, progress=False).close()
        path = out / REVIEW_STORE
        if kind == "corrupt page":
            db = sqlite3.connect(path)
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            root_page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'cells'").fetchone()[0]
            db.close()
            with path.open("r+b") as handle:
                handle.seek((root_page - 1) * page_size)
                handle.write(b"\x0d\xff" * (page_size // 2))
        elif kind == "missing tables":
            db = sqlite3.connect(path)
            db.executescript("DROP TABLE corrections; DROP TABLE cells; DROP TABLE files; DROP TABLE meta; VACUUM;")
            db.close()
        else:
            path.write_bytes(b"")
        for leftover in out.iterdir():
            if leftover.name != REVIEW_STORE:
                leftover.unlink()
        stores[kind] = path
    return stores


@pytest.fixture(scope="module")
def damaged(make_tiny_model, cell_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _damaged_stores(Describer(make_tiny_model()), cell_folder, tmp_path_factory.mktemp("damaged"))
    finally:
        torch.set_num_threads(before)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_damaged_store_is_refused_and_left_as_it_is(damaged: dict[str, Path], describer, cell_folder: Path, tmp_path: Path) -> None:
    from hemaclip.serve.review import create_review_app
    from hemaclip.tasks.review import export_reviewed

    for kind, path in damaged.items():
        before = _snapshot(path.parent)
        for opener in (lambda: ReviewStore(path), lambda: ReviewStore(path, create=True, writer=True),
                       lambda: review_folder(describer, "tiny-sha", [cell_folder], path.parent, progress=False),
                       lambda: export_reviewed(ReviewStore(path), tmp_path / "export"), lambda: create_review_app(path.parent)):
            with pytest.raises(HemaclipError, match=str(path)):
                opener()
        assert _snapshot(path.parent) == before, kind
        assert not (tmp_path / "export").exists()


def test_a_damaged_store_through_the_entry_point(damaged: dict[str, Path], run_cli, assert_one_line_error, cell_folder: Path,
                                                 tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = damaged["corrupt page"]
    before = _snapshot(path.parent)
    for args in (("review", str(cell_folder), "--out", str(path.parent), "--checkpoint", str(tiny_checkpoint)),
                 ("review-export", str(path.parent), "--to", str(tmp_path / "export")),
                 ("serve", "--review", str(path.parent), "--port", "8766")):
        result = run_cli(*args, timeout=300)
        assert_one_line_error(result, str(path))
        assert "damaged" in result.stderr
    assert _snapshot(path.parent) == before and not (tmp_path / "export").exists()


def test_changed_and_removed_files_stop_being_counted_and_unchanged_corrections_stay(describer, cell_folder: Path, tmp_path: Path) -> None:
    slide = tmp_path / "slide"
    shutil.copytree(cell_folder, slide)
    names = sorted(p.name for p in slide.iterdir())
    store = review_folder(describer, "tiny-sha", [slide], tmp_path / "review", progress=False)
    by_name = {Path(c["source"]).name: c for c in store.cells()}
    assert len(by_name) == len(names) == len(store.cells())  # one cell per crop
    kept, edited, removed = names[0], names[1], names[2]
    store.correct(by_name[kept]["id"], "class", "monocyte", "Ann")
    store.correct(by_name[edited]["id"], "class", "monocyte", "Ann")
    store.close()

    from PIL import Image

    with Image.open(slide / edited) as image:
        image.rotate(90).save(slide / edited, format="JPEG")
    (slide / removed).unlink()
    again = review_folder(describer, "tiny-sha", [slide], tmp_path / "review", progress=False)
    now = again.cells()
    assert len(now) == len(names) - 1 and {Path(c["source"]).name for c in now} == set(names) - {removed}
    assert again.meta()["changes"] == {"changed": 1, "removed": 1, "cells": 2} and again.meta()["described_now"] == 1
    current = {Path(c["source"]).name: c for c in now}
    assert current[kept]["id"] == by_name[kept]["id"] and current[kept]["current"]["class"] == "monocyte"
    assert current[edited]["id"] != by_name[edited]["id"] and not current[edited]["reviewed"]
    assert len(again.corrections()) == 2  # nothing is deleted: the old cell's correction stays in the store
    summary = write_review_reports(again, tmp_path / "review")
    assert summary["cells"] == len(names) - 1 and summary["changes"]["removed"] == 1
    assert summary["white_cells"] + sum(summary["outside_differential"].values()) == len(names) - 1
    with pytest.raises(HemaclipError, match="no longer counted"):
        again.correct(by_name[edited]["id"], "class", "basophil", "Ann")
    again.close()


@pytest.mark.slow
def test_two_review_processes_while_corrections_are_posted_lose_none(run_cli, tiny_checkpoint: Path, cell_folder: Path, tmp_path: Path) -> None:
    """Two `hemaclip review` runs on one --out (new files to describe) while a reviewer posts corrections to the
    review server: every acknowledged correction still names a counted cell and decides its current class."""
    import subprocess
    import sys
    import threading

    from fastapi.testclient import TestClient

    from hemaclip.cache import file_sha1
    from hemaclip.serve.review import create_review_app

    slide, out = tmp_path / "slide", tmp_path / "review"
    shutil.copytree(cell_folder, slide)
    first = review_folder(Describer.from_checkpoint(tiny_checkpoint, index=None), file_sha1(tiny_checkpoint), [slide], out, progress=False)
    first.close()
    for path in sorted(cell_folder.iterdir()):  # new files for both runs to describe
        for copy in range(3):
            shutil.copy(path, slide / f"copy{copy}-{path.name}")
    command = [sys.executable, "-m", "hemaclip.cli", "review", str(slide), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for _ in range(2)]
    acknowledged: list[tuple[int, str]] = []
    client = TestClient(create_review_app(out), base_url="http://127.0.0.1")
    classes = client.get("/api/review").json()["classes"]
    deadline = time.monotonic() + 600
    while any(run.poll() is None for run in runs) and time.monotonic() < deadline:
        for n, cell in enumerate(client.get("/api/review").json()["queue"][-8:]):  # the newest cells too
            value = classes[(len(acknowledged) + n) % len(classes)]
            answer = client.post(f"/api/review/cells/{cell['id']}/corrections", json={"field": "class", "value": value, "reviewer": "Ann"})
            if answer.status_code == 200:
                acknowledged.append((cell["id"], value))
    results = [(run.wait(timeout=60), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results)[0] == 0, results
    for code, err in results:
        assert code == 0 or "another `hemaclip review` is writing" in err, err
    store = ReviewStore(out / REVIEW_STORE)
    current = {c["id"]: c["current"]["class"] for c in store.cells()}
    latest = dict(acknowledged)
    assert acknowledged and all(cell_id in current for cell_id in latest)  # none orphaned
    assert all(current[cell_id] == value for cell_id, value in latest.items())
    assert len(store.corrections()) == len(acknowledged)
    assert len(current) == len(list(slide.iterdir()))
    store.close()
