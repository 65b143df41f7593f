"""Robustness benchmark: scores per corruption x severity, CE / mCE arithmetic, the report command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from hemaclip.data.datasets import load_dataset
from hemaclip.data.image_cache import decoded_images
from hemaclip.models.checkpoint import save_checkpoint
from hemaclip.tasks.probes import sample_per_class
from hemaclip.tasks.robustness import CLEAN, MIN_BASELINE_RELATIVE_CE, RobustnessConfig, corruption_errors, run_robustness
from hemaclip.text.prompts import load_prompts


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model) -> torch.nn.Module:
    return make_tiny_model()


def _subset(data_root: Path, split: str, per_class: int) -> list:
    records = sorted(load_dataset("wbcatt", data_root=data_root).split(split), key=lambda r: str(r.path))
    return [records[i] for i in sample_per_class([r.label for r in records], per_class, 0)]


def test_corruption_errors_arithmetic() -> None:
    scores = {CLEAN: {"head_class": 0.9}, ("a", 1): {"head_class": 0.8}, ("a", 2): {"head_class": 0.6},
              ("b", 1): {"head_class": 0.9}, ("b", 2): {"head_class": 0.7}}
    base = {CLEAN: {"class": 0.8}, ("a", 1): {"class": 0.5}, ("a", 2): {"class": 0.3},
            ("b", 1): {"class": 0.8}, ("b", 2): {"class": 0.79}}
    out = corruption_errors(scores, base, ["a", "b"], [1, 2], metrics=["head_class"])["head_class"]
    a, b = out["per_corruption"]["a"], out["per_corruption"]["b"]
    assert a["ce"] == pytest.approx(0.2 + 0.4) and a["baseline_ce"] == pytest.approx(0.5 + 0.7)
    assert a["ce_normalised"] == pytest.approx(0.6 / 1.2)
    assert a["relative_ce"] == pytest.approx(0.1 + 0.3) and a["relative_ce_normalised"] == pytest.approx(0.4 / 0.8)
    # The baseline loses only 0.01 on b: below MIN_BASELINE_RELATIVE_CE, so b has no relative ratio.
    assert 0.01 < MIN_BASELINE_RELATIVE_CE and b["relative_ce_normalised"] is None
    assert out["mce"] == pytest.approx(np.mean([0.6 / 1.2, 0.4 / 0.41]))
    assert out["relative_mce"] == pytest.approx(0.5) and out["relative_mce_corruptions"] == 1
    assert out["clean_f1"] == 0.9 and out["mean_corrupted_f1"] == pytest.approx(np.mean([0.7, 0.8]))
    assert "mce" not in corruption_errors(scores, None, ["a", "b"], [1, 2], metrics=["head_class"])["head_class"]


def test_run_robustness_on_real_cells(data_root: Path, tiny_model: torch.nn.Module, make_tiny_model) -> None:
    records = _subset(data_root, "test", 2)
    train = _subset(data_root, "train", 3)
    images = decoded_images([r.path for r in records], 32, progress=False)
    train_images = decoded_images([r.path for r in train], 32, progress=False)
    baseline = make_tiny_model(seed=1)
    config = RobustnessConfig(corruptions=("stain_shift", "jpeg"), severities=(1, 5), batch_size=16)
    prompts = load_prompts()
    classes = list(prompts.classes("wbcatt"))
    kwargs = dict(baseline_model=baseline, baseline_train=(train_images, train))
    result = run_robustness(tiny_model, records, images, prompts, "wbcatt", classes, config, **kwargs)
    assert set(result["scores"]) == {"clean/0", "stain_shift/1", "stain_shift/5", "jpeg/1", "jpeg/5"}
    for scores in result["scores"].values():
        assert set(scores) == {"zs_class", "head_class", "zs_attr", "head_attr"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert set(result["baseline_scores"]["clean/0"]) == {"class", "attr"}
    head = result["errors"]["head_class"]
    expected_ce = sum(1 - result["scores"][f"jpeg/{s}"]["head_class"] for s in (1, 5))
    assert head["per_corruption"]["jpeg"]["ce"] == pytest.approx(expected_ce)
    assert head["mce"] is not None and head["mce"] > 0
    again = run_robustness(tiny_model, records, images, prompts, "wbcatt", classes, config)
    assert again["scores"] == result["scores"] and again["baseline_scores"] is None


def test_robustness_command_writes_report(data_root: Path, tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    from hemaclip_research.robustness import run_robustness_report

    checkpoint = save_checkpoint(tmp_path / "tiny.pt", tiny_model)
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"what": "a study", "report_section": {
        "title": "A study", "text": "Measured elsewhere.", "columns": ["arm", "F1"], "rows": [["a", 0.5]]}}))
    out = tmp_path / "report"
    metrics = run_robustness_report(out, checkpoint, data_root=data_root, max_per_class=2, baseline=False,
                                    corruptions=("occlusion",), severities=(2, 4), stain_norm="reinhard", studies=[study])
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert (out / "heatmap_head_class.png").is_file() and (out / "corruption_examples.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["stain_normalization"] == "reinhard" and saved["baseline"] is None
    assert set(saved["scores"]) == {"clean/0", "occlusion/2", "occlusion/4"}
    assert saved["studies"]["study.json"]["what"] == "a study"
    assert "A study" in (out / "report.md").read_text()
    assert metrics["errors"]["head_class"]["clean_f1"] == saved["errors"]["head_class"]["clean_f1"]
    # --reuse re-renders from metrics.json when the settings match (marked scores prove nothing was recomputed) ...
    saved["scores"]["occlusion/4"]["head_class"] = 0.123456
    (out / "metrics.json").write_text(json.dumps(saved))
    common = dict(data_root=data_root, max_per_class=2, baseline=False, corruptions=("occlusion",), severities=(2, 4))
    reused = run_robustness_report(out, checkpoint, stain_norm="reinhard", reuse=True, **common)
    assert reused["scores"]["occlusion/4"]["head_class"] == 0.123456 and reused["studies"] == {}
    # ... and recomputes when they do not.
    other = run_robustness_report(out, checkpoint, stain_norm="none", reuse=True, **common)
    assert other["scores"]["occlusion/4"]["head_class"] != 0.123456 and other["stain_normalization"] == "none"


def test_robustness_cli_rejects_unknown_corruption(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hemaclip.cli import app
    from hemaclip.errors import HemaclipError

    result = CliRunner().invoke(app, ["robustness", "--corruptions", "fog", "--out", str(tmp_path / "r")])
    assert isinstance(result.exception, HemaclipError) and "fog" in str(result.exception)
    assert not (tmp_path / "r").exists()
