"""Text towers shipped as PyPI packages: a model split into archive parts over several packages is joined and
unpacked once into the cache, atomically, with one clear error for a missing part or a broken archive."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import pytest

from hemaclip.cache import cache_dir
from hemaclip.errors import HemaclipError
from hemaclip.models import text
from hemaclip.models.text import PackagedTextModel, resolve_text_source


def _split_packages(root: Path, payload: bytes, n_parts: int = 3) -> PackagedTextModel:
    """Fake installed packages part_1..part_n, each holding one slice of `payload` as input/model.zip.00<i>."""
    size = -(-len(payload) // n_parts)
    for i in range(n_parts):
        folder = root / f"fake-model-part_{i + 1}"
        (folder / "input").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "input" / f"model.zip.00{i + 1}").write_bytes(payload[i * size:(i + 1) * size])
    return PackagedTextModel(tuple(f"fake-model-part-{i + 1}" for i in range(n_parts)),
                             tuple(f"fake-model-part_{i + 1}" for i in range(n_parts)), "tiny-model", archive_part="input/model.zip.00{}")


def _zip_of_model() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("tiny-model/config.json", '{"model_type": "bert"}')
        archive.writestr("tiny-model/vocab.txt", "[PAD]\n" * 5000)  # big enough to be split for real
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of this test's own (the session cache would already hold the unpacked fake model)."""
    monkeypatch.setenv("HEMACLIP_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def install(payload: bytes) -> None:
        monkeypatch.setitem(text.PACKAGE_TEXT_MODELS, "fake-model", _split_packages(tmp_path / "site", payload))
        monkeypatch.syspath_prepend(str(tmp_path / "site"))

    return install


def test_a_split_archive_is_joined_and_unpacked_once_into_the_cache(packages) -> None:
    packages(_zip_of_model())
    folder = resolve_text_source("package:fake-model")
    assert folder == cache_dir() / "text-towers" / "fake-model" / "tiny-model"
    assert (folder / "config.json").read_text() == '{"model_type": "bert"}'
    stamp = (folder / "vocab.txt").stat().st_mtime_ns
    assert resolve_text_source("package:fake-model") == folder and (folder / "vocab.txt").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (cache_dir() / "text-towers").iterdir()) == ["fake-model"]  # no temporary folder left


def test_a_missing_part_or_a_broken_archive_is_one_clear_error_and_leaves_nothing(packages, tmp_path: Path) -> None:
    packages(b"not a zip archive at all" * 100)
    with pytest.raises(HemaclipError, match="not a zip file"):
        resolve_text_source("package:fake-model")
    towers = cache_dir() / "text-towers"
    assert not towers.exists() or list(towers.iterdir()) == []
    (tmp_path / "site" / "fake-model-part_2" / "input" / "model.zip.002").unlink()
    with pytest.raises(HemaclipError, match="archive part"):
        resolve_text_source("package:fake-model")


def test_an_uninstalled_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(text.PACKAGE_TEXT_MODELS, "fake-model", _split_packages(tmp_path / "elsewhere", _zip_of_model()))
    with pytest.raises(HemaclipError, match=r"pip install fake-model-part-1"):
        resolve_text_source("package:fake-model")
    assert "fake-model-part_1" not in sys.modules



def test_importing_the_text_module_sets_no_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import hemaclip.models.text` leaves os.environ alone; the offline switches are set by a text tower's load,
    before transformers is imported, and a user's own value is kept."""
    import os
    import subprocess

    code = "import os, hemaclip.models.text as t; print(sorted(k for k in t.OFFLINE_ENVIRONMENT if k in os.environ))"
    env = {k: v for k, v in os.environ.items() if k not in text.OFFLINE_ENVIRONMENT}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

    calls: list[bool] = []
    monkeypatch.setattr(text, "_offline_transformers", lambda: calls.append(True))
    with pytest.raises(HemaclipError):
        text.TextTower("package:no-such-text-model")
    assert calls == [True]
    monkeypatch.undo()
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    text._offline_transformers()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
