"""Unseen wording, one synonym set at a time: zero-shot class and attribute macro F1 of a checkpoint (default: the
shipped model) on WBCAtt **test**, with the trivial baselines beside them.

Why per set: a mean over all held-out synonyms hides which kind of name carries it (issue 27: spelling variants
such as "basophile" gave 0.995 alone, names in other words 0.285). The held-out wording is the prompt file's
`heldout` section, checked at the tokenizer level (tests/test_text_heldout.py): no held-out word shares a
word-piece stem with training text. Synonym set i is the i-th synonym of every WBCAtt class, each in every
held-out class frame; attribute phrase set i is the i-th phrase of every attribute value, each in every held-out
attribute frame. "all" is the whole held-out wording as `hemaclip evaluate` reads it (every synonym or phrase
of a class or value averaged into one text embedding); "mean_of_sets" is the unweighted mean of the sets.

Baselines ignore the image (hemaclip.metrics.baselines.trivial_baselines, prior from WBCAtt train): majority
class and class-prior random, macro F1 by the same convention. Fixed protocol, nothing chosen: test is read once.

Writes bench/results/unseen_wording_by_set.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.cache import file_sha1
from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import load_dataset
from hemaclip.errors import HemaclipError
from hemaclip.io import display_path, write_json
from hemaclip.metrics.baselines import trivial_baselines
from hemaclip.metrics.classification import macro_f1
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.models.default import resolve_checkpoint
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.tasks.features import extract_features
from hemaclip.tasks.zero_shot import ZeroShotSetting, zero_shot_attributes, zero_shot_classes
from hemaclip.text.prompts import DATASET_CLASSES, PromptSet, load_prompts

DATASET = "wbcatt"
SPLIT = "test"
REFERENCE_SPLIT = "train"  # where the baselines' class prior comes from
DIGITS = 4


def set_count(lists: list[tuple[str, ...]], what: str) -> int:
    """How many sets the i-th-entry rule gives: every list must have that many entries."""
    sizes = {len(x) for x in lists}
    if len(sizes) != 1:
        raise HemaclipError(f"held-out {what} lists differ in length ({sorted(sizes)}): synonym sets are undefined")
    return sizes.pop()


def class_set(prompts: PromptSet, i: int) -> PromptSet:
    held = prompts.heldout
    synonyms = {c: (s[i],) if c in DATASET_CLASSES[DATASET] else s for c, s in held.synonyms.items()}
    return dataclasses.replace(prompts, heldout=dataclasses.replace(held, synonyms=synonyms))


def attribute_set(prompts: PromptSet, i: int) -> PromptSet:
    held = prompts.heldout
    phrases = {a: {v: (p[i],) for v, p in values.items()} for a, values in held.attributes.items()}
    return dataclasses.replace(prompts, heldout=dataclasses.replace(held, attributes=phrases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "unseen_wording_by_set.json")
    args = parser.parse_args()
    start = time.perf_counter()
    path = resolve_checkpoint(args.checkpoint)
    model, _meta = load_checkpoint(path)
    model.eval()
    cache = PooledTextCache(model.text)
    prompts = load_prompts()
    dataset = load_dataset(DATASET)
    fs = extract_features(model, dataset.split(SPLIT), file_sha1(path))
    reference = dataset.split(REFERENCE_SPLIT)
    classes = list(DATASET_CLASSES[DATASET])
    held = prompts.heldout

    def class_f1(p: PromptSet) -> float:
        out = zero_shot_classes(ZeroShotSetting(model, p, DATASET, text_cache=cache), fs, wording="heldout")
        predicted = [out["class_names"][k] for k in out["logits"].argmax(1)]
        return round(macro_f1(out["y_true"], predicted, out["class_names"]), DIGITS)

    def attribute_f1(p: PromptSet) -> dict[str, object]:
        per = {}
        for name, out in zero_shot_attributes(model, fs, p, text_cache=cache, wording="heldout").items():
            predicted = [out["values"][k] for k in out["logits"].argmax(1)]
            per[name] = round(macro_f1(out["y_true"], predicted, out["values"]), DIGITS)
        return {"mean": round(float(np.mean(list(per.values()))), DIGITS), "per_attribute": per}

    n_class_sets = set_count([held.synonyms[c] for c in classes], "class synonym")
    class_sets = [{"set": i + 1, "synonyms": {c: held.synonyms[c][i] for c in classes},
                   "macro_f1": class_f1(class_set(prompts, i))} for i in range(n_class_sets)]
    n_attr_sets = set_count([p for values in held.attributes.values() for p in values.values()], "attribute phrase")
    attr_sets = [{"set": i + 1, "example": {"cell_size": {v: held.attributes["cell_size"][v][i] for v in ATTRIBUTES["cell_size"]}},
                  **attribute_f1(attribute_set(prompts, i))} for i in range(n_attr_sets)]

    y_class = list(fs.labels)
    class_base = trivial_baselines(y_class, classes, [r.label for r in reference], f"{DATASET} {REFERENCE_SPLIT}")
    attr_base: dict[str, dict[str, float]] = {"majority": {}, "prior_random": {}}
    for name, values in ATTRIBUTES.items():
        truth = [a[name] for a in fs.attributes if a is not None]
        ref = [r.attributes[name] for r in reference if r.attributes is not None]
        base = trivial_baselines(truth, values, ref, f"{DATASET} {REFERENCE_SPLIT}")
        for kind in attr_base:
            attr_base[kind][name] = round(base[kind]["macro_f1"], DIGITS)
    attr_all = attribute_f1(prompts)
    result = {
        "what": "zero-shot macro F1 with the unseen (held-out) wording, one synonym / phrase set at a time, beside trivial baselines",
        "checkpoint": display_path(path), "checkpoint_sha1": file_sha1(path),
        "dataset": DATASET, "split": SPLIT, "n_cells": len(fs), "date": str(date.today()),
        "protocol": "fixed in advance, nothing chosen; test read once",
        "classes": {
            "sets": class_sets,
            "mean_of_sets": round(float(np.mean([s["macro_f1"] for s in class_sets])), DIGITS),
            "all": class_f1(prompts),
            "baselines": {k: round(class_base[k]["macro_f1"], DIGITS) for k in ("majority", "prior_random")},
        },
        "attributes": {
            "sets": attr_sets,
            "mean_of_sets": round(float(np.mean([s["mean"] for s in attr_sets])), DIGITS),
            "all": attr_all,
            "baselines": {k: {"mean": round(float(np.mean(list(v.values()))), DIGITS), "per_attribute": v}
                          for k, v in attr_base.items()},
        },
        "baseline_reference": f"class prior from {DATASET} {REFERENCE_SPLIT} ({len(reference)} cells)",
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine_info(),
    }
    write_json(args.out, result)
    print("class sets", [s["macro_f1"] for s in class_sets], "mean", result["classes"]["mean_of_sets"],
          "all", result["classes"]["all"], "baselines", result["classes"]["baselines"])
    print("attribute sets", [s["mean"] for s in attr_sets], "mean", result["attributes"]["mean_of_sets"],
          "all", attr_all["mean"], "baselines", {k: v["mean"] for k, v in result["attributes"]["baselines"].items()})
    print("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
