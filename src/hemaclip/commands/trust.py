"""`hemaclip trust`: parses the options and runs :func:`hemaclip_research.trust.run_trust_report`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hemaclip.commands.common import CheckpointOption, DataOption, console
from hemaclip.errors import HemaclipError


def _holdouts(values: list[str]) -> dict[str, str]:
    out = {}
    for text in values:
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise HemaclipError(f"--holdout '{text}': give CLASS=CHECKPOINT (a checkpoint trained with that class held out)")
        if not Path(path.strip()).is_file():
            raise HemaclipError(f"--holdout '{text}': checkpoint file not found")
        out[name.strip()] = path.strip()
    return out


def register(app: typer.Typer) -> None:
    """Add `hemaclip trust` to the root app."""

    @app.command("trust")
    def trust_command(
        checkpoint: CheckpointOption = None,
        holdout: Annotated[Optional[list[str]], typer.Option(
            help="CLASS=CHECKPOINT trained with that class held out (repeatable), for the leave-classes-out rows.")] = None,
        out: Annotated[Path, typer.Option(help="Report folder: metrics.json, report.md, report.html, figures/.")] = Path("reports/trust"),
        data: DataOption = None,
        n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the 95 % intervals.")] = 2000,
    ) -> None:
        """Does the model know what it does not know? In-lab false flags, other labs (flagged share, accuracy on
        unflagged cells, ECE before/after AdaBN, folder warning), ALL lymphoblasts and held-out classes (AUROC).

        The checkpoint needs its familiarity sidecar (hemaclip calibrate --checkpoint CKPT writes it).
        Example: hemaclip trust --holdout basophil=runs/holdout-basophil/best.pt --out reports/trust
        """
        from hemaclip_research.trust import run_trust_report

        held = _holdouts(list(holdout or []))
        m = run_trust_report(None if checkpoint is None else str(checkpoint), out, held, data_root=data, n_resamples=n_boot,
                             progress=sys.stderr.isatty())
        for name, block in m["in_lab"].items():
            console.print(f"{name}: {block['flagged_share']:.1%} flagged")
        for lab, block in m["other_labs"].items():
            b = block["none"]
            console.print(f"{lab}: {b['flagged_share']:.1%} flagged, accuracy {b['accuracy']['point']:.3f}, "
                          f"unflagged {b['accuracy_unflagged'] if b['accuracy_unflagged'] is not None else float('nan'):.3f}, ECE {b['ece']:.3f}")
        for name, block in m["atypical"].items():
            console.print(f"{name}: AUROC {block['auroc']['point']:.3f}")
        console.print(f"report: {out / 'report.html'}")
