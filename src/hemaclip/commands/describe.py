"""`hemaclip describe` (what the model sees in each image, in checkable words) and `hemaclip calibrate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.table import Table

from hemaclip.commands.common import CheckpointOption, DataOption, console, err_console
from hemaclip.errors import DataError, HemaclipError
from hemaclip.io import write_json
from hemaclip.tasks.describe import DEFAULTS, Calibration, Readout, calibration_path

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


def _write_saliency(describer, description, directory: Path, target: str, used: set[str]) -> None:
    from hemaclip.data.preprocess import decode_image
    from hemaclip.io import atomic_write
    from hemaclip.tasks.saliency import overlay_png, saliency_map

    image = describer.prepare(decode_image(description.source))
    heat = saliency_map(describer.model, image, target=target)
    stem = Path(description.source).stem
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
        neighbours = ", ".join(f"{h['label']} {h['score']:.2f}" for h in d.neighbours)
        table.add_row(Path(d.source).name, label, f"{d.probability:.3f}",
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
) -> None:
    """Describe blood-cell images: class with a calibrated probability and the runner-up, the 11 WBCAtt
    attributes with probabilities, a sentence stating only confident attributes, and the most similar
    reference cells. Research software: not a diagnosis.

    Unreadable files are reported (a warning on stderr; with --json also a record with "source" and "error") and the run goes on; at the end the exit status is 1 if any file failed, else 0.

    Example: hemaclip describe ../shared/data/PBC_dataset_normal_DIB/basophil --json --index none > out.jsonl
    """
    from hemaclip.tasks.describe import Describer, iter_image_paths

    if next(iter_image_paths(images), None) is None:
        raise HemaclipError(f"no image files found in {', '.join(str(p) for p in images)}")
    target = _saliency_target(saliency_target)
    from hemaclip.data.stain import get_normalizer

    normalizer = get_normalizer(stain_norm)
    describer = Describer.from_checkpoint(checkpoint, index=_index_argument(index), data_root=data,
                                          attribute_threshold=threshold, abstain_below=abstain_below,
                                          stain_normalizer=normalizer, progress=True)
    if not describer.calibrated:
        err_console.print(f"warning: probabilities are uncalibrated (T = 1): {describer.uncalibrated_reason}",
                          markup=False, highlight=False, soft_wrap=True)
    if saliency is not None:
        saliency.mkdir(parents=True, exist_ok=True)
    failed = seen = 0
    used: set[str] = set()
    buffer: list = []
    for d in describer.describe_paths(images, batch_size=batch_size, progress=True):
        seen += 1
        if d.error is not None:
            failed += 1
            err_console.print(f"warning: {d.error}", markup=False, highlight=False, soft_wrap=True)
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
    if failed:
        raise HemaclipError(f"{failed} of {seen} file(s) could not be described (see the warnings above)")


def fit_calibration(
    model: Any,
    checkpoint: str | Path,
    data_root: str | Path | None = None,
    *,
    zero_shot_dataset: str = DEFAULTS.zero_shot_dataset,
    batch_size: int = 128,
    progress: bool = False,
    write: bool = True,
) -> Calibration:
    """Fit the class temperature on the PBC val split (it contains WBCAtt val and also has the three
    classes WBCAtt lacks) and one temperature per attribute on the WBCAtt val split; never on test.

    Writes ``<checkpoint>.calibration.json`` atomically when `write`.
    """
    from hemaclip.data.datasets import load_dataset
    from hemaclip.metrics.calibration import fit_temperature
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.features import extract_features

    checkpoint = Path(checkpoint)
    sha1 = file_sha1(checkpoint)
    readout = Readout(model, zero_shot_dataset)
    pbc_val = load_dataset("pbc", data_root=data_root).split("val")
    index = {c: i for i, c in enumerate(readout.class_names)}
    pbc_val = [r for r in pbc_val if r.label in index]
    if not pbc_val:
        raise DataError("no PBC val image has a class the model knows; cannot fit the class temperature")
    fs = extract_features(model, pbc_val, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    logits = readout.class_logits(fs.features, fs.class_logits)
    y = np.array([index[r.label] for r in pbc_val])
    class_t = float(fit_temperature(logits, y))

    wbc_val = [r for r in load_dataset("wbcatt", data_root=data_root).split("val") if r.attributes]
    fa = extract_features(model, wbc_val, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    attr_logits = readout.attribute_logits(fa.features, fa.attribute_logits)
    temps = {}
    for name, values in readout.attribute_values.items():
        yv = np.array([values.index(r.attributes[name]) for r in wbc_val])
        temps[name] = float(fit_temperature(attr_logits[name], yv))
    calibration = Calibration(
        checkpoint_sha1=sha1,
        class_source="head" if readout.has_class_head else "zero-shot",
        class_names=list(readout.class_names),
        class_temperature=class_t,
        attribute_source="heads" if readout.has_attribute_heads else "zero-shot",
        attribute_temperatures=temps,
        fitted_on={"class": f"pbc val ({len(pbc_val)} images)", "attributes": f"wbcatt val ({len(wbc_val)} images)",
                   "method": "temperature scaling, minimum validation NLL"},
    )
    if write:
        write_json(calibration_path(checkpoint), calibration.to_dict())
    return calibration



def calibrate(
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
) -> None:
    """Fit the temperatures `describe` uses (class on PBC val, each attribute on WBCAtt val; never test) and
    write them beside the checkpoint as <name>.calibration.json.

    Example: hemaclip calibrate --checkpoint runs/mine/best.pt
    """
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint
    path = resolve_checkpoint(checkpoint)
    model, _ = load_for_inference(path)
    result = fit_calibration(model, path, data_root=data, progress=True)
    console.print(f"class temperature ({result.class_source}): {result.class_temperature:.3f}")
    for name, t in result.attribute_temperatures.items():
        console.print(f"  {ATTRIBUTE_ABBREVIATIONS.get(name, name)}: {t:.3f}")
    console.print(f"written to {calibration_path(path)}")


def register(app: typer.Typer) -> None:
    app.command("describe")(describe)
    app.command("calibrate")(calibrate)
