"""Make the committed PROTOCOL DEMONSTRATION report `reports/lvlm/`: the LVLM protocols run end to end against
hemaclip's scripted OpenAI-compatible server (no model: every answer is scripted), beside hemaclip describe.

    python scripts/lvlm_protocol_demo.py            # runs/lvlm-scripted-demo (run folder), reports/lvlm (report)

The script plays a model with the failure modes the audit describes, so the report shows that the scoring
detects them; its numbers describe this script, not any model:

* per cell (seeded by the image's SHA-1): right 45 %, wrong 35 % (mostly "neutrophil" or "lymphocyte": a model
  that defaults to a few classes), unreadable 8 %, and transport trouble: slow first attempt 4 %, one HTTP 500
  4 %, one 429 with Retry-After 2 %, HTTP 500 on every attempt 2 % (these cells stay unanswered);
* explain: a right answer's justification is a caption of the cell's own WBCAtt annotation; a wrong answer's is
  the caption of the *predicted* class's textbook values (it recites the textbook); certainty 3-5 drawn
  independently of being right;
* features: 100 points over the 19 features, most on the nucleus.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

from hemaclip.log import setup_console
from hemaclip_research.lvlm import textbook_from_train, write_lvlm_report
from hemaclip.tasks.lvlm.client import ClientSettings
from hemaclip.tasks.lvlm.protocols import FEATURES, PROTOCOLS
from hemaclip.tasks.lvlm.runner import SAMPLE_CSV, draw_sample, run_lvlm, write_cells
from hemaclip.tasks.lvlm.scripted import Behaviour, ScriptedServer
from hemaclip.text.captions import caption_variants

KINDS = (("correct", 45), ("wrong", 35), ("unparseable", 8), ("slow", 4), ("error500", 4), ("rate_limit", 2), ("always500", 2))
FAVOURITES = ("neutrophil", "lymphocyte")
FEATURE_WEIGHTS = {"nuclear_shape": 6, "nuclear_segmentation": 4, "chromatin_pattern": 4, "nc_ratio": 3, "granule_type": 3,
                   "granule_presence": 2, "cytoplasmic_colour": 2, "cell_size": 2}


def behaviour_for(cell, textbook, labels) -> Behaviour:
    rng = random.Random(hashlib.sha256(f"demo|{cell.image_sha1}".encode()).hexdigest())
    kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    if kind == "wrong":
        others = [label for label in labels if label != cell.label]
        favourites = [label for label in FAVOURITES if label != cell.label]
        answer = rng.choice(favourites) if rng.random() < 0.7 else rng.choice(others)
    else:
        answer = cell.label
    described = cell.attributes if answer == cell.label else textbook.get(answer)
    why = caption_variants(described, n=1, seed=rng.randrange(10**6))[0] if described else "Its morphology is typical of this cell type."
    weights = {key: FEATURE_WEIGHTS.get(key, 0.3) * rng.uniform(0.5, 1.5) for key in FEATURES}
    total = sum(weights.values())
    points = {key: round(100 * w / total) for key, w in weights.items()}
    points["nuclear_shape"] += 100 - sum(points.values())
    return Behaviour("correct" if kind == "wrong" else kind, answer=answer, justification=why,
                     certainty=rng.choice([3, 4, 4, 5, 5]), features=points)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/lvlm-scripted-demo"))
    parser.add_argument("--out", type=Path, default=Path("reports/lvlm"))
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args(argv)
    setup_console()
    textbook = textbook_from_train(args.data)
    sample_path = args.run / SAMPLE_CSV
    if sample_path.is_file():
        from hemaclip.tasks.lvlm.runner import read_cells

        cells = read_cells(sample_path, args.data)
    else:
        cells = draw_sample(args.data, args.per_class, seed=0)
        write_cells(sample_path, cells)
    labels = sorted({c.label for c in cells})
    behaviours = {c.image_sha1: behaviour_for(c, textbook, labels) for c in cells}
    settings = ClientSettings(concurrency=8, timeout_s=2.0, max_retries=3, backoff_s=0.2, max_backoff_s=2.0)
    with ScriptedServer(behaviours, slow_s=3.0, retry_after_s=1, model="scripted-demo") as server:
        run_lvlm(args.run, server.url, "scripted-demo", list(PROTOCOLS), settings=settings, per_class=args.per_class,
                 data_root=args.data)
    paths = write_lvlm_report([args.run], args.out, data_root=args.data)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
