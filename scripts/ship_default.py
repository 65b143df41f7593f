"""Turn a run's best checkpoint into the shipped default model (fp16 weights, no optimiser state).

Usage: python scripts/ship_default.py runs/default/best.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hemaclip.models.checkpoint import load_checkpoint, save_checkpoint
from hemaclip.models.default import DEFAULT_CHECKPOINT_NAME

ASSETS = Path(__file__).resolve().parents[1] / "src" / "hemaclip" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=ASSETS / DEFAULT_CHECKPOINT_NAME)
    args = parser.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    extra = meta.get("extra", {})
    kept = {"train_config": extra.get("train_config"), "validation_metrics": extra.get("metrics"), "source": str(args.checkpoint)}
    save_checkpoint(args.out, model, extra=kept, half=True)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
