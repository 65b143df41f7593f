"""Shared fixtures: the real data root (tests use ../shared/data) and small synthetic image folders."""

from __future__ import annotations

import os
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
