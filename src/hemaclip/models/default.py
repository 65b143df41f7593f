"""The model hemaclip ships, used by every command when no --checkpoint is given."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hemaclip.errors import CheckpointError

DEFAULT_CHECKPOINT_NAME = "hemaclip-default.pt"


def default_checkpoint_path() -> Path:
    """Path of the shipped checkpoint inside the package (assets/), with a clear error if absent."""
    path = Path(str(resources.files("hemaclip") / "assets" / DEFAULT_CHECKPOINT_NAME))
    if not path.is_file():
        raise CheckpointError(f"{path}: the shipped default model is missing; pass --checkpoint PATH or reinstall hemaclip")
    return path


def resolve_checkpoint(path: str | Path | None) -> Path:
    """`path` if given (must exist), else the shipped default."""
    if path is None:
        return default_checkpoint_path()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path
