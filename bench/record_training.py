"""Record how a model was trained (command, wall time, machine, per-epoch validation) as bench JSON.

Usage: python -m bench.record_training runs/default --command "hemaclip train --config default --out runs/default" \
           --wall-seconds 2700 --note "..."
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from bench.machine import machine_info

from hemaclip.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--command", required=True)
    parser.add_argument("--wall-seconds", type=float, required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--what", default="training of the shipped default model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "default_training.json")
    args = parser.parse_args()
    history = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((args.run / "config.json").read_text())
    write_json(
        args.out,
        {
            "what": args.what,
            "date": date.today().isoformat(),
            "command": args.command,
            "wall_seconds": args.wall_seconds,
            "wall_minutes": round(args.wall_seconds / 60, 1),
            "note": args.note,
            "config": config,
            "epochs": history,
            "machine": machine_info(),
        },
    )
    print(args.out)


if __name__ == "__main__":
    main()
