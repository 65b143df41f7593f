"""`evaluate` refuses what would only give trivial numbers (one class, or one class to choose among) and
warns, in the console, metrics.json and the report, about classes with too few images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hemaclip.data.datasets import load_dataset
from hemaclip.errors import DataError
from hemaclip_research.evaluate import MIN_IMAGES_PER_CLASS, check_classes, run_evaluation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folder(root: Path, data_root: Path, per_class: dict[str, int]) -> Path:
    """ROOT/<folder class>/ with links to that many real PBC test cells of the class the name says."""
    test = load_dataset("pbc", data_root=data_root).split("test")
    for label, n in per_class.items():
        (root / label).mkdir(parents=True)
        for record in [r for r in test if r.label == label][:n]:
            (root / label / Path(record.path).name).symlink_to(Path(record.path).resolve())
    return root


def test_check_classes_rules() -> None:
    with pytest.raises(DataError, match="1 class .*lymphocyte \\(30\\).* at least 2"):
        check_classes(["lymphocyte"] * 30, "split 'test' of folder x")
    with pytest.raises(DataError, match="only 1 class .* mapped"):
        check_classes(["a"] * 20 + ["b"] * 20, "split 'test' of folder x", candidates=["lymphocyte"])
    assert check_classes(["a"] * MIN_IMAGES_PER_CLASS + ["b"] * MIN_IMAGES_PER_CLASS, "x") == []
    (warning,) = check_classes(["a"] * 30 + ["b"] * 3, "split 'test' of folder x")
    assert warning.startswith("Warning: ") and "b (3)" in warning and "a (" not in warning


def test_one_class_folder_is_refused_in_one_line(data_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The issue's case: a one-class folder reported accuracy 1.0 [1.0, 1.0] and ECE 0.0 as results."""
    from hemaclip.cli import main

    folder = _folder(tmp_path / "one", data_root, {"lymphocyte": 40})
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["hemaclip", "evaluate", "--dataset", "folder", "--data", str(folder), "--out", str(out),
                                      "--no-probes", "--no-nshot"])
    with pytest.raises(SystemExit) as stopped:
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(lines) == 1
    assert lines[0].startswith("error: split 'test' of folder") and "1 class (lymphocyte (8))" in lines[0]
    assert not (out / "metrics.json").exists()


def test_one_mapped_class_is_refused(data_root: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "two", data_root, {"lymphocyte": 20, "monocyte": 20})
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"lymphocyte": "lymphocyte", "monocyte": None}))
    with pytest.raises(DataError, match="only 1 class \\(lymphocyte\\) is mapped"):
        run_evaluation(None, "folder", "test", tmp_path / "report", folder=folder, class_map=class_map, probes=False, nshot=False)


def test_one_class_of_external_features_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
    (tmp_path / "index.csv").write_text("path,label,split\n" + "".join(f"c{i}.png,lymphocyte,{'train' if i < 3 else 'test'}\n" for i in range(6)))
    with pytest.raises(DataError, match="index.csv has images of 1 class"):
        run_evaluation(None, "wbcatt", "test", tmp_path / "report", features=tmp_path / "f.npy", index_csv=tmp_path / "index.csv")


def test_few_images_per_class_are_computed_with_a_plain_warning(tiny_vit_checkpoint: Path, data_root: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    folder = _folder(tmp_path / "small", data_root, {"lymphocyte": 60, "monocyte": 15})  # test split: 12 and 3
    out = tmp_path / "report"
    with caplog.at_level("WARNING", logger="hemaclip"):
        metrics = run_evaluation(tiny_vit_checkpoint, "folder", "test", out, folder=folder, n_boot=0, probes=False, nshot=False,
                                 embed_method="pca")
    (warning,) = metrics["warnings"]
    assert "monocyte (3)" in warning and "lymphocyte" not in warning
    assert warning in caplog.text
    assert json.loads((out / "metrics.json").read_text())["warnings"] == [warning]
    assert "fewer than 10 images in class(es) monocyte (3)" in (out / "report.md").read_text()
