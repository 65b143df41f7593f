"""CellIndex: build, load, search with filters, clear errors, resume from shards, and a kill -9 resume of the CLI."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hemaclip.data.datasets import load_dataset
from hemaclip.errors import CheckpointError, DataError, HemaclipError
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.cache import file_sha1
from hemaclip.models.inference import embed_texts
from hemaclip.tasks.index import CellIndex, IndexSettings, build_faiss, index_model

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> tuple[torch.nn.Module, Path]:
    """The session's tiny checkpoint and its model (so the CLI loads the very same weights)."""
    loaded, _ = load_checkpoint(tiny_checkpoint)
    return loaded, tiny_checkpoint


@pytest.fixture(scope="module")
def records(data_root: Path) -> list:
    """24 real WBCAtt test cells: the first few of each class (they carry the 11 attributes)."""
    test = load_dataset("wbcatt", data_root=data_root).split("test")
    chosen = []
    for label in sorted({r.label for r in test}):
        chosen += [r for r in test if r.label == label][:5]
    return chosen[:24]


@pytest.fixture(scope="module")
def built(tiny, records, tmp_path_factory) -> CellIndex:
    model, path = tiny
    out = tmp_path_factory.mktemp("index") / "cells.index"
    return CellIndex.build(model, records, out, checkpoint_id=file_sha1(path), shard_size=10, progress=False, checkpoint_path=path)


def test_build_load_and_search_returns_self_first(built: CellIndex, records) -> None:
    assert len(built) == len(records) and built.dim == 256 and built.kind == "flat"
    assert built.build_counts == {"shards": 3, "reused": 0, "computed": 3}
    again = CellIndex.load(built.path)
    vectors = np.asarray(again.embeddings[[0, 7, 13]])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    hits = again.search(vectors, k=5)
    for query_row, row_hits in zip([0, 7, 13], hits):
        assert len(row_hits) == 5
        assert row_hits[0]["row"] == query_row and row_hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["score"] for h in row_hits] == sorted((h["score"] for h in row_hits), reverse=True)
        first = row_hits[0]
        assert first["path"] == str(records[query_row].path) and first["label"] == records[query_row].label
        assert first["attributes"] == records[query_row].attributes


def test_filters_restrict_rows_and_still_return_k(built: CellIndex, records, tiny) -> None:
    model, _ = tiny
    query = embed_texts(model, ["a cell with coarse red granules"])
    colour = records[0].attributes["granule_colour"]
    matching = {i for i, r in enumerate(records) if r.attributes["granule_colour"] == colour}
    assert len(matching) >= 3
    hits = built.search(query, k=3, where={"granule_colour": colour})[0]
    assert len(hits) == 3 and all(h["row"] in matching for h in hits)
    everything = built.search(query, k=50, where={"granule_colour": colour})[0]
    assert {h["row"] for h in everything} == matching  # fewer than k match: all of them, no others
    label = records[-1].label
    both = built.search(query, k=10, where={"label": label.upper(), "granule_colour": records[-1].attributes["granule_colour"]})[0]
    assert both and all(h["label"] == label for h in both)
    # Exact filtered search agrees with unfiltered search restricted afterwards.
    unfiltered = [h["row"] for h in built.search(query, k=len(built))[0] if h["row"] in matching][:3]
    assert [h["row"] for h in hits] == unfiltered


def test_clear_errors(built: CellIndex, tiny, tmp_path: Path, make_tiny_model) -> None:
    model, _ = tiny
    with pytest.raises(HemaclipError, match="unknown filter column 'colour'"):
        built.search(np.zeros((1, built.dim), np.float32), where={"colour": "red"})
    with pytest.raises(HemaclipError, match="unknown value 'green' for filter 'granule_colour'"):
        built.search(np.zeros((1, built.dim), np.float32), where={"granule_colour": "green"})
    with pytest.raises(HemaclipError, match="empty text query"):
        embed_texts(model, ["   "])
    with pytest.raises(HemaclipError, match="dimensions"):
        built.search(np.zeros((1, 8), np.float32))
    with pytest.raises(DataError, match="index not found"):
        CellIndex.load(tmp_path / "missing.index")
    with pytest.raises(CheckpointError, match="built by checkpoint"):
        CellIndex.load(built.path, expected_checkpoint_id="0" * 40)
    other = make_tiny_model(embed_dim=64)
    with pytest.raises(CheckpointError, match="256-d"):
        built.check_model(other)


def test_other_format_and_incomplete_index_are_refused(built: CellIndex, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy.index"
    shutil.copytree(built.path, copy)
    con = sqlite3.connect(copy / "meta.sqlite")
    con.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="index format 99"):
        CellIndex.load(copy)
    (copy / "meta.sqlite").unlink()
    with pytest.raises(DataError, match="incomplete index"):
        CellIndex.load(copy)


def test_index_model_finds_the_building_checkpoint(built: CellIndex, tiny) -> None:
    model, path = index_model(built)
    assert path == tiny[1]
    assert torch.equal(next(model.parameters()), next(tiny[0].parameters()))


def test_rebuild_reuses_shards_and_recomputes_only_changed_inputs(tiny, records, tmp_path: Path) -> None:
    model, path = tiny
    out = tmp_path / "resume.index"
    first = CellIndex.build(model, records[:20], out, checkpoint_id="id-a", shard_size=10, progress=False)
    again = CellIndex.build(model, records[:20], out, checkpoint_id="id-a", shard_size=10, progress=False)
    assert again.build_counts == {"shards": 2, "reused": 2, "computed": 0}
    assert np.array_equal(np.asarray(first.embeddings), np.asarray(again.embeddings))
    changed = CellIndex.build(model, records[:10] + records[-10:], out, checkpoint_id="id-a", shard_size=10, progress=False)
    assert changed.build_counts["reused"] == 1 and changed.build_counts["computed"] == 1
    other = CellIndex.build(model, records[:10] + records[-10:], out, checkpoint_id="id-b", shard_size=10, progress=False)
    assert other.build_counts["computed"] == 2  # other weights never reuse a shard


def test_approximate_kinds_find_near_duplicates() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    vectors = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    for kind in ("ivf", "hnsw"):
        index, meta = build_faiss(vectors, kind, IndexSettings(nprobe=8))
        assert meta["kind"] == kind
        _, ids = index.search(vectors[:50], 1)
        assert np.mean(ids[:, 0] == np.arange(50)) >= 0.95


def _link_folder(records, root: Path) -> Path:
    """An ImageFolder of symlinks to real images (label = parent folder), nothing copied."""
    for record in records:
        target = root / record.label / Path(record.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(Path(record.path).resolve())
    return root


@pytest.mark.slow
def test_kill_9_during_build_resumes_from_finished_shards(tiny, data_root: Path, tmp_path: Path) -> None:
    model, checkpoint = tiny
    test = load_dataset("wbcatt", data_root=data_root).split("test")
    folder = _link_folder(test[:200], tmp_path / "cells")
    out = tmp_path / "killed.index"
    command = [
        sys.executable, "-m", "hemaclip.cli", "index", "build", "--data", str(folder), "--out", str(out),
        "--checkpoint", str(checkpoint), "--shard-size", "4", "--batch-size", "4",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_shard = out / "shards" / "shard-00000.npz"
    deadline = time.monotonic() + 120
    while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_shard.exists(), process.stdout.read().decode()
    assert not (out / "meta.sqlite").exists(), "the build finished before it could be killed"
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.npz")}
    assert 1 <= len(finished) < 50

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{50 - len(finished)} shards embedded, {len(finished)} reused" in " ".join(resumed.stdout.split())
    for name, mtime in finished.items():
        assert (out / "shards" / name).stat().st_mtime_ns == mtime  # reused, not rewritten

    clean_records = load_dataset("folder", folder=folder).split("all")
    clean = CellIndex.build(model, clean_records, tmp_path / "clean.index", checkpoint_id=file_sha1(checkpoint), shard_size=4, batch_size=4, progress=False)
    killed = CellIndex.load(out)
    assert len(killed) == len(clean) == 200
    assert np.allclose(np.asarray(killed.embeddings), np.asarray(clean.embeddings), atol=1e-5)
    assert list(killed.iter_rows()) == list(clean.iter_rows())


def test_search_command_text_image_filters_and_errors(built: CellIndex, records, main_in_process, tmp_path: Path) -> None:
    import json

    colour = records[0].attributes["granule_colour"]
    code, out, err = main_in_process("search", "cell with coarse red granules", "--index", str(built.path), "-k", "3", "--where", f"granule_colour={colour}", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert len(answer["hits"]) == 3 and all(h["attributes"]["granule_colour"] == colour for h in answer["hits"])
    code, out, err = main_in_process("search", "--image", str(records[4].path), "--index", str(built.path), "-k", "2", "--json")
    assert code == 0, err
    first = json.loads(out)["hits"][0]
    assert first["row"] == 4 and first["score"] == pytest.approx(1.0, abs=1e-4)
    code, out, err = main_in_process("index", "info", str(built.path), "--json")
    assert code == 0 and json.loads(out)["count"] == len(records)
    for args, message in [
        (("search", "cells", "--index", str(built.path), "--where", "colour=red"), "unknown filter column 'colour'"),
        (("search", "cells", "--index", str(built.path), "--where", "granule_colour"), "expected COLUMN=VALUE"),
        (("search", "  ", "--index", str(built.path)), "empty query"),
        (("search", "cells", "--index", str(tmp_path / "none.index")), "index not found"),
        (("index", "build", "--out", str(tmp_path / "x.index")), "--data DIR"),
    ]:
        code, out, err = main_in_process(*args)
        assert code == 1 and message in " ".join(err.split()), (args, err)
        assert err.startswith("error: ")


def test_embed_texts_has_one_contract(tiny) -> None:
    """One helper for search queries and retrieval prompts: an empty list is an empty [0, D] array, a
    blank text is a user error, and the text cache changes nothing but speed."""
    from hemaclip.models.text_cache import PooledTextCache

    model, _ = tiny
    assert embed_texts(model, []).shape == (0, model.config.embed_dim)
    with pytest.raises(HemaclipError, match="empty text query"):
        embed_texts(model, ["a round cell", ""], PooledTextCache(model.text))
    texts = ["a cell with coarse red granules", "a small round lymphocyte"]
    direct, cached = embed_texts(model, texts), embed_texts(model, texts, PooledTextCache(model.text))
    assert direct.dtype == np.float32 and direct.shape == (2, model.config.embed_dim)
    np.testing.assert_allclose(direct, cached, atol=1e-6)
