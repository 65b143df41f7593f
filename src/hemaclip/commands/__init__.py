"""Command groups of the `hemaclip` CLI that live outside cli.py, one module per area.

Every module here (not starting with an underscore) defines `register(app)`, which adds its commands
to the root typer app; cli.py calls `register_all` once, so adding an area never edits cli.py.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    """Import each command module of this package (sorted by name) and let it add its commands."""
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_") or module_info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        module.register(app)
