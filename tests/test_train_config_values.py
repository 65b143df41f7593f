"""Every training-config value is checked for type and range when the config is made (file, `--set` or
code), so a bad `train --set` is one line, exit 1, and leaves no run folder behind."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hemaclip.data.transforms import AugmentConfig
from hemaclip.errors import HemaclipError
from hemaclip.train.config import LOSS_NAMES, TextMix, TrainConfig, load_train_config

# One value of the wrong type for every field (a new field without an entry fails the coverage test).
WRONG_TYPE = {
    "model": 3, "model_overrides": 3, "init_checkpoint": 5, "dataset": 1, "val_dataset": [], "prompts": 1,
    "epochs": "abc", "batch_size": 1.5, "lr": "notanumber", "backbone_lr": None, "weight_decay": "x",
    "warmup_steps": 1.5, "grad_clip": "x", "loss": 1, "soft_target_temperature": "x", "contrastive_weight": True,
    "attribute_head_weight": "x", "class_head_weight": None, "captions_per_image": 2.5, "text_mix": 3,
    "freeze_image_fraction": "x", "augment": 1, "stain_jitter": "x", "amp": 1, "seed": 0.5,
    "max_train_images": 1.5, "max_val_images": "x", "save_every_steps": 1.5, "select_metric": 1, "device": 0,
    "augmentation": 3, "extra_datasets": "lisc", "preprocess": 3, "holdout_classes": "basophil",
}
# One value of the right type but out of range for every field with a rule.
OUT_OF_RANGE = {
    "model": "no-such-model", "init_checkpoint": "no/such.pt", "dataset": "nosuch", "val_dataset": "nosuch",
    "prompts": "no/such.yaml", "epochs": -1, "batch_size": 0, "lr": 0, "backbone_lr": -1e-4, "weight_decay": -0.1,
    "warmup_steps": -1, "grad_clip": -1.0, "loss": "hinge", "soft_target_temperature": 0, "contrastive_weight": -1,
    "attribute_head_weight": -0.5, "class_head_weight": -1, "captions_per_image": 0, "freeze_image_fraction": 1.5,
    "stain_jitter": 2.0, "amp": "fp8", "seed": -1, "max_train_images": 0, "max_val_images": 0, "save_every_steps": -2,
    "device": "tpu", "extra_datasets": ["lisc", "nosuch"], "preprocess": {"locate": "nowhere"},
}
# The augmentation block (`--set augmentation.KEY=...`): a wrong type for every field, a range case for every rule.
AUGMENT_BAD = {
    "crop_scale_min": "x", "hflip": "yes", "vflip": 1, "rot90": None, "brightness": "x", "contrast": [], "saturation": True,
    "hue": "x", "stain_jitter": "x", "grey_p": "abc", "gamma": None, "blur_p": "x", "blur_sigma": "x", "lowres_p": [0.5],
    "jpeg_p": "x", "zoom_out": "x",
}
AUGMENT_RANGE = {
    "crop_scale_min": 0, "brightness": -0.1, "contrast": -1, "saturation": -1, "hue": 0.6, "stain_jitter": -0.1,
    "grey_p": 1.5, "gamma": -1, "blur_p": -0.1, "blur_sigma": -1, "lowres_p": 2, "jpeg_p": 1.01, "zoom_out": 0.5,
}


def test_every_field_has_a_type_case_and_every_rule_a_range_case() -> None:
    assert set(WRONG_TYPE) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(OUT_OF_RANGE) == set(TrainConfig.RULES)
    assert set(AUGMENT_BAD) == {f.name for f in dataclasses.fields(AugmentConfig)}
    assert set(AUGMENT_RANGE) == set(AugmentConfig.RULES)


@pytest.mark.parametrize("case", [f"type:{k}" for k in sorted(AUGMENT_BAD)] + [f"range:{k}" for k in sorted(AUGMENT_RANGE)])
def test_every_augmentation_key_is_checked(case: str) -> None:
    kind, key = case.split(":")
    value = (AUGMENT_BAD if kind == "type" else AUGMENT_RANGE)[key]
    with pytest.raises(HemaclipError) as caught:
        load_train_config("tiny", {f"augmentation.{key}": value})
    assert f"augmentation: {key} must be " in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("key", sorted(WRONG_TYPE))
def test_wrong_type_is_a_one_line_error_naming_the_key(key: str) -> None:
    with pytest.raises(HemaclipError) as caught:
        load_train_config("tiny", {key: WRONG_TYPE[key]})
    message = str(caught.value)
    assert f"training config: {key} must be " in message and "\n" not in message


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_out_of_range_is_a_one_line_error_naming_the_key(key: str) -> None:
    with pytest.raises(HemaclipError, match=f"training config: {key} must be "):
        load_train_config("tiny", {key: OUT_OF_RANGE[key]})


@pytest.mark.parametrize("value", [1.5, "abc", True, None])
def test_int_fields_take_integers_only(value) -> None:
    with pytest.raises(HemaclipError, match="epochs must be an integer"):
        TrainConfig(epochs=value)


def test_text_mix_is_checked_too() -> None:
    with pytest.raises(HemaclipError, match="text_mix: caption must be >= 0"):
        TrainConfig.from_dict({"text_mix": {"caption": -1}})
    with pytest.raises(HemaclipError, match="text_mix: caption must be a number"):
        TrainConfig.from_dict({"text_mix": {"caption": "half"}})
    with pytest.raises(HemaclipError, match="at least one of caption, attribute, klass"):
        TextMix(caption=0, attribute=0, klass=0)


def test_good_values_pass_and_ints_become_floats() -> None:
    config = load_train_config("tiny", {"lr": 1, "max_train_images": None, "device": "cpu", "init_checkpoint": "default"})
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.max_train_images is None
    for name in ("default", "tiny", "all-finetune", "all-imagenet", "all-scratch"):
        load_train_config(name)


def test_loss_names_are_the_losses_the_trainer_knows() -> None:
    from hemaclip.models.losses import LOSSES

    assert set(LOSS_NAMES) == set(LOSSES)


def _train_main(out: Path, setting: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """`hemaclip train --config tiny --out OUT --set SETTING` through the entry point's function, in process."""
    from hemaclip.cli import main

    monkeypatch.setattr(sys, "argv", ["hemaclip", "train", "--config", "tiny", "--out", str(out), "--set", setting])
    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code


@pytest.mark.parametrize("case", [f"type:{k}" for k in sorted(WRONG_TYPE)] + [f"range:{k}" for k in sorted(OUT_OF_RANGE)])
def test_every_bad_set_key_writes_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    kind, key = case.split(":")
    value = (WRONG_TYPE if kind == "type" else OUT_OF_RANGE)[key]
    out = tmp_path / "run"
    assert _train_main(out, f"{key}={json.dumps(value)}", monkeypatch) == 1
    assert f"training config: {key} must be " in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_set_writes_nothing_through_the_installed_command(tmp_path: Path) -> None:
    """The issue's cases through the real console script: one line, exit 1, no run folder (was a TypeError or
    ZeroDivisionError leaving config.json and splits/, or exit 0 with paths to files never written)."""
    entry_point = Path(sys.executable).parent / "hemaclip"
    for setting in ("epochs=abc", "epochs=1.5", "lr=notanumber", "batch_size=0", "epochs=-1"):
        out = tmp_path / "run"
        result = subprocess.run([str(entry_point), "train", "--config", "tiny", "--out", str(out), "--set", setting],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: training config: "), result.stderr
        assert setting.split("=")[0] in result.stderr
        assert list(tmp_path.iterdir()) == []


# `synth train --set` (GAN configs): every key of the run, its model (model.KEY) and its augmentation (augment.KEY).
GAN_BAD = {
    "epochs": "abc", "batch_size": 0, "lr_g": 0, "lr_d": "x", "betas": [0.5, 2], "ema_decay": 1.5,
    "mode_seeking_weight": -1, "sampling": "x", "real_flips": "yes", "save_every_steps": 1.5, "grid_per_class": 0,
    "seed": -1, "model": 3, "augment": 3, "model.image_size": 48, "model.num_classes": 0, "model.z_dim": "x",
    "model.g_channels": 0, "model.d_channels": 1.5, "model.class_embed_dim": -1, "model.minibatch_std": 1,
    "augment.color": "yes", "augment.translation": -0.1, "augment.cutout": "abc",
}


def test_every_gan_key_has_a_bad_case() -> None:
    from hemaclip.models.gan import DiffAugmentConfig, GanConfig
    from hemaclip.train.gan import GanTrainConfig

    keys = {f.name for f in dataclasses.fields(GanTrainConfig)}
    keys |= {f"model.{f.name}" for f in dataclasses.fields(GanConfig)} | {f"augment.{f.name}" for f in dataclasses.fields(DiffAugmentConfig)}
    assert set(GAN_BAD) == keys


@pytest.mark.parametrize("key", sorted(GAN_BAD))
def test_bad_gan_value_is_a_one_line_error_naming_the_key(key: str) -> None:
    from hemaclip.train.gan import load_gan_config

    with pytest.raises(HemaclipError) as caught:
        load_gan_config("tiny", {key: GAN_BAD[key]})
    assert f"{key.split('.')[-1]} must be " in str(caught.value) and "\n" not in str(caught.value)
