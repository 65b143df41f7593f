"""Feature-statistics noise (DSU, Li et al., ICLR 2022) as a lever of issue 13: does perturbing the early image
layers' per-channel means and standard deviations during training carry the model to other labs? (No.)

DSU treats each feature map's channel mean and standard deviation as uncertain: during training, with probability
`--p`, it re-draws them from a Gaussian around their values whose spread is their variance across the batch, then
re-styles the map with them (identity at inference, so the checkpoint and its use are unchanged). Tsutsui et al.
2023 point at normalisation statistics as a main cause of the collapse across labs; DSU is a standard
single-source domain-generalisation answer to it. Here it is hooked on the stem and blocks 0-4 of the
EfficientNet-Lite0 trunk for a 2-epoch fine-tune from the shipped model (`bench/configs/finetune_pbc.json`), beside
the same fine-tune without it (the control, trained in the same run) and the shipped model, scored on the other
labs' **val** parts only (5 white-cell classes, any other class wrong; the `hemaclip other-labs` reading).
The hooks live in this script, not in the package: the lever was rejected.

Writes bench/results/feature_stat_noise.json (runs under runs/ft-pbc-dsu and runs/ft-pbc).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from bench.machine import machine_info

import hemaclip.train.trainer as trainer
from hemaclip.data.datasets import load_dataset
from hemaclip.io import write_json
from hemaclip_research.other_labs import OTHER_LABS, read_lab, score_reading
from hemaclip.tasks.describe import Describer
from hemaclip.train.config import load_train_config

BENCH = Path(__file__).resolve().parent
CONFIG = BENCH / "configs" / "finetune_pbc.json"
LAYERS = ("stem", "0", "1", "2", "3", "4")
EPS = 1e-6


def dsu_hook(p: float, factor: float) -> Any:
    """A forward hook re-drawing each channel's mean and std (train mode only, with probability `p`)."""

    def hook(module: torch.nn.Module, _inputs: Any, x: torch.Tensor) -> torch.Tensor:
        if not module.training or x.dim() != 4 or float(torch.rand(())) > p:
            return x
        mu = x.mean((2, 3), keepdim=True)
        sig = (x.var((2, 3), keepdim=True) + EPS).sqrt()
        spread_mu = (mu.var(0, keepdim=True) + EPS).sqrt()
        spread_sig = (sig.var(0, keepdim=True) + EPS).sqrt()
        beta = mu + torch.randn_like(mu) * spread_mu * factor
        gamma = sig + torch.randn_like(sig) * spread_sig * factor
        return (x - mu) / sig * gamma + beta

    return hook


def fine_tune(out: Path, p: float, factor: float) -> float:
    """Train the 2-epoch fine-tune into `out` (DSU hooks when p > 0); returns wall seconds."""
    original = trainer.initial_model

    def with_hooks(config: Any, class_names: Any) -> torch.nn.Module:
        model = original(config, class_names)
        trunk = model.visual.trunk
        for name in LAYERS:
            (trunk.bn1 if name == "stem" else trunk.blocks[int(name)]).register_forward_hook(dsu_hook(p, factor))
        return model

    start = time.perf_counter()
    trainer.initial_model = with_hooks if p > 0 else original
    try:
        trainer.train(load_train_config(str(CONFIG)), out)
    finally:
        trainer.initial_model = original
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "feature_stat_noise.json")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--factor", type=float, default=1.0)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    start = time.perf_counter()
    arms = {"dsu": args.runs / "ft-pbc-dsu", "control": args.runs / "ft-pbc"}
    seconds = {}
    for arm, folder in arms.items():
        if not (folder / "best.pt").exists():
            seconds[arm] = round(fine_tune(folder, args.p if arm == "dsu" else 0.0, args.factor), 1)
    scores: dict = {}
    for arm, checkpoint in {"shipped": None, **{k: str(v / "best.pt") for k, v in arms.items()}}.items():
        describer = Describer.from_checkpoint(checkpoint, index=None)
        for lab in OTHER_LABS:
            score = score_reading(read_lab(describer, load_dataset(lab).split("val"), "none"), args.n_boot)
            scores.setdefault(lab, {})[arm] = {"n": score["n"], "macro_f1": score["macro_f1"], "accuracy": score["accuracy"], "ece": score["ece"]}
        print(arm, {lab: round(scores[lab][arm]["macro_f1"]["point"], 3) for lab in OTHER_LABS}, flush=True)
    for lab in OTHER_LABS:
        base = scores[lab]["control"]["macro_f1"]["point"]
        scores[lab]["dsu"]["macro_f1_ratio_vs_control"] = round(scores[lab]["dsu"]["macro_f1"]["point"] / base, 4) if base else None
    write_json(args.out, {
        "what": "DSU feature-statistics noise during a 2-epoch fine-tune from the shipped model, other labs' val parts",
        "date": str(date.today()), "config": str(CONFIG.relative_to(BENCH.parent)), "layers": list(LAYERS), "p": args.p,
        "factor": args.factor, "baseline": "control (the same fine-tune without DSU)", "val": scores,
        "training_seconds": seconds, "n_boot": args.n_boot, "seconds": round(time.perf_counter() - start, 1), "machine": machine_info(),
    })
    print("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
