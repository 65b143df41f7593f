"""Data layer on the real data: exact counts, deduplication, splits, decoding and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hemaclip.data.attributes import ATTRIBUTE_NAMES, PBC11_CLASSES
from hemaclip.data.datasets import load_dataset
from hemaclip.data.preprocess import decode_image
from hemaclip.data.torch_data import attribute_targets
from hemaclip.data.transforms import eval_transform, train_transform
from hemaclip.errors import DataError

@pytest.fixture(scope="module")
def summary(data_root: Path, run_cli) -> dict:
    result = run_cli("data", "summary", "--json", "--data", str(data_root))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["datasets"]


def test_summary_counts_match_the_data_readme(summary: dict) -> None:
    wbcatt = summary["wbcatt"]
    # The official 6,169 / 1,030 / 3,099 less 15 byte-identical copies (7 train-train pairs; 6 val/test images
    # copying an earlier split's image; one test-test pair; the eosinophil/neutrophil pair loses both copies).
    assert wbcatt["files_found"] == 10298 and wbcatt["records"] == 10298 - 15
    assert wbcatt["split_sizes"] == {"train": 6162, "val": 1029, "test": 3092}
    assert wbcatt["duplicates"]["dropped_by_split"] == {"train": 7, "val": 1, "test": 7}
    assert len(wbcatt["duplicates"]["dropped"]) == 15 and len(wbcatt["duplicates"]["cross_label_groups"]) == 1
    pbc = summary["pbc"]
    assert pbc["files_found"] == 17092
    # 17 identical pairs: 16 lose one copy, the pair filed under two classes loses both.
    assert pbc["duplicates"]["duplicate_groups"] == 17
    assert pbc["records"] == 17092 - 18
    assert len(pbc["duplicates"]["cross_label_groups"]) == 1
    cross = pbc["duplicates"]["cross_label_groups"][0]
    assert {Path(p).parent.name for p in cross} == {"eosinophil", "neutrophil"}
    all_set = summary["all"]
    assert all_set["files_found"] == 504 + 985 + 963 + 804
    assert all_set["duplicates"]["files_dropped"] == 40
    assert all_set["records"] == 3256 - 40
    counts = {cls: sum(all_set["per_split_class"][s].get(cls, 0) for s in ("train", "val", "test")) for cls in all_set["classes"]}
    assert counts == {"benign": 504, "early": 985, "pre": 963, "pro": 804 - 40}


def test_no_wbcatt_or_pbc_evaluation_image_is_a_copy_of_a_training_image(data_root: Path) -> None:
    """Byte-identical copies never sit in two splits, within WBCAtt or within PBC, and the two loaders keep
    the same copy (the one in the earliest split)."""
    from hemaclip.data.dedupe import file_hashes

    for name in ("wbcatt", "pbc"):
        records = load_dataset(name, data_root=data_root).records
        hashes = file_hashes([r.path for r in records])
        assert len(set(hashes.values())) == len(records), name  # one copy of each image is left
    wbcatt = {r.path.resolve(): r.split for r in load_dataset("wbcatt", data_root=data_root).records}
    pbc = {r.path.resolve(): r.split for r in load_dataset("pbc", data_root=data_root).records}
    assert {p: s for p, s in pbc.items() if p in wbcatt} == wbcatt
    assert not any(p.name in {"BA_786369.jpg", "BA_80990.jpg", "MO_145357.jpg"} for p in wbcatt)  # test copies of train images


def test_pbc11_uses_file_name_prefixes(data_root: Path) -> None:
    dataset = load_dataset("pbc11", data_root=data_root)
    assert dataset.classes == PBC11_CLASSES and len(dataset.classes) == 11
    assert {r.fine_label for r in dataset.records}.isdisjoint({"IG", "NEUTROPHIL"})
    assert {r.label for r in dataset.records} == set(PBC11_CLASSES)


def test_pbc_split_respects_wbcatt_split_and_is_saved(data_root: Path, tmp_path: Path) -> None:
    wbcatt = {r.path.resolve(): r.split for r in load_dataset("wbcatt", data_root=data_root).records}
    pbc = load_dataset("pbc", data_root=data_root, split_dir=tmp_path, seed=3)
    for record in pbc.records:
        if record.path.resolve() in wbcatt:
            assert record.split == wbcatt[record.path.resolve()]
    saved = tmp_path / "pbc_seed3.csv"
    assert saved.is_file()
    again = load_dataset("pbc", data_root=data_root, split_dir=tmp_path, seed=3)
    assert [(r.path, r.split) for r in again.records] == [(r.path, r.split) for r in pbc.records]
    assert not list(data_root.rglob("pbc_seed*.csv")), "splits must never be written into the data folder"


def test_all_split_is_stratified_deterministic_and_disjoint(data_root: Path) -> None:
    a = load_dataset("all", data_root=data_root, seed=0)
    b = load_dataset("all", data_root=data_root, seed=0)
    c = load_dataset("all", data_root=data_root, seed=1)
    assert [r.split for r in a.records] == [r.split for r in b.records]
    assert [r.split for r in a.records] != [r.split for r in c.records]
    for cls in a.classes:
        members = [r for r in a.records if r.label == cls]
        test_share = sum(r.split == "test" for r in members) / len(members)
        assert abs(test_share - 0.2) < 0.01
    paths = [r.path for r in a.records]
    assert len(paths) == len(set(paths))


def test_images_decode_to_rgb_and_transforms_give_tensors(data_root: Path) -> None:
    record = load_dataset("wbcatt", data_root=data_root).split("val")[0]
    image = decode_image(record.path)
    assert image.mode == "RGB" and image.size == (192, 192)
    for size in (64, 128, 192):
        assert train_transform(size)(image).shape == (3, size, size)
        assert eval_transform(size)(image).shape == (3, size, size)
    targets = attribute_targets(record)
    assert targets.shape == (len(ATTRIBUTE_NAMES),) and bool((targets >= 0).all())


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_odd_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16))
    else:
        image = base.convert(mode)
    path = tmp_path / f"cell_{mode.replace(';', '')}.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    loaded = decode_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 40)


def _make_folder(tmp_path: Path, data_root: Path) -> Path:
    folder = tmp_path / "cells"
    for cls in ("neutrophil", "eosinophil"):
        (folder / cls).mkdir(parents=True)
        for source in sorted((data_root / "PBC_dataset_normal_DIB" / cls).glob("*.jpg"))[:4]:
            shutil.copy(source, folder / cls / source.name)
    return folder


def test_corrupt_jpeg_gives_one_line_error_naming_the_file(tmp_path: Path, data_root: Path, run_cli, assert_one_line_error) -> None:
    folder = _make_folder(tmp_path, data_root)
    victim = next((folder / "neutrophil").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DataError, match=victim.name):
        decode_image(victim)
    assert_one_line_error(run_cli("data", "check", "--dataset", "folder", "--data", str(folder)), victim.name)


def test_non_image_file_gives_one_line_error(tmp_path: Path, data_root: Path, run_cli, assert_one_line_error) -> None:
    folder = _make_folder(tmp_path, data_root)
    fake = folder / "eosinophil" / "notes.jpg"
    fake.write_text("this is not an image\n")
    assert_one_line_error(run_cli("data", "check", "--dataset", "folder", "--data", str(folder)), "notes.jpg")
    empty = folder / "eosinophil" / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        decode_image(empty)


def test_csv_missing_column_gives_one_line_error(tmp_path: Path, data_root: Path, run_cli, assert_one_line_error) -> None:
    folder = _make_folder(tmp_path, data_root)
    csv_path = folder / "attributes.csv"
    columns = ["img_name", *[c for c in ATTRIBUTE_NAMES if c != "granularity"]]
    csv_path.write_text(",".join(columns) + "\n")
    result = run_cli("data", "check", "--dataset", "folder", "--data", str(folder))
    assert_one_line_error(result, "attributes.csv")
    assert "granularity" in result.stderr


def test_unknown_label_gives_one_line_error(tmp_path: Path, data_root: Path, run_cli, assert_one_line_error) -> None:
    source = data_root / "wbcatt"
    fake_root = tmp_path / "root"
    (fake_root / "wbcatt").mkdir(parents=True)
    (fake_root / "PBC_dataset_normal_DIB").symlink_to(data_root / "PBC_dataset_normal_DIB")
    for split in ("train", "val", "test"):
        lines = (source / f"pbc_attr_v1_{split}.csv").read_text().splitlines()[:6]
        if split == "val":
            lines[3] = lines[3].replace(",Neutrophil,", ",Megakaryocyte,").replace(",Eosinophil,", ",Megakaryocyte,").replace(
                ",Basophil,", ",Megakaryocyte,"
            ).replace(",Lymphocyte,", ",Megakaryocyte,").replace(",Monocyte,", ",Megakaryocyte,")
        (fake_root / "wbcatt" / f"pbc_attr_v1_{split}.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="Megakaryocyte"):
        load_dataset("wbcatt", data_root=fake_root)
    result = run_cli("captions", "--dataset", "wbcatt", "--data", str(fake_root))
    assert_one_line_error(result, "pbc_attr_v1_val.csv:4")


def test_empty_folder_and_missing_root(tmp_path: Path, run_cli, assert_one_line_error) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset("folder", folder=tmp_path / "empty")
    assert_one_line_error(run_cli("data", "summary", "--data", str(tmp_path / "nope")), "does not exist")


def test_folder_dataset_with_attributes_csv(tmp_path: Path, data_root: Path) -> None:
    folder = _make_folder(tmp_path, data_root)
    rows = [line for line in (data_root / "wbcatt" / "pbc_attr_v1_train.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    names = {p.name for p in folder.rglob("*.jpg")}
    chosen = [line for line in body if line.split(",")[0] in names]
    (folder / "attributes.csv").write_text("\ufeff" + header + "\n" + "\n".join(chosen) + "\n")  # BOM tolerated
    dataset = load_dataset("folder", folder=folder, split_dir=tmp_path / "splits")
    assert dataset.classes == ("eosinophil", "neutrophil")
    assert len(dataset.records) == 8
    assert sum(r.attributes is not None for r in dataset.records) == len(chosen)
    assert torch.equal(attribute_targets(dataset.records[0]), attribute_targets(dataset.records[0]))


def test_remove_stale_temps_deletes_only_atomic_write_leftovers(tmp_path: Path) -> None:
    from hemaclip.io import remove_stale_temps

    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"whole")
    (tmp_path / "notes.tmp").write_text("a user's file")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


def test_display_path_hides_machine_specific_prefixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hemaclip
    from hemaclip.io import display_path

    packaged = Path(hemaclip.__file__).parent / "assets" / "hemaclip-default.pt"
    assert display_path(packaged) == "hemaclip/assets/hemaclip-default.pt"
    monkeypatch.chdir(tmp_path)
    assert display_path(tmp_path / "runs" / "best.pt") == "runs/best.pt"
    assert display_path("/elsewhere/model.pt") == "/elsewhere/model.pt"
