"""`hemaclip describe` through the real CLI on real PBC images with a tiny random checkpoint, and the Describer API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.data.datasets import load_dataset
from hemaclip.data.preprocess import decode_image
from hemaclip.errors import HemaclipError
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.tasks.calibration import Calibration, calibration_path, load_calibration
from hemaclip.tasks.describe import Describer
from hemaclip.cache import file_sha1
from hemaclip.text.captions import parse_caption

KEYS = {"source", "label", "probability", "runner_up", "runner_up_probability", "abstain", "attributes", "sentence",
        "neighbours", "calibrated", "box", "cell", "cell_found", "unfamiliar", "unfamiliarity", "unfamiliar_in_shifted_folder",
        "sentence_in_shifted_folder"}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The session's tiny checkpoint, copied: a test here writes a calibration sidecar beside it."""
    path = Path(shutil.copy(tiny_checkpoint, tmp_path_factory.mktemp("describe") / "tiny.pt"))
    model, _ = load_checkpoint(path)
    return model.eval(), path


@pytest.fixture(scope="module")
def records(data_root: Path) -> list:
    train = load_dataset("wbcatt", data_root=data_root).split("train")
    by_class = {}
    for r in train:
        by_class.setdefault(r.label, r)
    return list(by_class.values())[:4]


@pytest.fixture()
def folder(tmp_path: Path, records: list) -> Path:
    root = tmp_path / "cells"
    (root / "sub").mkdir(parents=True)
    for i, r in enumerate(records[:3]):
        shutil.copy(r.path, (root if i < 2 else root / "sub") / Path(r.path).name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "notes.txt").write_text("not an image, skipped")
    return root


@pytest.mark.slow
def test_cli_json_lines_threshold_and_corrupt_file(tiny, folder: Path, tmp_path: Path, run_cli) -> None:
    _, ckpt = tiny
    threshold = 0.45
    result = run_cli("describe", str(folder), "--checkpoint", str(ckpt), "--index", "none", "--json", "--threshold", str(threshold),
                 "--batch-size", "2", "--saliency", str(tmp_path / "maps"), "--saliency-target", "nucleus_shape")
    assert result.returncode == 1, result.stderr  # one file failed
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4  # 3 images + broken.jpg, recursively, notes.txt skipped
    errors = [d for d in lines if "error" in d]
    assert len(errors) == 1 and errors[0]["source"].endswith("broken.jpg") and "broken.jpg" in errors[0]["error"]
    assert "broken.jpg" in result.stderr and "uncalibrated" in result.stderr
    described = [d for d in lines if "error" not in d]
    stated_any = False
    for d in described:
        assert set(d) == KEYS and d["calibrated"] is False and d["neighbours"] == []
        assert 0.0 <= d["runner_up_probability"] <= d["probability"] <= 1.0
        assert set(d["attributes"]) == set(ATTRIBUTE_NAMES)
        stated = {n: a["value"] for n, a in d["attributes"].items() if a["stated"]}
        assert all(d["attributes"][n]["probability"] > threshold for n in stated)
        assert parse_caption(d["sentence"]) == stated  # the sentence says exactly the stated attributes
        stated_any |= bool(stated)
    assert stated_any  # binary attributes of a random model sit near 0.5, some above 0.45
    assert len(list((tmp_path / "maps").glob("*.nucleus_shape.png"))) == 3


@pytest.mark.slow
def test_cli_table_abstains_and_states_nothing_at_threshold_one(tiny, records: list, run_cli) -> None:
    _, ckpt = tiny
    result = run_cli("describe", str(records[0].path), "--checkpoint", str(ckpt), "--index", "none",
                 "--threshold", "1.0", "--abstain-below", "1.0")
    assert result.returncode == 0, result.stderr
    assert Path(records[0].path).name in result.stdout and "uncalibrated" in result.stdout
    assert "abstain" in result.stdout and "No attribute is stated" in result.stdout


def test_cli_refuses_a_folder_without_images(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hemaclip.cli import app
    from hemaclip.errors import HemaclipError

    result = CliRunner().invoke(app, ["describe", str(tmp_path), "--index", "none"])
    assert isinstance(result.exception, HemaclipError) and "no image files" in str(result.exception)


def test_calibration_sidecar_and_neighbours(tiny, records: list, tmp_path: Path) -> None:
    from hemaclip.tasks.index import CellIndex

    model, ckpt = tiny
    images = [np.asarray(decode_image(r.path)) for r in records]
    plain = Describer(model, index=None).describe_arrays(images, ["a", "b", "c", "d"][: len(images)])
    sha1 = file_sha1(ckpt)
    assert load_calibration(ckpt, sha1)[0] is None  # none written yet: uncalibrated
    temps = {n: 0.5 for n in ATTRIBUTE_NAMES}
    calibration = Calibration(sha1, "head", list(model.class_names), 0.25, "heads", temps)
    sidecar = calibration_path(ckpt)
    sidecar.write_text(json.dumps(calibration.to_dict()))
    try:
        loaded, reason = load_calibration(ckpt, sha1)
        assert loaded == calibration and reason == ""
        assert load_calibration(ckpt, "0" * 40)[0] is None  # other weights: not used
    finally:
        sidecar.unlink()
    index = CellIndex.build(model, records, tmp_path / "index", checkpoint_id=sha1, progress=False)
    sharp = Describer(model, calibration=calibration, index=index).describe_arrays(images, ["a", "b", "c", "d"][: len(images)])
    strict = Describer(model, attribute_threshold=1.0, abstain_below=1.0).describe_arrays(images[:1], ["a"])[0]
    assert strict.abstain and not any(a["stated"] for a in strict.attributes.values())
    for p, s in zip(plain, sharp):
        assert s.calibrated and not p.calibrated and s.label == p.label
        assert s.probability > p.probability  # T < 1 sharpens
        assert len(s.neighbours) == len(records) and s.neighbours[0]["label"] in {r.label for r in records}
    # The image itself is in the index: it is its own nearest neighbour.
    assert Path(sharp[0].neighbours[0]["path"]).name == Path(records[0].path).name


def test_restricted_read_out_is_the_conditional_probability_over_the_allowed_classes() -> None:
    from hemaclip.tasks.readout import class_mask, restrict_probabilities

    names = ["basophil", "erythroblast", "lymphocyte", "monocyte"]
    probs = np.array([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    mask = class_mask(names, ["lymphocyte", "basophil", "monocyte", " basophil "])
    assert mask.tolist() == [True, False, True, True]
    out = restrict_probabilities(probs, mask)
    assert np.allclose(out.sum(axis=1), 1.0) and np.all(out[:, 1] == 0.0)
    assert np.allclose(out[0], [0.25, 0.0, 0.5, 0.25])  # ratios among the kept classes unchanged
    assert names[int(np.argmax(out[0]))] == "lymphocyte"  # the excluded erythroblast no longer wins
    assert restrict_probabilities(probs, class_mask(names, None)) is probs
    assert class_mask(names, "lymphocyte, basophil,monocyte").tolist() == mask.tolist()  # the commands' comma-separated form
    with pytest.raises(HemaclipError, match="unknown class.*neutrophil.*the model reads basophil, erythroblast"):
        class_mask(names, ["neutrophil"])
    with pytest.raises(HemaclipError, match="none given"):
        class_mask(names, [" ", ""])


def test_describer_with_classes_reads_only_those(tiny, records: list) -> None:
    model, _ = tiny
    allowed = list(model.class_names)[1:3]
    free = Describer(model, index=None)
    kept = Describer(model, index=None, classes=allowed)
    images = [np.asarray(decode_image(r.path)) for r in records]
    sources = [str(r.path) for r in records]
    plain, restricted = free.describe_arrays(images, sources), kept.describe_arrays(images, sources)
    for a, b in zip(plain, restricted):
        assert b.label in allowed and b.runner_up in allowed
        p = a.class_probabilities[[list(model.class_names).index(c) for c in allowed]]
        assert b.probability == pytest.approx(float(p.max() / p.sum()), abs=1e-4)
        assert b.attributes == a.attributes  # the restriction changes the class read-out only


def test_a_cell_only_the_shifted_folder_bar_flags_gets_the_plain_warning_as_its_shifted_folder_sentence(tiny, records: list) -> None:
    import dataclasses

    from hemaclip.tasks.describe import UNFAMILIAR_WARNING
    from hemaclip.tasks.familiarity import fit_familiarity

    model, _ = tiny
    rng = np.random.default_rng(0)
    fake = rng.normal(size=(400, model.config.embed_dim))
    familiarity = fit_familiarity(fake[:300], ["basophil"] * 300, fake[300:], "tiny-sha", "synthetic")
    # In-lab bar: nothing is flagged; shifted-folder bar: everything is (every reference score lies above any cell's).
    lenient_vs_strict = dataclasses.replace(familiarity, threshold=float("inf"), reference_scores=np.array([-1.0]))
    describer = Describer(model, index=None, familiarity=lenient_vs_strict)
    images = [np.asarray(decode_image(r.path)) for r in records]
    for d in describer.describe_arrays(images, [str(r.path) for r in records]):
        assert d.unfamiliar is False and d.unfamiliar_in_shifted_folder is True
        assert not d.sentence.startswith(UNFAMILIAR_WARNING)
        assert d.sentence_in_shifted_folder.startswith(UNFAMILIAR_WARNING)
        values = {n: a["value"] for n, a in d.attributes.items()}
        probabilities = {n: a["probability"] for n, a in d.attributes.items()}
        assert d.sentence_in_shifted_folder == describer.sentence_for(d.label, values, probabilities, True)[0]
        assert d.to_dict()["sentence_in_shifted_folder"] == d.sentence_in_shifted_folder
    # Flags that agree: one sentence for both bars.
    same = Describer(model, index=None, familiarity=dataclasses.replace(familiarity, threshold=float("inf"),
                                                                         reference_scores=np.array([1e9])))
    for d in same.describe_arrays(images, [str(r.path) for r in records]):
        assert d.unfamiliar is False and d.unfamiliar_in_shifted_folder is False
        assert d.sentence_in_shifted_folder == d.sentence


def test_loading_builds_no_reference_index_until_the_caller_asks(tiny, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hemaclip.errors import CheckpointError
    from hemaclip.tasks import index as index_module

    model, ckpt = tiny
    built = []

    class Stub:  # stands in for the built index: what build_reference_index attaches
        dim = model.config.embed_dim

    def fake_default(network, checkpoint_path, data_root=None, progress=True):
        built.append((Path(checkpoint_path), data_root, progress))
        return Stub()

    monkeypatch.setattr(index_module, "default_reference_index", fake_default)
    describer = Describer.from_checkpoint(ckpt, data_root=tmp_path, progress=False)
    assert describer.index is None and built == []  # loading is loading: nothing embedded
    index = describer.build_reference_index()
    assert built == [(ckpt, tmp_path, False)] and describer.index is index
    assert describer.use_index(None) is None and describer.index is None
    with pytest.raises(HemaclipError, match="build_reference_index"):
        Describer.from_checkpoint(ckpt, index="default")
    with pytest.raises(HemaclipError, match="checkpoint file"):
        Describer(model).build_reference_index()  # a model without a file has no default index

    class Narrow:
        dim = model.config.embed_dim + 1

    with pytest.raises(CheckpointError, match="dimension"):
        describer.use_index(Narrow())


def test_cli_refuses_a_missing_index_folder_in_one_line(tiny, records: list, tmp_path: Path, run_cli, assert_one_line_error) -> None:
    _, ckpt = tiny
    result = run_cli("describe", str(records[0].path), "--checkpoint", str(ckpt), "--index", str(tmp_path / "absent"), "--json")
    assert_one_line_error(result, "no such index folder")
    assert result.stdout == ""
