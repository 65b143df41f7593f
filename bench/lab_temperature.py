"""A temperature fitted on other labs' labelled cells: does calibration carry to a lab it never saw? (It did not.)

Multi-domain calibration (fit the temperature on several labs, use it on a new one) is the label-using
counterpart of the in-lab and synthetic-shift temperatures measured before (bench/shift_temperature.py).
Protocol, leave-one-lab-out over LISC, Zheng 1 and Zheng 2: an extra temperature tau on the shipped model's
calibrated probabilities (p ** (1 / tau), renormalised; the class read never changes) is fitted by minimum NLL on
the **val** parts of the two other labs, then the held-out lab's **test** part is scored (top-label ECE, 15 bins)
beside tau = 1 (today's reading, the baseline in the same run). For reference only, never to choose anything: the
tau each lab's own val and test parts would want (oracle), which says how far apart the labs are.

Writes bench/results/lab_temperature.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.cache import file_sha1  # noqa: E402
from hemaclip.data.datasets import load_dataset  # noqa: E402
from hemaclip.io import write_json  # noqa: E402
from hemaclip.metrics.calibration import ece_floor, expected_calibration_error, fit_temperature, softmax  # noqa: E402
from hemaclip.models.default import resolve_checkpoint  # noqa: E402
from hemaclip_research.other_labs import OTHER_LABS, read_lab  # noqa: E402
from hemaclip.tasks.describe import Describer  # noqa: E402

def log_probs(probs: np.ndarray) -> np.ndarray:
    """Calibrated probabilities as logits: a temperature tau on them gives p ** (1 / tau), renormalised."""
    return np.log(np.clip(probs, 1e-12, 1.0))


def fit_tau(parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The tau of minimum NLL over all cells of `parts` ((probabilities, label index) per lab), pooled
    (:func:`hemaclip.metrics.calibration.fit_temperature`, the fit `hemaclip calibrate` uses)."""
    return fit_temperature(np.vstack([log_probs(p) for p, _ in parts]), np.concatenate([y for _, y in parts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped model")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_temperature.json")
    args = parser.parse_args()
    start = time.perf_counter()
    path = resolve_checkpoint(args.checkpoint)
    describer = Describer.from_checkpoint(path, index=None, data_root=args.data)
    classes = list(describer.readout.class_names)
    readings: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for lab in OTHER_LABS:
        dataset = load_dataset(lab, data_root=args.data)
        for split in ("val", "test"):
            reading = read_lab(describer, dataset.split(split), "none")
            readings[(lab, split)] = (reading.probs, np.array([classes.index(y) for y in reading.truth]))
    rows = {}
    for lab in OTHER_LABS:
        others = [other for other in OTHER_LABS if other != lab]
        tau = fit_tau([readings[(other, "val")] for other in others])
        probs, y = readings[(lab, "test")]
        rows[lab] = {
            "fitted_on": [f"{other} val" for other in others], "tau": tau, "n_test": int(len(y)),
            "ece_test_tau_1": float(expected_calibration_error(probs, y)),
            "ece_test_fitted_tau": float(expected_calibration_error(softmax(log_probs(probs), tau), y)),
            "ece_floor_test_fitted_tau": ece_floor(softmax(log_probs(probs), tau)),
            "oracle_tau_val": fit_tau([readings[(lab, "val")]]), "oracle_tau_test": fit_tau([readings[(lab, "test")]]),
        }
        print(f"{lab}: tau {tau:.2f} from {' + '.join(others)} val; test ECE {rows[lab]['ece_test_tau_1']:.3f} -> "
              f"{rows[lab]['ece_test_fitted_tau']:.3f}; oracle tau val {rows[lab]['oracle_tau_val']:.2f}, test {rows[lab]['oracle_tau_test']:.2f}")
    write_json(args.out, {
        "what": "leave-one-lab-out temperature on other labs' val cells, scored on the held-out lab's test cells (top-label ECE, 15 bins)",
        "checkpoint": path.name, "checkpoint_sha1": file_sha1(path), "labs": rows,
        "target": "ECE <= 0.10 on every other lab (issue 14)",
        "seconds": round(time.perf_counter() - start, 1), "machine": machine_info(),
        "command": "python -m bench.lab_temperature",
    })


if __name__ == "__main__":
    main()
