"""`hemaclip leukemia run`: parses the options and runs :func:`hemaclip_research.leukaemia.run_study`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hemaclip.commands.common import DataOption, console, parse_set_options


def _overrides(set_: Optional[list[str]], epochs: Optional[int], max_train_images: Optional[int]) -> dict:
    """Training options of the study's runs: --set pairs, then --epochs and --max-train-images."""
    overrides = parse_set_options(set_)
    if epochs is not None:
        overrides["epochs"] = epochs
    if max_train_images is not None:
        overrides["max_train_images"] = max_train_images
    return overrides


def register(app: typer.Typer) -> None:
    """Add the `leukemia` command group."""
    group = typer.Typer(help="Leukaemia subtypes (ALL set): class sentences vs a plain supervised classifier.", no_args_is_help=True)
    app.add_typer(group, name="leukemia")

    @group.command("run")
    def run_command(
        out: Annotated[Path, typer.Option(help="Report folder: report.md, report.html, metrics.json, figures.")] = Path("reports/leukemia"),
        runs: Annotated[Path, typer.Option(help="Folder of the training runs, one sub-folder per arm (kept, resumed or trained).")] = Path("runs/leukemia"),
        init: Annotated[Optional[list[str]], typer.Option(help="Initialisation(s): default (shipped model), imagenet, scratch or a .pt path; repeat for several.")] = None,
        epochs: Annotated[Optional[int], typer.Option(help="Training epochs per run (default: the packaged ALL configs, 6).")] = None,
        max_train_images: Annotated[Optional[int], typer.Option(help="Train on a stratified subset (quick looks).")] = None,
        max_eval_images: Annotated[Optional[int], typer.Option(help="Score a stratified subset of each split (quick looks).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any other training option, e.g. --set freeze_image_fraction=0.3.")] = None,
        train_runs: Annotated[bool, typer.Option("--train/--no-train", help="Train missing runs, or only score existing ones.")] = True,
        shipped: Annotated[bool, typer.Option("--shipped/--no-shipped", help="Also score the shipped model as is (reference rows).")] = True,
        bench: Annotated[Optional[Path], typer.Option(help="Also write timings and headline numbers to this JSON file.")] = None,
        data: DataOption = None,
    ) -> None:
        """Train both twins per init on the ALL set, score them on the test split, write the report.

        Example: hemaclip leukemia run --out reports/leukemia --init default --init imagenet --epochs 6
        Quick look: hemaclip leukemia run --out /tmp/all --runs /tmp/all-runs --init default --epochs 1 --max-train-images 256
        """
        overrides = _overrides(set_, epochs, max_train_images)
        command = "hemaclip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        from hemaclip_research.leukaemia import DEFAULT_INITS, run_study  # research code: imported only when run

        paths = run_study(out, runs, init or list(DEFAULT_INITS), overrides, data_root=data, train_missing=train_runs, include_shipped=shipped,
                          max_eval_images=max_eval_images, bench=bench, command=command, progress=None)
        for kind, path in paths.items():
            console.print(f"{kind}: {path}")

    @group.command("colour")
    def colour_command(
        out: Annotated[Path, typer.Option(help="Report folder: report.md, report.html, metrics.json, figures.")] = Path("reports/leukemia/colour"),
        runs: Annotated[Path, typer.Option(help="Folder of the training runs (default-ce, default-ce-grey, default-text-grey, default-ce-clusters).")] = Path("runs/leukemia"),
        reference: Annotated[Optional[Path], typer.Option(help="metrics.json of the committed `leukemia run` report: its rows shown for context.")] = None,
        init: Annotated[str, typer.Option(help="Initialisation of every run: default (shipped model), imagenet, scratch or a .pt path.")] = "default",
        epochs: Annotated[Optional[int], typer.Option(help="Training epochs per run (default: the packaged ALL configs, 6).")] = None,
        max_train_images: Annotated[Optional[int], typer.Option(help="Train on a stratified subset (quick looks).")] = None,
        max_eval_images: Annotated[Optional[int], typer.Option(help="Score a stratified subset of each split (quick looks).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any other training option, e.g. --set stain_jitter=0.5.")] = None,
        train_runs: Annotated[bool, typer.Option("--train/--no-train", help="Train missing runs, or only score existing ones.")] = True,
        bench: Annotated[Optional[Path], typer.Option(help="Also write timings and headline numbers to this JSON file.")] = None,
        data: DataOption = None,
    ) -> None:
        """How much of the ALL accuracy is colour: shortcut readers, stain-blind (grey) twins, a cluster-grouped split.

        Example: hemaclip leukemia colour --out reports/leukemia/colour --reference reports/leukemia/metrics.json
        """
        overrides = _overrides(set_, epochs, max_train_images)
        command = "hemaclip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        from hemaclip_research.leukaemia_colour import run_colour_study  # imports the trainer: only when run

        paths = run_colour_study(out, runs, overrides, data_root=data, init=init, train_missing=train_runs, max_eval_images=max_eval_images,
                                 reference=reference, bench=bench, command=command, progress=None)
        for kind, path in paths.items():
            console.print(f"{kind}: {path}")
