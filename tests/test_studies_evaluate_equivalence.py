"""The evaluation split into parts writes the numbers the old one did: old and new pipelines, one tiny model.

The old pipeline is the code of the commit before the house was put in order (issue 12), taken from
git into a temporary folder and run in its own process with its own caches; the new one runs here
with fresh caches too, so decoding, preprocessing, features, every part, the bootstrap and the report
are compared end to end. The WBCAtt test subset holds every class and every attribute value, where
the old macro F1 conventions and the new one are the same number (see hemaclip.metrics.classification).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import hemaclip

OLD_COMMIT = "7a5c6672dd58c1b25191ba4f74df0d7674661c48"  # the tree before issue 12 (the house)
PER_CLASS = 8
RUN = dict(dataset="wbcatt", split="test", n_boot=200, seed=0, max_per_class=PER_CLASS, nshot_shots=(1, 3), nshot_seeds=(0, 1),
           embed_method="pca")
# Not numbers of the evaluation: wall time.
VOLATILE = {"seconds"}


def _old_tree(tmp: Path) -> Path | None:
    repo = Path(hemaclip.__file__).resolve().parents[2]
    try:
        archive = subprocess.run(["git", "archive", "--format=tar", OLD_COMMIT, "src"], cwd=repo, capture_output=True, check=True,
                                 timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "src"


def _tiny_old_format_checkpoint(source: Path, path: Path) -> Path:
    """The tiny checkpoint saved without the fields the old code does not know (as any old checkpoint)."""
    payload = torch.load(source, weights_only=True)
    payload["model_config"].pop("preprocess")
    torch.save(payload, path)
    return path


def _differences(old, new, path="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = [f"{path}/{k}: missing in new" for k in old if k not in new and k not in VOLATILE]
        out += [f"{path}/{k}: only in new" for k in new if k not in old and k not in VOLATILE]
        for key in old:
            if key in new and key not in VOLATILE:
                out += _differences(old[key], new[key], f"{path}/{key}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} != {new!r}"]


@pytest.mark.slow
@pytest.mark.skip(reason="superseded: issue 16 deduplicated WBCAtt (the evaluated images differ from the old pipeline's) and "
                  "added baselines, wordings and anchors to every report; issue 12's check is now that committed reports "
                  "re-run with identical numbers (bench/eval_time.py)")
def test_new_evaluation_equals_the_old_pipeline(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit_checkpoint: Path) -> None:
    from hemaclip.data.attributes import ATTRIBUTES
    from hemaclip.data.datasets import load_dataset
    from hemaclip.studies.evaluate import cap_per_class, run_evaluation

    old_src = _old_tree(tmp_path / "old")
    if old_src is None:
        pytest.skip(f"commit {OLD_COMMIT} is not in this checkout's git history (a shallow clone?)")
    records = cap_per_class(load_dataset("wbcatt", data_root=data_root).split("test"), PER_CLASS, 0)
    for name, values in ATTRIBUTES.items():
        assert set(values) <= {r.attributes[name] for r in records}, f"the subset lacks a value of {name}"
    checkpoint = _tiny_old_format_checkpoint(tiny_vit_checkpoint, tmp_path / "tiny.pt")
    work = tmp_path / "work"
    work.mkdir()
    old_out, new_out = work / "old", work / "new"
    script = (
        "import json, sys; from pathlib import Path; from hemaclip.eval.evaluate import run_evaluation; "
        "kw = json.loads(sys.argv[1]); run_evaluation(Path(sys.argv[2]), out=Path(sys.argv[3]), data_root=Path(sys.argv[4]), **kw)"
    )
    env = {**os.environ, "PYTHONPATH": str(old_src), "HEMACLIP_CACHE": str(tmp_path / "cache-old"), "OMP_NUM_THREADS": "1"}
    old = subprocess.run([sys.executable, "-c", script, json.dumps(RUN), str(checkpoint), str(old_out), str(data_root)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert old.returncode == 0, old.stderr[-3000:]
    monkeypatch.setenv("HEMACLIP_CACHE", str(tmp_path / "cache-new"))
    monkeypatch.chdir(work)
    run_evaluation(checkpoint, out=new_out, data_root=data_root, **RUN)

    old_metrics = json.loads((old_out / "metrics.json").read_text())
    new_metrics = json.loads((new_out / "metrics.json").read_text())
    assert old_metrics["n_images"] == new_metrics["n_images"] == 5 * PER_CLASS
    differences = _differences(old_metrics, new_metrics)
    assert not differences, "metrics.json differs:\n" + "\n".join(differences[:40])
    assert sorted(p.name for p in old_out.glob("*.png")) == sorted(p.name for p in new_out.glob("*.png"))

    def numbers(folder: Path) -> list[list[str]]:  # the numbers of report.md, line by line (not the date)
        lines = (folder / "report.md").read_text().splitlines()
        return [re.findall(r"-?\d+(?:\.\d+)?", line) for line in lines if "**date:**" not in line]

    assert numbers(old_out) == numbers(new_out)
