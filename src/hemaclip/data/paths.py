"""Where the data lives: `--data DIR`, else `$HEMACLIP_DATA`, else `../shared/data` beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

from hemaclip.errors import DataError

DATA_ENV = "HEMACLIP_DATA"
HOW_TO_GET_DATA = (
    "pass --data DIR or set HEMACLIP_DATA to a folder holding PBC_dataset_normal_DIB/ "
    "(Acevedo et al. 2020, Data in Brief 30:105474, Mendeley Data snkd93bnjr/1), "
    "wbcatt/ (Tsutsui et al., WBCAtt, NeurIPS 2023) and/or all_aria/ (Aria et al. 2021)"
)


def repo_default_data_root() -> Path:
    """`../shared/data` relative to the repository root (the checkout holding src/hemaclip)."""
    repo_root = Path(__file__).resolve().parents[3]
    return repo_root.parent / "shared" / "data"


def resolve_data_root(explicit: str | Path | None = None) -> Path:
    """Return the data root to use, raising a `DataError` that says how to get the data if none exists."""
    if explicit is not None:
        candidate, origin = Path(explicit), "--data"
    elif os.environ.get(DATA_ENV):
        candidate, origin = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        candidate, origin = repo_default_data_root(), "default"
    if not candidate.is_dir():
        raise DataError(f"{candidate}: data folder ({origin}) does not exist; {HOW_TO_GET_DATA}")
    return candidate.resolve()
