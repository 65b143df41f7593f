"""`hemaclip describe` (what the model sees in each image, in checkable words) and `hemaclip calibrate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hemaclip.commands.common import CheckpointOption, DataOption, console, logger
from hemaclip.errors import HemaclipError
from hemaclip.io import check_output_dir, prepare_output_dir
from hemaclip.tasks.calibration import calibration_path, fit_calibration
from hemaclip.tasks.describe import DEFAULTS, CellDescription, Describer
from hemaclip.tasks.familiarity import DEFAULT_METHOD, check_method, familiarity_path, fit_familiarity_for

ATTRIBUTE_ABBREVIATIONS = {"nuclear_cytoplasmic_ratio": "N:C ratio"}


def _index_argument(value: str) -> str | Path | None:
    if value.strip().lower() == "none":
        return None
    if value.strip().lower() == "default":
        return "default"
    path = Path(value)
    if not path.exists():
        raise HemaclipError(f"--index {value}: no such index folder (use 'default', 'none' or a folder from `hemaclip index build`)")
    return path


def _saliency_target(value: str) -> str:
    from hemaclip.data.attributes import ATTRIBUTES

    if value != "class" and value not in ATTRIBUTES:
        raise HemaclipError(f"--saliency-target must be 'class' or an attribute ({', '.join(ATTRIBUTES)}), not '{value}'")
    return value


def _write_saliency(describer: Describer, description: CellDescription, directory: Path, target: str, used: set[str]) -> None:
    from hemaclip.data.preprocess import decode_image
    from hemaclip.io import atomic_write
    from hemaclip.tasks.saliency import overlay_png, saliency_map

    image = describer.views(decode_image(description.source))[description.cell].array
    heat = saliency_map(describer.model, image, target=target)
    stem = Path(description.source).stem + (f"-cell{description.cell}" if description.cell else "")
    name = f"{stem}.{target}.png"
    n = 1
    while name in used:  # two inputs with one file name in different folders
        n += 1
        name = f"{stem}-{n}.{target}.png"
    used.add(name)
    with atomic_write(directory / name, "wb") as handle:
        handle.write(overlay_png(image, heat))


def _table(rows: list, calibrated: bool) -> Table:
    prob = "p" if calibrated else "p (uncalibrated)"
    table = Table(show_lines=True)
    for column in ("image", "class", prob, "runner-up", "what is stated", "nearest reference cells"):
        table.add_column(column, overflow="fold")
    for d in rows:
        if d.error is not None:
            table.add_row(d.source, "[red]error[/red]", "", "", d.error, "")
            continue
        label = f"[yellow]{d.label} (abstain)[/yellow]" if d.abstain else d.label
        if d.unfamiliar:
            label += " [red](unfamiliar)[/red]"
        neighbours = ", ".join(f"{h['label']} {h['score']:.2f}" for h in d.neighbours)
        name = Path(d.source).name + (f" cell {d.cell + 1} {tuple(d.box)}" if d.cell or not d.cell_found else "")
        table.add_row(name, label, f"{d.probability:.3f}",
                      f"{d.runner_up} {d.runner_up_probability:.3f}" if d.runner_up else "", d.sentence, neighbours)
    return table


def describe(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (walked recursively).", show_default=False)],
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout (errors too).")] = False,
    index: Annotated[str, typer.Option("--index", help="Reference cells for neighbours: 'default' (WBCAtt train, built "
                                       "once into the cache), 'none', or an index folder.")] = "default",
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0,
                                             help="State an attribute only if its calibrated probability exceeds this.")]
    = DEFAULTS.attribute_threshold,
    abstain_below: Annotated[float, typer.Option("--abstain-below", min=0.0, max=1.0,
                                                 help="Flag the class as 'abstain' below this calibrated probability.")]
    = DEFAULTS.abstain_below,
    saliency: Annotated[Optional[Path], typer.Option("--saliency", help="Write a saliency overlay PNG per image into this folder.")] = None,
    saliency_target: Annotated[str, typer.Option("--saliency-target", help="'class' or an attribute name, e.g. nucleus_shape.")] = "class",
    stain_norm: Annotated[str, typer.Option("--stain-norm", help="Stain normalisation before the model: none, macenko or reinhard.")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images decoded and run per batch.")] = DEFAULTS.batch_size,
    adapt: Annotated[str, typer.Option("--adapt", help="Test-time adaptation to the images given: 'none', 'bn' "
                                       "(re-estimate the model's BatchNorm statistics on them first) or 'entropy' "
                                       "(Tent: tune BatchNorm scales so the class read-out is confident on them). "
                                       "Neither helped on the other labs measured (docs/research-log.md, Other labs).")] = "none",
    classes: Annotated[Optional[str], typer.Option("--classes", help="Comma-separated classes the pictures can show, e.g. "
                                                   "'basophil,eosinophil,lymphocyte,monocyte,neutrophil' for a white-cell-only "
                                                   "export: the class read-out is renormalised over them (default: every class "
                                                   "of the model).")] = None,
    lab: Annotated[Optional[str], typer.Option("--lab", help="Read classes through this lab's fitted read-out and flag cells "
                                               "by its familiarity bar (`hemaclip lab add/fit`).", show_default=False)] = None,
    labs: Annotated[Optional[Path], typer.Option("--labs", help="Folder of lab profiles (default: $HEMACLIP_LABS, else "
                                                 "~/.local/share/hemaclip/labs).", show_default=False)] = None,
) -> None:
    """Describe blood-cell images: class with a calibrated probability and the runner-up, the 11 WBCAtt
    attributes with probabilities, a sentence stating only confident attributes, and the most similar
    reference cells. Research software: not a diagnosis.

    Unreadable files are reported (a warning on stderr; with --json also a record with "source" and "error") and the run goes on; at the end the exit status is 1 if any file failed, else 0.

    Example: hemaclip describe ../shared/data/PBC_dataset_normal_DIB/basophil --json --index none > out.jsonl
    """
    from hemaclip.tasks.describe import iter_image_paths

    profile = None
    if lab is not None:  # before the model loads: an unknown or foreign profile is one line
        from hemaclip.tasks.lab import open_for_model

        profile = open_for_model(lab, labs, checkpoint)
        profile.head()
    if next(iter_image_paths(images), None) is None:
        raise HemaclipError(f"no image files found in {', '.join(str(p) for p in images)}")
    target = _saliency_target(saliency_target)
    if saliency is not None:
        check_output_dir(saliency, "--saliency")
    from hemaclip.data.stain import get_normalizer

    normalizer = get_normalizer(stain_norm)
    from hemaclip.tasks.lab import checkpoint_for

    reference = _index_argument(index)
    describer = Describer.from_checkpoint(checkpoint_for(profile, checkpoint), index=None if reference == "default" else reference,
                                          data_root=data, attribute_threshold=threshold, abstain_below=abstain_below,
                                          stain_normalizer=normalizer, progress=True, adapt=adapt, classes=classes)
    if reference == "default":
        describer.build_reference_index()
    if profile is not None:
        from hemaclip.tasks.lab import lab_reader

        describer.use_lab(lab_reader(profile, describer), profile.name)
    if not describer.calibrated and profile is None:
        logger.warning("warning: probabilities are uncalibrated (T = 1): %s", describer.uncalibrated_reason)
    if saliency is not None:
        prepare_output_dir(saliency, "--saliency")
    failed = seen = 0
    used: set[str] = set()
    buffer: list = []
    scores: list[float] = []  # unfamiliarity of every cell, for the folder-level verdict (not the descriptions: memory stays flat)
    for d in describer.describe_paths(images, batch_size=batch_size, progress=True):
        seen += 1
        if d.error is None and d.unfamiliarity is not None:
            scores.append(d.unfamiliarity)
        if d.error is not None:
            failed += 1
            logger.warning("warning: %s", d.error)
        elif saliency is not None:
            _write_saliency(describer, d, saliency, target, used)
        if as_json:
            sys.stdout.write(json.dumps(d.to_dict()) + "\n")
            sys.stdout.flush()
        else:
            buffer.append(d)
            if len(buffer) >= batch_size:
                console.print(_table(buffer, describer.calibrated))
                buffer = []
    if buffer:
        console.print(_table(buffer, describer.calibrated))
    if profile is not None:
        logger.info("classes read by lab '%s' (its read-out, temperature and familiarity bar fitted on its labelled cells)", profile.name)
    elif describer.familiarity is None:
        logger.warning("note: no familiarity file beside the checkpoint, so no cell is flagged as unfamiliar (run hemaclip calibrate)")
    else:
        shift = describer.familiarity.folder_shift(scores)
        if shift is not None and shift.shifted:
            logger.warning("%s", shift.message)
        elif shift is not None:
            logger.info("%s", shift.message)
    if failed:
        raise HemaclipError(f"{failed} of {seen} file(s) could not be described (see the warnings above)")


def calibrate(
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
    unfamiliarity: Annotated[str, typer.Option(
        metavar="knn|mahalanobis",
        help="Unfamiliarity score: distance to the k-th nearest PBC training embedding (default; separated a held-out "
             "class best on PBC val) or the class-conditional Mahalanobis distance.")] = DEFAULT_METHOD,
) -> None:
    """Fit the temperatures `describe` uses (class on PBC val, each attribute on WBCAtt val; never test) and
    the unfamiliarity score (PBC train embeddings, threshold on PBC val), and write them beside the
    checkpoint as <name>.calibration.json and <name>.familiarity.npz.

    Example: hemaclip calibrate --checkpoint runs/mine/best.pt
    """
    check_method(unfamiliarity)  # before any work: the fit below needs minutes
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint
    path = resolve_checkpoint(checkpoint)
    model, _ = load_for_inference(path)
    result = fit_calibration(model, path, data_root=data, progress=True)
    familiarity = fit_familiarity_for(model, path, data_root=data, progress=True, method=unfamiliarity)
    console.print(f"class temperature ({result.class_source}): {result.class_temperature:.3f}")
    for name, t in result.attribute_temperatures.items():
        console.print(f"  {ATTRIBUTE_ABBREVIATIONS.get(name, name)}: {t:.3f}")
    console.print(f"written to {calibration_path(path)}")
    console.print(f"unfamiliarity ({familiarity.label}) threshold {familiarity.threshold:.4g} ({familiarity.expected_share:.1%} of PBC val flagged); "
                  f"written to {familiarity_path(path)}")


def register(app: typer.Typer) -> None:
    app.command("describe")(describe)
    app.command("calibrate")(calibrate)
