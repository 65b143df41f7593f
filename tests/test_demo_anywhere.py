"""The package carries no data (issue 30 was asked to ship PBC cells in it; the project's rule forbids carrying a
copy of ../shared/data, so it ships none): the wheel holds no images, reports, bench or tests, and `hemaclip demo`
with no data folder stops with one line that says how to get the data, writing nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import wheel_size

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).parent / "hemaclip"
WHEEL_BUDGET_BYTES = 20 * 2**20  # the shipped model and its sidecars; far below a data set


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HEMACLIP_DATA", "PYTHONPATH")}
    return {**env, "COLUMNS": "400", **extra}


@pytest.mark.parametrize("how", ["--data", "HEMACLIP_DATA"])
def test_demo_without_a_data_folder_is_one_line_and_writes_nothing(how: str, tmp_path: Path, assert_one_line_error) -> None:
    missing = str(tmp_path / "no-such-data")
    args = ["demo", "--out", str(tmp_path / "out")] + (["--data", missing] if how == "--data" else [])
    result = subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=clean_env(**({"HEMACLIP_DATA": missing} if how == "HEMACLIP_DATA" else {})))
    assert result.returncode == 1
    assert_one_line_error(result, "no-such-data")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this working tree, built once (bench/wheel_size.py's builder: a copy, no network)."""
    return wheel_size.build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_no_data_reports_bench_or_tests(wheel: Path, record_property) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    # the runtime package and, beside it, the research package (studies, report writers) that `hemaclip evaluate`,
    # `other-labs`, ... run: one distribution, two top-level packages, as open_clip ships open_clip_train
    assert tops == {"hemaclip", "hemaclip_research", wheel.name.split("-py")[0] + ".dist-info"}, tops
    assert "hemaclip_research/evaluate/__init__.py" in names and not any(n.startswith("hemaclip/studies/") for n in names)
    contents = wheel_size.wheel_contents(wheel)
    assert contents["forbidden_entries"] == []
    assert contents["image_files"] == []  # no cell images: data is read from the data folder, never shipped
    size = wheel.stat().st_size
    record_property("wheel_bytes", size)
    assert size <= WHEEL_BUDGET_BYTES


def test_the_repository_tracks_no_cell_images_outside_reports() -> None:
    """No copy of ../shared/data in the repository: tracked images live only under reports/ (figures) and the
    web page's static folder."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True, cwd=REPO).stdout.splitlines()
    images = [p for p in tracked if p.lower().endswith(wheel_size.IMAGE_SUFFIXES)
              and not p.startswith(("reports/", "src/hemaclip/serve/static/", "bench/results/"))]
    assert images == []
