"""`hemaclip robustness`: parses the options and runs :func:`hemaclip_research.robustness.run_robustness_report`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hemaclip.commands.common import CheckpointOption, DataOption, console
from hemaclip.errors import HemaclipError


def _parse_list(text: str | None, allowed: tuple, kind: type, what: str) -> tuple:
    if text is None or not text.strip():
        return allowed
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise HemaclipError(f"--{what}: cannot read '{text}'") from None
    unknown = [str(v) for v in values if v not in allowed]
    if unknown:
        raise HemaclipError(f"--{what}: unknown {', '.join(unknown)} (choose from {', '.join(map(str, allowed))})")
    return values


def register(app: typer.Typer) -> None:
    """Add `hemaclip robustness` to the root app."""

    @app.command("robustness")
    def robustness_command(
        out: Annotated[Path, typer.Option(help="Report folder: metrics.json, report.md, report.html, heat-maps.")] = Path("reports/robustness"),
        checkpoint: CheckpointOption = None,
        dataset: Annotated[str, typer.Option(help="Dataset with class prompts (wbcatt, pbc, ...).")] = "wbcatt",
        split: Annotated[str, typer.Option(help="Split whose images are corrupted.")] = "test",
        data: DataOption = None,
        max_per_class: Annotated[int, typer.Option(help="Test images per class (the default runs in a few minutes on 2 cores).")] = 60,
        baseline_train_per_class: Annotated[int, typer.Option(help="Clean train images per class for the baseline probe.")] = 200,
        corruptions: Annotated[Optional[str], typer.Option(help="Comma-separated subset of corruptions (default: all 11).")] = None,
        severities: Annotated[Optional[str], typer.Option(help="Comma-separated severities 1-5 (default: all).")] = None,
        baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Score the ImageNet-trunk probe baseline for mCE.")] = True,
        stain_norm: Annotated[str, typer.Option(help="Stain normalisation after corruption: none, macenko or reinhard.")] = "none",
        seed: Annotated[int, typer.Option(help="Seed of the image subset and of every corruption draw.")] = 0,
        study: Annotated[Optional[list[Path]], typer.Option(help="Add a result JSON with a report_section (repeatable).")] = None,
        reuse: Annotated[bool, typer.Option("--reuse", help="Re-render from OUT/metrics.json if it has the same settings.")] = False,
    ) -> None:
        """Corruption robustness (stain shift, blur, noise, JPEG, ...) at 5 severities, with CE and mCE against a baseline.

        Example: hemaclip robustness --out reports/robustness
        Quick look: hemaclip robustness --max-per-class 10 --corruptions stain_shift,jpeg --severities 1,5 --no-baseline --out /tmp/rob
        """
        from hemaclip.data.corruptions import CORRUPTION_NAMES, SEVERITIES
        from hemaclip_research.robustness import METRIC_TITLES, run_robustness_report

        chosen = _parse_list(corruptions, CORRUPTION_NAMES, str, "corruptions")
        levels = _parse_list(severities, SEVERITIES, int, "severities")
        m = run_robustness_report(out, checkpoint, dataset, split, data, max_per_class, baseline_train_per_class, chosen, levels,
                                  baseline, stain_norm, seed, list(study or []), progress=sys.stderr.isatty(), reuse=reuse)
        for metric, e in m["errors"].items():
            mce = e.get("mce")
            console.print(f"{METRIC_TITLES[metric]}: clean {e['clean_f1']:.3f}, mean corrupted {e['mean_corrupted_f1']:.3f}"
                          + (f", mCE {mce:.3f}" if mce is not None else ""))
        console.print(f"report: {out / 'report.html'} ({m['seconds']:.0f} s)")
