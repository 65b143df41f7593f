"""Other labs' data: LISC near-duplicate grouping and grouped splits, the lab field, Zheng masks, cell finding."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemaclip.data.datasets import load_dataset
from hemaclip.data.near_duplicates import near_duplicate_groups
from hemaclip.data.other_labs import load_mask
from hemaclip.data.paths import repo_default_data_root
from hemaclip.data.preprocess import Preprocess, decode_image
from hemaclip.data.splits import SplitFractions, grouped_stratified_split, saved_or_new_split
from hemaclip.errors import DataError

DATA = repo_default_data_root()
needs_data = pytest.mark.skipif(not (DATA / "lisc").is_dir(), reason="../shared/data/lisc not present")


def _small_lisc_root(tmp_path: Path, per_class: int = 14) -> Path:
    """A data root whose lisc/ holds the first crops of each class (links to the real files)."""
    root = tmp_path / "data"
    for cls in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"):
        (root / "lisc" / cls).mkdir(parents=True)
        for path in sorted((DATA / "lisc" / cls).glob("*.jpg"))[:per_class]:
            (root / "lisc" / cls / path.name).symlink_to(path)
    return root


@needs_data
def test_shifted_crops_of_one_field_group_together_and_other_cells_do_not(tmp_path: Path) -> None:
    field = np.asarray(decode_image(next((DATA / "PBC_dataset_normal_DIB" / "neutrophil").glob("*.jpg"))))
    other = np.asarray(decode_image(next((DATA / "PBC_dataset_normal_DIB" / "lymphocyte").glob("*.jpg"))))
    paths = []
    for name, crop in (("a", field[0:150, 0:150]), ("b", field[30:180, 20:170]), ("c", other[10:160, 10:160])):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(crop)).save(paths[-1])
    groups = near_duplicate_groups(paths, use_cache=False)
    assert groups[0] == groups[1] != groups[2]


@needs_data
def test_lisc_groups_never_cross_splits_and_records_carry_their_lab(tmp_path: Path) -> None:
    root = _small_lisc_root(tmp_path)
    dataset = load_dataset("lisc", data_root=root, split_dir=tmp_path / "splits")
    groups: dict[str, set[str]] = {}
    for record in dataset.records:
        assert record.lab == "lisc-tehran" and record.group is not None
        groups.setdefault(record.group, set()).add(record.split)
    assert all(len(splits) == 1 for splits in groups.values())
    assert len(groups) < len(dataset.records)  # the shifted crops of one cell were grouped
    summary = dataset.summary(root)
    assert summary["groups"] == {"count": len(groups), "split_across": 0} and summary["labs"] == {"lisc-tehran": len(dataset.records)}
    # The saved split records the groups and is read back with the same check.
    rows = list(csv.DictReader((tmp_path / "splits" / "lisc_seed0.csv").open()))
    assert {"key", "label", "split", "group"} <= set(rows[0])
    again = load_dataset("lisc", data_root=root, split_dir=tmp_path / "splits")
    assert [(r.path, r.split) for r in again.records] == [(r.path, r.split) for r in dataset.records]


def test_a_saved_split_whose_group_crosses_splits_is_refused(tmp_path: Path) -> None:
    keys, labels, groups = ["a", "b", "c", "d"], ["x", "x", "y", "y"], ["g1", "g1", "g2", "g3"]
    split_file = tmp_path / "split.csv"
    saved_or_new_split(split_file, keys, labels, SplitFractions(val=0.0, test=0.5), 0, groups)
    rows = list(csv.DictReader(split_file.open()))
    for row in rows:  # hand-edit: move one member of g1 elsewhere
        if row["key"] == "a":
            row["split"] = "test" if row["split"] != "test" else "train"
    with split_file.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match="group g1 lies in both"):
        saved_or_new_split(split_file, keys, labels, SplitFractions(val=0.0, test=0.5), 0, groups)


def test_grouped_split_keeps_groups_whole_and_near_the_fractions() -> None:
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(600)]
    groups = [f"g{i // int(rng.integers(1, 7))}" for i in range(600)]
    labels = ["x" if int(g[1:]) % 2 else "y" for g in groups]
    assignment = grouped_stratified_split(keys, labels, groups, SplitFractions(val=0.2, test=0.3), seed=1)
    by_group: dict[str, set[str]] = {}
    for key, group in zip(keys, groups):
        by_group.setdefault(group, set()).add(assignment[key])
    assert all(len(s) == 1 for s in by_group.values())
    shares = {s: sum(v == s for v in assignment.values()) / len(keys) for s in ("train", "val", "test")}
    assert abs(shares["test"] - 0.3) < 0.05 and abs(shares["val"] - 0.2) < 0.05


@needs_data
def test_every_bundled_record_names_its_lab() -> None:
    assert {r.lab for r in load_dataset("wbcatt").records} == {"pbc-barcelona"}
    zheng1 = load_dataset("zheng1")
    assert {r.lab for r in zheng1.records} == {"zheng-tecom"} and not zheng1.split("train")
    assert {r.lab for r in load_dataset("zheng2").records} == {"zheng-cellavision"}
    assert all(r.mask_path is not None and r.mask_path.is_file() for r in zheng1.records)


@needs_data
def test_zheng_masks_load_as_background_cytoplasm_nucleus(tmp_path: Path) -> None:
    record = load_dataset("zheng2").records[0]
    mask = load_mask(record.mask_path)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2} and {1, 2} <= set(np.unique(mask))
    noisy = np.full((20, 20), 3, np.uint8)  # lossy compression leaves grey levels near, not at, 0/128/255
    noisy[5:15, 5:15], noisy[8:12, 8:12] = 126, 252
    Image.fromarray(noisy).save(tmp_path / "m.png")
    snapped = load_mask(tmp_path / "m.png")
    assert snapped[0, 0] == 0 and snapped[6, 6] == 1 and snapped[10, 10] == 2


@needs_data
def test_cell_finding_crops_a_padded_crop_around_its_cell() -> None:
    padded = np.asarray(decode_image(DATA / "lisc" / "neutrophil" / "0000.jpg")).copy()
    padded[:60] = 0  # a black band as some LISC crops carry
    preprocess = Preprocess(image_size=128, spec=(("locate", "cell"),))
    (view,) = preprocess.views(padded, primary_only=True)
    x0, y0, x1, y1 = view.box
    assert view.found and y0 >= 60 and view.array.shape == (128, 128, 3)
    assert (view.array.max(axis=2) > 25).mean() > 0.99  # the band was replaced by background, not kept black


@needs_data
def test_a_field_with_two_white_cells_gives_two_views_with_their_boxes() -> None:
    cell_a = np.asarray(decode_image(DATA / "zheng2018" / "dataset2_cellavision" / "images" / "001.png"))
    cell_b = np.asarray(decode_image(DATA / "zheng2018" / "dataset2_cellavision" / "images" / "002.png"))
    field = np.full((480, 640, 3), 235, np.uint8)
    field[90:390, 10:310], field[90:390, 330:630] = cell_a, cell_b
    views = Preprocess(image_size=128, spec=(("locate", "cell"),)).views(field)
    assert len(views) == 2
    left, right = sorted(views, key=lambda v: v.box[0])
    assert left.box[2] <= 320 <= right.box[0] and all(v.found for v in views)
