"""Options and consoles shared by every CLI command, so each command module reads the same flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

DataOption = Annotated[
    Optional[Path], typer.Option("--data", help="Data root (default: $HEMACLIP_DATA, else ../shared/data).", show_default=False)
]
CheckpointOption = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", help="Model checkpoint (.pt). Default: the model shipped with hemaclip.", show_default=False),
]
