"""Shared fixtures: the real data root (tests use ../shared/data), tiny models and checkpoints, the CLI.

Speed tiers: `pytest -m "not slow"` is the development tier (about three minutes on 2 cores); the 13 slowest
tests carry `@pytest.mark.slow`; `make test` (CI) runs everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hemaclip.data.paths import repo_default_data_root


def real_data_root() -> Path | None:
    root = Path(os.environ["HEMACLIP_DATA"]) if os.environ.get("HEMACLIP_DATA") else repo_default_data_root()
    return root if (root / "wbcatt").is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real data not found: set HEMACLIP_DATA or place the data at ../shared/data")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep hash/feature caches of the tests out of the user's home, shared across one session."""
    monkeypatch.setenv("HEMACLIP_CACHE", str(tmp_path_factory.getbasetemp() / "hemaclip-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: tiny models gain nothing from more, and
    spinning OpenMP threads on a busy shared machine can make each forward pass tens of times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Tiny models and checkpoints: random towers at 32 px, built once per session (they were built about
# twenty times across ten files). Checkpoints are read-only for tests; copy one before changing it.
# --------------------------------------------------------------------------------------------------

WBC5 = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def tiny_model(tower: str = "effnet-lite0-128", seed: int = 0, **overrides):
    """A random model of a packaged tower at 32 px (EfficientNet-Lite0: BatchNorm and TF-same convs, so
    inference preparation is exercised; "vit-tiny-128": a ViT), seeded, with the WBCAtt classes."""
    import torch

    from hemaclip.models import create_model

    torch.manual_seed(seed)
    return create_model(tower, image_size=32, image_pretrained=None, **overrides)


@pytest.fixture(scope="session")
def make_tiny_model():
    """`tiny_model(tower="effnet-lite0-128", seed=0, **overrides)`: a fresh tiny model (see above)."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny EfficientNet-Lite0 (seed 0, WBCAtt classes) saved once per session."""
    from hemaclip.models.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-effnet.pt", tiny_model())


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT (seed 0, WBCAtt classes) saved once per session."""
    from hemaclip.models.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-vit.pt", tiny_model("vit-tiny-128"))


# --------------------------------------------------------------------------------------------------
# The command line as a user runs it: a subprocess of `python -m hemaclip.cli`
# --------------------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "hemaclip.cli"]


def _run_cli(*args: str, timeout: int = 600, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    # COLUMNS: wide enough that rich does not wrap a table's text.
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "400", **(env or {})})


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*args, timeout=600, env=None, cwd=None)`: `hemaclip ARGS` in a subprocess, output captured."""
    return _run_cli


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0]


@pytest.fixture(scope="session")
def assert_one_line_error():
    """`assert_one_line_error(result, needle)`: the command failed with exactly one 'error: ...' line naming `needle`."""
    return _assert_one_line_error


@pytest.fixture
def main_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`main_in_process(*args) -> (exit code, stdout, stderr)`: `hemaclip ARGS` through the entry point's
    function in this process (faster than a subprocess; sees what `cli.main` does with errors)."""
    from hemaclip.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["hemaclip", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
# --------------------------------------------------------------------------------------------------
# Headless Chromium (Debian's chromium + chromedriver, never downloaded) for the page tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by selenium, one per test module; skips when Chromium is not installed."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium/chromedriver not installed (run `make browser`, or apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
