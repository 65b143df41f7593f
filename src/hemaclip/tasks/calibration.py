"""Calibration of the read-out: one temperature for the class and one per attribute, fitted on validation images.

Why: a raw softmax is over-confident, so `hemaclip describe` divides the logits of
:class:`hemaclip.tasks.readout.Readout` by temperatures fitted on validation images (`hemaclip calibrate`;
never on test). They are stored beside the checkpoint in ``<checkpoint>.calibration.json`` with the SHA-1 of
the weights they were fitted for, so a file left beside retrained weights is not used (the checkpoint is then
described as *uncalibrated*, T = 1, instead of pretending).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import CheckpointError, DataError
from hemaclip.tasks.readout import ZERO_SHOT_DATASET, Readout

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = ["CALIBRATION_FORMAT", "CALIBRATION_SUFFIX", "Calibration", "calibration_path", "fit_calibration", "load_calibration"]

CALIBRATION_FORMAT = 1
CALIBRATION_SUFFIX = ".calibration.json"


@dataclass
class Calibration:
    """Temperatures of the class read-out and of each attribute read-out, fitted on validation images."""

    checkpoint_sha1: str
    class_source: str  # "head" or "zero-shot"
    class_names: list[str]
    class_temperature: float
    attribute_source: str  # "heads" or "zero-shot"
    attribute_temperatures: dict[str, float]
    fitted_on: dict[str, Any] = field(default_factory=dict)
    format: int = CALIBRATION_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> Calibration:
        try:
            if int(data.get("format", -1)) != CALIBRATION_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {CALIBRATION_FORMAT}")
            return cls(
                checkpoint_sha1=str(data["checkpoint_sha1"]),
                class_source=str(data["class_source"]),
                class_names=[str(c) for c in data["class_names"]],
                class_temperature=float(data["class_temperature"]),
                attribute_source=str(data["attribute_source"]),
                attribute_temperatures={str(k): float(v) for k, v in data["attribute_temperatures"].items()},
                fitted_on=dict(data.get("fitted_on", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{source}: not a valid calibration file ({err})") from err


def calibration_path(checkpoint: str | Path) -> Path:
    """Where the calibration of `checkpoint` lives: ``<name>.calibration.json`` beside it."""
    from hemaclip.models.checkpoint import sidecar_path

    return sidecar_path(checkpoint, CALIBRATION_SUFFIX)


def load_calibration(checkpoint: str | Path, checkpoint_sha1: str) -> tuple[Calibration | None, str]:
    """(calibration, "") if a sidecar exists and was fitted for these exact weights, else (None, reason)."""
    path = calibration_path(checkpoint)
    if not path.is_file():
        return None, f"no calibration file {path.name} beside the checkpoint (run `hemaclip calibrate`)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: calibration file cannot be read ({err})") from err
    calibration = Calibration.from_dict(data, str(path))
    if calibration.checkpoint_sha1 != checkpoint_sha1:
        return None, f"{path.name} was fitted for other weights (SHA-1 {calibration.checkpoint_sha1[:10]})"
    return calibration, ""


def fit_calibration(
    model: DualEncoder,
    checkpoint: str | Path,
    data_root: str | Path | None = None,
    *,
    zero_shot_dataset: str = ZERO_SHOT_DATASET,
    batch_size: int = 128,
    progress: bool = False,
    write: bool = True,
) -> Calibration:
    """Fit the class temperature on the PBC val split (it contains WBCAtt val and also has the three
    classes WBCAtt lacks) and one temperature per attribute on the WBCAtt val split; never on test.

    Writes ``<checkpoint>.calibration.json`` atomically when `write`.
    """
    from hemaclip.cache import file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.io import write_json
    from hemaclip.metrics.calibration import fit_temperature
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
