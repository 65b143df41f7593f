"""`hemaclip lab`: onboard a new lab (add its cells, choose which to label, fit its read-out, report what was learnt)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hemaclip.commands.common import CheckpointOption, DataOption, console, logger
from hemaclip.errors import HemaclipError

lab_app = typer.Typer(help="Onboard a new lab: its cells, which to label first, a read-out fitted on its labels.",
                      no_args_is_help=True)

LabsOption = Annotated[Optional[Path], typer.Option("--labs", help="Folder of lab profiles (default: $HEMACLIP_LABS, else "
                                                    "~/.local/share/hemaclip/labs).", show_default=False)]
LabName = Annotated[str, typer.Argument(help="The lab's name (as given to `hemaclip lab add`).")]
OutOption = Annotated[Optional[Path], typer.Option("--out", help="Folder for report.md, report.json and learning_curve.png "
                                                   "(default: the profile's report/ folder).", show_default=False)]
LabelsOption = Annotated[Optional[Path], typer.Option("--labels", help="A CSV of labels (columns source, cell, label; a review's "
                                                      "cells.csv gives its reviewed cells); replaces the profile's labels.",
                                                      show_default=False)]


@lab_app.command("add")
def lab_add(
    name: Annotated[str, typer.Argument(help="A name for the lab (letters, digits, - _ .).")],
    folder: Annotated[Path, typer.Argument(help="The lab's cell images: crops, an export or fields (walked recursively).")],
    budget: Annotated[int, typer.Option("--budget", min=0, help="How many cells to choose for labelling.")] = 50,
    labels_from_folders: Annotated[bool, typer.Option("--labels-from-folders", help="FOLDER is laid out ROOT/<class>/<image>: "
                                                      "take the labels of the chosen cells (only those) from their folder names.")] = False,
    towers: Annotated[str, typer.Option("--towers", help="Feature towers of the read-out: 'model' (the model's embedding, fast) "
                                        "or 'model,dinov2' (adds frozen DINOv2 ViT-S/14 features: better on some labs, "
                                        "about 10x slower to read; docs/onboarding.md).")] = "model",
    replace: Annotated[bool, typer.Option("--replace", help="Build an existing lab again (its labels are lost).")] = False,
    selection: Annotated[str, typer.Option("--selection", help="How the cells to label are chosen: typical-kcenter (the least "
                                           "certain and most different among the lab's more typical half), kcenter (the "
                                           "same over every cell: picks outliers in a large folder), typiclust (the most "
                                           "typical cell of each k-means cluster) or random; compared in docs/onboarding.md.")] = "typical-kcenter",
    labs: LabsOption = None,
    checkpoint: CheckpointOption = None,
) -> None:
    """Read every cell of FOLDER, choose which cells a person should label first (the least certain and most
    different ones among the lab's typical cells, one crop per source cell), and save the lab's profile.

    Label the chosen cells (to_label.csv in the profile) in `hemaclip serve --review`, or take them from a labelled
    archive with --labels-from-folders; then run `hemaclip lab fit NAME`.

    Example: hemaclip lab add tehran ../shared/data/lisc --labels-from-folders --budget 50
    """
    from hemaclip.cache import file_sha1
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.lab import add_lab, check_name, check_towers
    from hemaclip.tasks.onboarding import check_selection

    check_name(name)
    tower_list = check_towers(towers)
    check_selection(selection)
    if not folder.is_dir():
        raise HemaclipError(f"{folder}: not a folder of cell images")
    path = resolve_checkpoint(checkpoint)
    describer = Describer.from_checkpoint(path, index=None, progress=True)
    profile = add_lab(describer, file_sha1(path), name, folder, labs=labs, budget=budget, towers=tower_list,
                      labels_from_folders=labels_from_folders, replace=replace, progress=True, selection=selection)
    meta = profile.meta
    console.print(f"lab '{name}': {meta['cells']} cells ({meta['source_cells']} source cells) read; {len(profile.chosen())} chosen "
                  f"for labelling in {profile.root / 'to_label.csv'}")
    if labels_from_folders:
        console.print(f"labels of the {len(profile.labels())} chosen cells taken from their folders; next: hemaclip lab fit {name}")


@lab_app.command("fit")
def lab_fit(
    name: LabName,
    labels: LabelsOption = None,
    fine_tune: Annotated[Optional[bool], typer.Option("--fine-tune/--no-fine-tune", help="First fine-tune the model's image "
                                                      "tower and class head on the labelled cells mixed with PBC training cells "
                                                      "(about 2 minutes on 2 cores; needs the PBC data, --data); the lab then reads "
                                                      "with its own model. Default: fine-tune when the PBC data is readable, else "
                                                      "say so and fit the read-out on the base model's features.",
                                                      show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Fine-tuning steps (batches of 16 lab + 16 PBC cells).")] = 150,
    data: DataOption = None,
    labs: LabsOption = None,
    checkpoint: CheckpointOption = None,
) -> None:
    """Fine-tune the model's image tower on the lab's labelled cells (mixed with PBC training cells, about 2 minutes;
    --no-fine-tune skips it), then fit the lab's read-out: a linear read-out on the lab-standardised features with the
    model's calibrated scores as its prior, its penalty, prior weight and temperature chosen by cross-validation over
    source cells, and a familiarity bar from the labelled cells (seconds for 100 cells on 2 cores).

    Example: hemaclip lab fit tehran
    """
    from hemaclip.tasks.lab import (ReferenceCellsUnavailable, clear_fine_tune, fine_tune_lab, fit_lab, open_for_model,
                                    read_label_csv)
    from hemaclip.train.finetune import FineTuneSettings

    profile = open_for_model(name, labs, checkpoint)
    if labels is not None:
        profile.write_labels(read_label_csv(labels))
    done = None
    if fine_tune is not False:
        try:
            done = fine_tune_lab(profile, checkpoint, data_root=data, settings=FineTuneSettings(steps=steps), progress=True)
        except ReferenceCellsUnavailable as error:
            if fine_tune:  # asked for explicitly: refuse
                raise
            console.print(f"not fine-tuned: {error}; the read-out is fitted on the base model's features (--data PBC_ROOT to fine-tune)")
    if done is not None:
        console.print(f"image tower fine-tuned on {done['labelled_cells']} labelled cells and {done['reference_cells']} PBC cells "
                      f"in {done['seconds']:.0f} s ({done['steps']} steps); saved in {profile.root / 'model.pt'}")
    elif profile.fine_tuned:
        clear_fine_tune(profile)
        console.print("the lab's fine-tuned model is removed; the read-out is fitted on the base model's features")
    _head, summary = fit_lab(profile)
    console.print(f"lab '{name}': read-out over {', '.join(summary['classes'])} fitted on {summary['labelled_cells']} labelled cells "
                  f"({summary['source_cells']} source cells) in {summary['fit_seconds']:.1f} s; penalty {summary['l2']:g}, prior weight "
                  f"{summary['prior_weight']:g}, temperature {summary['temperature']:.2f}")
    console.print(f"use it with: hemaclip describe FOLDER --lab {name}   (report: hemaclip lab report {name})")


@lab_app.command("report")
def lab_report(
    name: LabName,
    out: OutOption = None,
    labs: LabsOption = None,
    checkpoint: CheckpointOption = None,
) -> None:
    """Write what the lab's read-out learnt, from how many cells, and its learning curve (cross-validated over the
    lab's labelled source cells).

    Example: hemaclip lab report tehran
    """
    from hemaclip.io import check_output_dir
    from hemaclip.tasks.lab import open_for_model, write_lab_report

    profile = open_for_model(name, labs, checkpoint)
    target = check_output_dir(out or profile.root / "report")
    report = write_lab_report(profile, target)
    console.print(f"written to {target}/report.md, report.json, learning_curve.png")
    for row in report["learning_curve"]:
        console.print(f"  {row['n']:>4} labelled cells: cross-validated accuracy {row['accuracy']:.3f}, macro F1 {row['macro_f1']:.3f}")


@lab_app.command("list")
def lab_list(labs: LabsOption = None, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the lab profiles: cells, labelled cells, whether a read-out is fitted."""
    from hemaclip.tasks.lab import list_labs

    rows = list_labs(labs)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"lab profiles in {rows[0]['labs'] if rows else 'the labs folder'}", title_justify="left")
    for column in ("lab", "cells", "chosen", "labelled", "fitted", "towers"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], str(row["cells"]), str(row["chosen"]), str(row["labelled"]), "yes" if row["fitted"] else "no",
                      ",".join(row["towers"]))
    console.print(table)
    if not rows:
        logger.info("no lab profiles yet: hemaclip lab add NAME FOLDER")


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")
