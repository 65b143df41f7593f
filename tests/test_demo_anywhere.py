"""The demo anywhere (issue 30): with no data folder `hemaclip demo` runs on the PBC test cells shipped in
the package; the wheel carries them and no reports, bench or tests; an installed wheel and a clone's
`make demo` both work with no ../shared/data beside them.

The installs use an *overlay* virtual environment: a fresh `python -m venv --without-pip` whose one extra
line (a .pth file) puts this environment's site-packages after its own. torch and the other dependencies
are then found without a 2-minute reinstall (and without a network), while hemaclip itself comes only
from what is installed into the new environment: a plain path in a .pth does not run the .pth files of
that folder, so this checkout's editable install (its own .pth) stays invisible there.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from hemaclip.data.attributes import PBC_CLASSES
from hemaclip.data.embedded import ATTRIBUTION_NAME, MANIFEST_NAME, embedded_sample_dir, load_embedded_sample
from hemaclip.errors import DataError
from hemaclip.studies.demo import demo_cells, demo_data_root

from bench import wheel_size

REPO = Path(__file__).resolve().parents[1]

ENTRY_POINT = Path(sys.executable).parent / "hemaclip"
PER_CLASS = 3
SAMPLE_BUDGET_BYTES = 2**20  # the "<= 1 MB" for the embedded cells
WHEEL_BUDGET_BYTES = 20 * 2**20  # the shipped model, its sidecars and the sample; far below a data set
DEMO_TIMEOUT_S = 900


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / MANIFEST_NAME).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that could point hemaclip at data or at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("HEMACLIP_DATA", "PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "COLUMNS": "400", **extra}


def overlay_venv(path: Path) -> Path:
    """A fresh venv that sees this environment's packages after its own (see the module docstring); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_hemaclip_test_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_install(python: Path, *args: str) -> None:
    """Install into the overlay venv only: no index, no dependencies, and not skipped because the parent
    environment already lists a hemaclip distribution."""
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", *args],
                   check=True, env=clean_env())


def assert_report_lists_embedded_cells(report: Path) -> None:
    """Every embedded cell is a row of the report's describe table with its true class beside the reading."""
    rows = [line for line in report.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    for cell in manifest_rows(embedded_sample_dir()):
        name = Path(cell["file"]).name
        row = next((r for r in rows if r.startswith(f"| {name} |")), None)
        assert row is not None, f"{name} is not in {report}"
        columns = [c.strip() for c in row.strip("|").split("|")]
        assert columns[1] == cell["label"], row  # true class, then the predicted class and its probability
        assert columns[2] in PBC_CLASSES, row


# --- the embedded sample --------------------------------------------------------------------------


def test_embedded_sample_is_three_cells_per_pbc_class_within_the_budget() -> None:
    records = load_embedded_sample()
    assert Counter(r.label for r in records) == {label: PER_CLASS for label in PBC_CLASSES}
    assert all(r.split == "test" for r in records)
    total = 0
    for record in records:
        with Image.open(record.path) as image:
            assert image.format == "JPEG" and max(image.size) <= 192
            image.load()
        total += record.path.stat().st_size
    assert total <= SAMPLE_BUDGET_BYTES
    attribution = (embedded_sample_dir() / ATTRIBUTION_NAME).read_text(encoding="utf-8")
    assert "CC BY 4.0" in attribution and "105474" in attribution and "Acevedo" in attribution


def test_embedded_cells_are_pbc_test_cells_of_their_true_class(data_root: Path) -> None:
    from hemaclip.data.datasets import load_dataset

    root = data_root.resolve()  # the loader resolves the data root (a symlinked data folder must still match)
    by_source = {r.path.resolve().relative_to(root).as_posix(): r for r in load_dataset("pbc", data_root=data_root).records}
    for cell in manifest_rows(embedded_sample_dir()):
        source = by_source[cell["source"]]
        assert source.split == "test", cell
        assert source.label == cell["label"] and Path(cell["file"]).parent.name == cell["label"]


def test_make_demo_sample_reproduces_the_packaged_sample(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo_cells"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_sample.py"), "--data", str(data_root), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    packaged = embedded_sample_dir()
    assert (out / MANIFEST_NAME).read_bytes() == (packaged / MANIFEST_NAME).read_bytes()
    assert (out / ATTRIBUTION_NAME).read_bytes() == (packaged / ATTRIBUTION_NAME).read_bytes()
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == sorted(p.relative_to(packaged) for p in packaged.rglob("*.jpg"))


def test_broken_embedded_sample_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="embedded demo sample is missing"):
        load_embedded_sample(tmp_path)
    shutil.copy(embedded_sample_dir() / MANIFEST_NAME, tmp_path / MANIFEST_NAME)
    with pytest.raises(DataError, match="listed in .* but missing"):
        load_embedded_sample(tmp_path)


# --- when the demo uses it ------------------------------------------------------------------------


def test_demo_uses_the_embedded_sample_only_when_no_data_folder_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEMACLIP_DATA", str(tmp_path / "nope"))
    root, why = demo_data_root(None)
    assert root is None and "HEMACLIP_DATA" in why
    cells = demo_cells(None, n=1, index_size=10)
    assert cells.embedded and len(cells.describe) == len(cells.index) == PER_CLASS * len(PBC_CLASSES)
    assert any("embedded sample" in line for line in cells.data_lines)
    assert any("CC BY 4.0" in line for line in cells.data_lines)
    present = tmp_path / "data"
    present.mkdir()
    monkeypatch.setenv("HEMACLIP_DATA", str(present))
    assert demo_data_root(None) == (present.resolve(), "")


def test_explicit_missing_data_stays_a_one_line_error(tmp_path: Path, assert_one_line_error) -> None:
    with pytest.raises(DataError):
        demo_data_root(tmp_path / "typo")
    result = subprocess.run([str(ENTRY_POINT), "demo", "--data", str(tmp_path / "typo"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 1
    assert_one_line_error(result, "typo")
    assert "embedded sample" not in result.stdout


# --- the wheel ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this working tree, built once (bench/wheel_size.py's builder: a copy, no network)."""
    return wheel_size.build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_the_sample_and_no_reports_bench_or_tests(wheel: Path, record_property) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"hemaclip", wheel.name.split("-py")[0] + ".dist-info"}, tops
    assert not [n for n in names if n.split("/", 1)[0] in ("reports", "bench", "tests", "scripts")]
    assert not [n for n in names if "/tests/" in n or n.endswith("report.html")]
    sample = {n for n in names if n.startswith(wheel_size.SAMPLE_PREFIX)}
    assert wheel_size.SAMPLE_PREFIX + MANIFEST_NAME in sample and wheel_size.SAMPLE_PREFIX + ATTRIBUTION_NAME in sample
    assert sum(n.endswith(".jpg") for n in sample) == PER_CLASS * len(PBC_CLASSES)
    contents = wheel_size.wheel_contents(wheel)
    assert contents["forbidden_entries"] == [] and contents["demo_sample"]["bytes"] <= SAMPLE_BUDGET_BYTES
    size = wheel.stat().st_size
    record_property("wheel_bytes", size)
    print(f"{wheel.name}: {size / 2**20:.2f} MiB")
    assert size <= WHEEL_BUDGET_BYTES


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_anywhere_on_the_embedded_cells(wheel: Path, tmp_path: Path) -> None:
    python = overlay_venv(tmp_path / "venv")
    pip_install(python, str(wheel))
    where = subprocess.run([str(python), "-c", "import hemaclip, hemaclip.data.paths as p; print(hemaclip.__file__); print(p.repo_default_data_root())"],
                           capture_output=True, text=True, check=True, env=clean_env(), cwd=tmp_path).stdout.splitlines()
    assert Path(where[0]).is_relative_to(tmp_path / "venv"), where  # the wheel's copy, not this checkout
    assert not Path(where[1]).exists(), where  # the default data folder cannot resolve from an install
    work = tmp_path / "anywhere"
    work.mkdir()
    assert not (work.parent / "shared" / "data").exists() and not (work / ".." / "shared" / "data").exists()
    result = subprocess.run([str(tmp_path / "venv" / "bin" / "hemaclip"), "demo"], capture_output=True, text=True, cwd=work,
                            timeout=DEMO_TIMEOUT_S, env=clean_env(HEMACLIP_DATA=str(tmp_path / "no-such-data")))
    assert result.returncode == 0, result.stderr[-3000:]
    note = [line for line in result.stdout.splitlines() if "used the embedded sample" in line]
    assert len(note) == 1 and "--data" in note[0]
    assert_report_lists_embedded_cells(work / "demo-output" / "report.md")


@pytest.mark.slow
def test_make_demo_on_a_clone_without_shared_data(tmp_path: Path) -> None:
    """`make demo` on a fresh clone (its committed HEAD) with no ../shared/data. The Makefile's install
    recipe needs a package index and minutes, so the overlay venv stands in for it: the clone is installed
    editable into it (as the recipe does) and the install stamp is touched; `make demo` then runs the
    demo target itself, with VENV pointing at that venv."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", REPO.as_uri(), str(clone)], check=True, timeout=300)
    assert not (clone.parent / "shared" / "data").exists()
    venv = tmp_path / "venv"
    python = overlay_venv(venv)
    pip_install(python, "--no-build-isolation", "-e", str(clone))
    (venv / ".hemaclip-installed").touch()
    result = subprocess.run(["make", "demo", f"VENV={venv}"], capture_output=True, text=True, cwd=clone,
                            timeout=DEMO_TIMEOUT_S, env=clean_env())
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "pip install" not in result.stdout  # the stamp held: make ran the demo, not the installer
    assert any("used the embedded sample" in line for line in result.stdout.splitlines())
    assert_report_lists_embedded_cells(clone / "demo-output" / "report.md")
