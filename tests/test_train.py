"""Training on tiny real subsets: run folder contents, exact resume after a stop, DDP = one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.train.config import TrainConfig, load_train_config
from hemaclip.train.texts import statement_masks
from hemaclip.train.trainer import train
from hemaclip.errors import HemaclipError


def tiny(**overrides) -> TrainConfig:
    return load_train_config("tiny", overrides)


def weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("text.transformer.")}


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_statement_masks_follow_what_a_sentence_states() -> None:
    image_class = torch.tensor([0, 1, 2])
    image_attrs = torch.tensor([[0, 1], [0, 0], [-1, -1]])
    text_class = torch.tensor([0, -1, -1])
    text_attrs = torch.tensor([[-1, -1], [0, -1], [0, 0]])
    positive, known = statement_masks(image_class, image_attrs, text_class, text_attrs)
    # text 0: "class 0"; text 1: "attribute0 = 0"; text 2: "attribute0 = 0 and attribute1 = 0"
    assert positive.tolist() == [[True, True, False], [False, True, True], [False, False, False]]
    # image 2 has no attributes: statements about attributes are unknown for it, not false
    assert known.tolist() == [[True, True, True], [True, True, True], [True, False, False]]


@pytest.fixture(scope="module")
def full_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    train(tiny(), out, data_root=data_root, progress=False)
    return out


@pytest.mark.slow
def test_run_folder_holds_checkpoints_history_and_curves(full_run: Path) -> None:
    for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png", "config.json"):
        assert (full_run / name).is_file(), name
    assert list((full_run / "splits").glob("pbc_seed0.csv"))
    rows = history(full_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("val_zs_class_macro_f1", "val_zs_attr_macro_f1", "val_head_attr_macro_f1", "val_head_class_macro_f1"):
            assert 0.0 <= row[key] <= 1.0
        assert row["train_loss"] > 0
        terms = [row[f"train_loss_{name}"] for name in ("contrastive", "attribute_heads", "class_head")]
        assert all(v > 0 for v in terms) and sum(terms) == pytest.approx(row["train_loss"], rel=1e-5)
    saved = json.loads((full_run / "config.json").read_text())
    assert saved["train"]["max_train_images"] == 96
    log = (full_run / "run.log").read_text()  # one run log: what ran, from which code, where, and each epoch
    for needle in ("hemaclip train run", "command: ", "git: ", "packages: hemaclip 0.1.0, torch ", "machine: ", "epoch 2/2: loss "):
        assert needle in log, needle
    assert not list(full_run.glob("*.tmp")), "no temporary files may be left behind"


@pytest.mark.slow
def test_resume_after_a_stop_mid_epoch_matches_an_uninterrupted_run(full_run: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    stopped = train(tiny(), out, data_root=data_root, progress=False, stop_after_steps=3)
    assert stopped["stopped_at"] == {"epoch": 0, "step": 3}
    with pytest.raises(HemaclipError, match="--resume"):
        train(tiny(), out, data_root=data_root, progress=False)
    train(tiny(), out, data_root=data_root, progress=False, resume=True)
    resumed, reference = weights(out / "last.pt"), weights(full_run / "last.pt")
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)
    for a, b in zip(history(out), history(full_run), strict=True):
        assert a["val_zs_attr_macro_f1"] == pytest.approx(b["val_zs_attr_macro_f1"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_process_ddp_loss_matches_one_process(data_root: Path, tmp_path: Path) -> None:
    # 24 images, batch 16: one optimiser step: its loss is computed before any update.
    options = ["--set", "epochs=1", "--set", "max_train_images=24", "--set", "attribute_head_weight=0.5"]
    env = {**os.environ, "HEMACLIP_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "hemaclip.cli", "train", "--config", "tiny", "--out", str(tmp_path / "one"), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
            "-m", "hemaclip.cli", "train", "--config", "tiny", "--out", str(tmp_path / "two"), *options,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = history(tmp_path / "one")[0], history(tmp_path / "two")[0]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    after_one, after_two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for key in after_one:
        # atol 5e-5: two ranks all-reduce gradients in another summation order; after the deduplicated WBCAtt changed
        # the tiny run's images, one weight in 147,456 ended 1.1e-5 apart (float32 rounding, not a different update).
        torch.testing.assert_close(after_two[key], after_one[key], rtol=1e-4, atol=5e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_select_metric_names_the_validation_number_that_picks_best() -> None:
    from hemaclip.train.trainer import _select_score

    metrics = {"val_zs_class_macro_f1": 0.9, "val_head_class_macro_f1": 0.4, "train_loss": 1.0}
    assert _select_score(metrics, "val_head_class_macro_f1") == 0.4
    assert _select_score(metrics) == 0.9  # default: mean of the headline F1s present
    with pytest.raises(HemaclipError, match="select_metric 'val_nope'"):
        _select_score(metrics, "val_nope")


def test_vit_position_embedding_and_class_token_get_no_weight_decay(make_tiny_model) -> None:
    """timm declares them in no_weight_decay(); the optimiser groups honour it (as open_clip's do)."""
    from hemaclip.train.trainer import no_weight_decay_names, param_groups

    model = make_tiny_model("vit-tiny-128")
    config = TrainConfig()
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: group["weight_decay"] for group in param_groups(model, config) for p in group["params"]}
    assert {"visual.trunk.pos_embed", "visual.trunk.cls_token"} <= no_weight_decay_names(model)
    assert decay["visual.trunk.pos_embed"] == 0.0
    assert decay["visual.trunk.cls_token"] == 0.0
    assert decay["visual.trunk.patch_embed.proj.weight"] == config.weight_decay == 0.05
    assert decay["visual.trunk.blocks.0.norm1.weight"] == 0.0 and decay["logit_scale"] == 0.0


def test_one_unknown_key_check_for_every_config() -> None:
    """Training, text-mix, model, GAN, GAN-model and DiffAugment configs share one reader and one key check."""
    from hemaclip.models import ModelConfig
    from hemaclip.train.gan import GanTrainConfig

    cases = [
        (lambda: TrainConfig.from_dict({"epochz": 1}, source="x.json"), "x.json: unknown training config key(s): epochz"),
        (lambda: TrainConfig.from_dict({"text_mix": {"captionz": 1}}, source="x.json"), "unknown training config text_mix key(s): captionz"),
        (lambda: ModelConfig.from_dict({"name": "m", "image_sise": 64}), "unknown model config key(s): image_sise"),
        (lambda: GanTrainConfig.from_dict({"model": {"z_dimm": 8}}), "unknown GAN config model key(s): z_dimm"),
        (lambda: GanTrainConfig.from_dict({"augment": {"colour": True}}), "unknown GAN config augment key(s): colour"),
    ]
    for build, message in cases:
        with pytest.raises(HemaclipError, match=r"\(known: ") as err:
            build()
        assert message in str(err.value)
