"""The Python API as a user calls it: `hemaclip.load()` and the methods of `Model`, checked against the installed
`hemaclip` command on the same images, and the example in docs/python-api.md run verbatim."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hemaclip
from hemaclip.errors import CheckpointError, HemaclipError

ENTRY_POINT = Path(sys.executable).with_name("hemaclip")  # the installed console script, as a user runs it
DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
# One picture per class that matters here: granulocytes, an agranulocyte, and a platelet (no WBCAtt attributes).
CLASSES = ("basophil", "eosinophil", "lymphocyte", "neutrophil", "platelet")
TOLERANCE = 1e-4  # describe rounds probabilities to 4 decimals


@pytest.fixture(scope="module")
def cells(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Copies of the first PBC image of each class in CLASSES (a tmp folder, so the test owns its inputs)."""
    folder = tmp_path_factory.mktemp("api") / "cells"
    folder.mkdir()
    copies = []
    for label in CLASSES:
        first = sorted((data_root / "PBC_dataset_normal_DIB" / label).glob("*.jpg"))[0]
        copies.append(Path(shutil.copy(first, folder / f"{label}-{first.name}")))  # sorted names keep CLASSES order
    return sorted(copies)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**os.environ, "HEMACLIP_CACHE": str(tmp_path_factory.getbasetemp() / "hemaclip-cache")}


@pytest.fixture(scope="module")
def model(cache_env: dict[str, str]) -> hemaclip.Model:
    os.environ["HEMACLIP_CACHE"] = cache_env["HEMACLIP_CACHE"]
    return hemaclip.load()


@pytest.fixture(scope="module")
def cli_records(cells: list[Path], cache_env: dict[str, str]) -> list[dict]:
    result = subprocess.run([str(ENTRY_POINT), "describe", "--json", "--index", "none", *map(str, cells)],
                            capture_output=True, text=True, timeout=300, env=cache_env)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_same_reading(ours: dict, theirs: dict) -> None:
    """Two describe records agree: the same words, and probabilities within the rounding of the JSON."""
    assert ours.keys() == theirs.keys()
    for key in ("source", "label", "runner_up", "abstain", "sentence", "calibrated", "unfamiliar", "cell", "box"):
        assert ours[key] == theirs[key], key
    assert ours["probability"] == pytest.approx(theirs["probability"], abs=TOLERANCE)
    assert ours["runner_up_probability"] == pytest.approx(theirs["runner_up_probability"], abs=TOLERANCE)
    assert ours["unfamiliarity"] == pytest.approx(theirs["unfamiliarity"], rel=1e-3)
    assert ours["attributes"].keys() == theirs["attributes"].keys()
    for name, reading in ours["attributes"].items():
        assert reading["value"] == theirs["attributes"][name]["value"], name
        assert reading["stated"] == theirs["attributes"][name]["stated"], name
        assert reading["probability"] == pytest.approx(theirs["attributes"][name]["probability"], abs=TOLERANCE), name


@pytest.mark.slow  # loads the model a second time (a subprocess or the command in-process): ~10 s of CPU
def test_describe_agrees_with_the_installed_cli(model: hemaclip.Model, cells: list[Path], cli_records: list[dict]) -> None:
    described = model.describe([str(p) for p in cells])
    assert len(described) == len(cli_records) == len(CLASSES)
    assert all(isinstance(d, hemaclip.Description) for d in described)
    for ours, theirs in zip(described, cli_records):
        assert_same_reading(ours.to_dict(), theirs)
    assert any(d.attributes and any(a.stated for a in d.attributes.values()) for d in described)  # sentences say something
    platelet = next(d for d in described if d.label == "platelet")
    assert not any(a.stated for a in platelet.attributes.values())


def test_a_folder_reads_as_its_files(model: hemaclip.Model, cells: list[Path]) -> None:
    by_folder = [d.to_dict() for d in model.describe(cells[0].parent)]
    by_files = [d.to_dict() for d in model.describe(cells)]
    assert by_folder == by_files


def test_pil_images_and_arrays_read_as_their_files(model: hemaclip.Model, cells: list[Path]) -> None:
    cells = cells[:2]
    from_paths = model.describe(cells)
    pictures = [Image.open(p) for p in cells]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in cells]
    for other in (model.describe(pictures), model.describe(arrays)):
        for ours, theirs in zip(other, from_paths):
            a, b = ours.to_dict(), theirs.to_dict()
            a.pop("source"), b.pop("source")
            assert a == b
    assert model.describe(pictures[0])[0].source == str(cells[0])  # a PIL image keeps its file name
    assert model.describe(arrays[0])[0].source == "<array 0>"
    grey = Image.open(cells[0]).convert("L")
    assert model.describe(np.asarray(grey))[0].to_dict() == {**model.describe(grey)[0].to_dict(), "source": "<array 0>"}


def test_classify_sums_to_one_and_is_describes_reading(model: hemaclip.Model, cells: list[Path]) -> None:
    described = model.describe(cells)
    classified = model.classify(cells)
    for d, p in zip(described, classified):
        assert list(p.probabilities) == model.class_names
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert p.label == d.label
        assert p.probabilities[d.label] == pytest.approx(d.probability, abs=TOLERANCE)
        assert p.calibrated


def test_classify_restricted_renormalises_as_describe_classes_does(model: hemaclip.Model, cells: list[Path]) -> None:
    white = ["lymphocyte", "neutrophil"]
    restricted = model.classify(cells, classes=white)
    described = model.describe(cells, classes=",".join(white))
    full = model.classify(cells)
    for p, d, f in zip(restricted, described, full):
        assert list(p.probabilities) == white
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert d.label in white and p.label == d.label
        assert p.probabilities[d.label] == pytest.approx(d.probability, abs=TOLERANCE)
        kept = sum(f.probabilities[c] for c in white)  # P(c | c in S) = P(c) / P(S)
        assert p.probabilities["lymphocyte"] == pytest.approx(f.probabilities["lymphocyte"] / kept, rel=1e-5)
    assert model.classify(cells).__len__() == len(cells)  # the loaded model stays unrestricted
    with pytest.raises(HemaclipError, match="unknown class"):
        model.classify(cells, classes=["lymphoblast"])


def test_zero_shot_sums_to_one_over_the_prompts(model: hemaclip.Model, cells: list[Path]) -> None:
    prompts = ["a basophil", "an eosinophil", "a lymphocyte", "a neutrophil", "a platelet"]
    results = model.zero_shot(cells, prompts)
    assert len(results) == len(cells)
    for p in results:
        assert list(p.probabilities) == prompts
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert not p.calibrated
    as_mapping = model.zero_shot(cells, {p: [p] for p in prompts})
    for a, b in zip(as_mapping, results):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-9)
    with pytest.raises(HemaclipError, match="at least two"):
        model.zero_shot(cells, ["a neutrophil"])
    with pytest.raises(HemaclipError, match="list of texts"):
        model.zero_shot(cells, "a neutrophil")


def test_embeddings_are_unit_vectors_in_one_space(model: hemaclip.Model, cells: list[Path]) -> None:
    images = model.embed_images(cells)
    texts = model.embed_texts(["a neutrophil", "a platelet"])
    width = model.network.config.embed_dim
    assert images.shape == (len(cells), width) and texts.shape == (2, width)
    assert images.dtype == texts.dtype == np.float32
    assert np.linalg.norm(images, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(texts, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert model.embed_texts("a neutrophil") == pytest.approx(texts[:1], abs=1e-6)  # a lone string is one text
    assert model.embed_images(cells[:1])[0] == pytest.approx(images[0], abs=1e-6)


@pytest.mark.slow  # loads the model a second time (a subprocess or the command in-process): ~10 s of CPU
def test_search_finds_what_the_search_command_finds(model: hemaclip.Model, cells: list[Path], main_in_process, tmp_path: Path) -> None:
    from hemaclip.data.datasets import CellRecord
    from hemaclip.models.default import default_checkpoint_path
    from hemaclip.tasks.index import CellIndex

    records = [CellRecord(path=p, label=p.name.split("-")[0], split="test") for p in cells]
    out = tmp_path / "five.index"
    CellIndex.build(model.network, records, out, checkpoint_id=model.checkpoint_sha1 or "", kind="flat", progress=False,
                    checkpoint_path=default_checkpoint_path()).close()
    hits = model.search(out, "a cell with coarse purple granules", k=3)
    assert len(hits) == 3 and all(isinstance(h, hemaclip.SearchHit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    code, stdout, _ = main_in_process("search", "a cell with coarse purple granules", "--index", str(out), "-k", "3", "--json")
    assert code == 0
    cli_hits = json.loads(stdout)["hits"]
    assert [h.path for h in hits] == [h["path"] for h in cli_hits]
    assert [h.score for h in hits] == pytest.approx([h["score"] for h in cli_hits], abs=1e-6)
    only = model.search(out, "a cell", k=5, where={"label": "platelet"})
    assert [h.label for h in only] == ["platelet"]


def test_bad_input_is_one_clear_error(model: hemaclip.Model, cells: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cell.jpg"
    with pytest.raises(HemaclipError, match="no-such-cell.jpg: image file not found") as caught:
        model.describe([cells[0], missing])
    assert "\n" not in str(caught.value)
    with pytest.raises(HemaclipError, match="image 1: expected a file path, a PIL image or a numpy array, got int"):
        model.describe([cells[0], 42])
    with pytest.raises(HemaclipError, match="expected a uint8 array"):
        model.classify(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(HemaclipError, match="expected a list of images"):
        model.describe(42)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HemaclipError, match="no image files"):
        model.describe(tmp_path / "empty")
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    with pytest.raises(HemaclipError, match="notes.jpg: not a readable image file"):
        model.embed_images([notes])
    with pytest.raises(CheckpointError, match="not a bundled model config"):
        hemaclip.load("no-such-model")
    with pytest.raises(HemaclipError, match="checkpoint path or a model config name"):
        hemaclip.load(3)  # type: ignore[arg-type]


def test_bad_input_from_a_fresh_interpreter_names_the_problem(tmp_path: Path, cache_env: dict[str, str]) -> None:
    """As a user's script meets it: the exception class and one line, no traceback from deep inside torch."""
    code = "import hemaclip; hemaclip.load('runs/missing/best.pt')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cache_env, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hemaclip.errors.CheckpointError: runs/missing/best.pt: no such checkpoint file"), result.stderr


def test_load_takes_a_bundled_config_name(monkeypatch: pytest.MonkeyPatch, cells: list[Path]) -> None:
    """A config name builds an untrained model (here at 32 px with random image weights, so it is fast): uncalibrated,
    and still one reading per picture."""
    import hemaclip.models.factory as factory

    real = factory.create_model
    monkeypatch.setattr(factory, "create_model", lambda name: real(name, image_size=32, image_pretrained=None))
    untrained = hemaclip.load("effnet-lite0-128")
    assert not untrained.calibrated and untrained.checkpoint_sha1 is None
    readings = untrained.describe(cells[:2])
    assert len(readings) == 2 and not readings[0].calibrated
    with pytest.raises(HemaclipError, match="no reference index"):
        hemaclip.load("effnet-lite0-128", reference_index="default")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.slow  # loads the model a second time (a subprocess or the command in-process): ~10 s of CPU
def test_the_documented_example_runs_verbatim(cells: list[Path], model: hemaclip.Model, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks, f"{DOC} has no python example"
    assert sum(len(b.strip().splitlines()) for b in blocks) <= 12  # the README's short example
    monkeypatch.chdir(cells[0].parent.parent)  # the example reads ./cells/
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    first = model.describe(cells[0])[0]
    assert f"cells/{cells[0].name}: {first.label} p={first.probability:.2f}" in printed
    assert first.sentence in printed
