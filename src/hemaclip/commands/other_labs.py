"""`hemaclip other-labs`: parses the options and runs :func:`hemaclip_research.other_labs.run_other_labs`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hemaclip.commands.common import DataOption, console
from hemaclip.errors import HemaclipError


def _model_entries(checkpoints: list[str]) -> list:
    from hemaclip_research.other_labs import ModelEntry

    entries = []
    for text in checkpoints:
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text).stem if text != "default" else "default", text
        if not name.strip() or not path.strip():
            raise HemaclipError(f"--model '{text}': give NAME=CHECKPOINT (or just CHECKPOINT, or 'default')")
        entries.append(ModelEntry(name.strip(), None if path.strip() == "default" else path.strip()))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise HemaclipError(f"--model names must differ, got {', '.join(names)}")
    return entries


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise HemaclipError(f"--{what}: unknown '{', '.join(unknown) or text}' (choose from {', '.join(allowed)})")
    return values


def register(app: typer.Typer) -> None:
    """Add `hemaclip other-labs` to the root app."""

    @app.command("other-labs")
    def other_labs_command(
        model: Annotated[Optional[list[str]], typer.Option(
            help="NAME=CHECKPOINT to score (repeatable; 'default' = the shipped model). The first is the baseline of the paired tests.")] = None,
        out: Annotated[Path, typer.Option(help="Report folder: metrics.json, report.md, report.html, figures/.")] = Path("reports/other-labs"),
        labs: Annotated[str, typer.Option(help="Comma-separated other-lab datasets.")] = "lisc,zheng1,zheng2",
        split: Annotated[str, typer.Option(help="Which part of each lab to score (val to choose recipes, test to report).")] = "test",
        adapt: Annotated[str, typer.Option(help="Comma-separated test-time options: none, bn (AdaBN on each lab's cells first), entropy (Tent on them first), reinhard, macenko (stain normalisation), white-cells (the read-out renormalised over the 5 white-cell classes, as describe --classes).")] = "none,bn,entropy,reinhard,macenko,white-cells",
        data: DataOption = None,
        n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the 95 % intervals and paired tests.")] = 2000,
    ) -> None:
        """Score checkpoints on other labs' cells (LISC, Zheng 1, Zheng 2), leave-one-lab-out, as describe reads them.

        A checkpoint is never scored on a lab its training used. Five white-cell classes; predicting any other
        class is wrong. Per lab: macro F1 and accuracy with 95 % intervals (LISC resamples whole near-duplicate
        groups), per-class F1, confusion, ECE, share flagged unfamiliar and accuracy on the rest.

        Example: hemaclip other-labs --model old=old.pt --model new=default --out reports/other-labs
        """
        from hemaclip_research.other_labs import ADAPTATIONS, OTHER_LABS, run_other_labs

        entries = _model_entries(model or ["default"])
        m = run_other_labs(entries, out, _choices(labs, OTHER_LABS, "labs"), split, _choices(adapt, ADAPTATIONS, "adapt"),
                           data, n_boot, progress=sys.stderr.isatty())
        for name, block in m["models"].items():
            for key, r in block["labs"].items():
                if "not_scored" in r:
                    console.print(f"{name} {key}: not scored ({r['not_scored']})")
                else:
                    f1 = r["macro_f1"]
                    console.print(f"{name} {key}: macro F1 {f1['point']:.3f} [{f1['low']:.3f}, {f1['high']:.3f}], "
                                  f"accuracy {r['accuracy']['point']:.3f}, ECE {r['ece']:.3f}, n {r['n']}")
        console.print(f"report: {out / 'report.html'}")
