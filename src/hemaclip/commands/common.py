"""Options shared by every CLI command (so each command module reads the same flags), the stdout console for
results, and the logger every command says what it is doing through (hemaclip.log)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from hemaclip.errors import HemaclipError
from hemaclip.log import get_logger

console = Console()  # results on stdout (tables, JSON); messages go through `logger`
logger = get_logger("hemaclip.commands")

DataOption = Annotated[
    Optional[Path], typer.Option("--data", help="Data root (default: $HEMACLIP_DATA, else ../shared/data).", show_default=False)
]
CheckpointOption = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", help="Model checkpoint (.pt). Default: the model shipped with hemaclip.", show_default=False),
]


def parse_set_options(items: Sequence[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` options as a dict; values are read as JSON when they parse, else kept as text."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HemaclipError(f"--set {item}: expected KEY=VALUE (e.g. epochs=5 or model.g_channels=32)")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides
