"""GAN synthesis: net shapes, exact conditional sampling, training/resume, and the generative metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from hemaclip.errors import CheckpointError, HemaclipError
from hemaclip.metrics.generative import fid, kid, nearest_real, precision_recall
from hemaclip_research.synthesis import utility_arms
from hemaclip.models.gan import (
    DiffAugmentConfig,
    Discriminator,
    GanConfig,
    GanState,
    Generator,
    d_hinge_loss,
    diff_augment,
    g_hinge_loss,
    load_generator,
    read_gan,
    save_gan,
)
from hemaclip.tasks.synthesis import sample_counts, sample_images, write_sample_folder
from hemaclip.train.gan import load_gan_config, parse_reduce, reduce_records, train_gan

CLASSES = ["benign", "early", "pre", "pro"]


def tiny_config(size: int = 32) -> GanConfig:
    return GanConfig(image_size=size, num_classes=len(CLASSES), z_dim=16, g_channels=4, d_channels=4, class_embed_dim=8)


def tiny_checkpoint(path: Path, dataset: str = "all") -> Path:
    config = tiny_config()
    torch.manual_seed(0)
    return save_gan(path, GanState(config=config, dataset=dataset, classes=CLASSES, generator=Generator(config).state_dict()))


@pytest.mark.parametrize("size", [32, 64])
def test_generator_and_discriminator_shapes(size: int) -> None:
    config = tiny_config(size)
    g, d = Generator(config), Discriminator(config)
    z, y = torch.randn(5, config.z_dim), torch.tensor([0, 1, 2, 3, 0])
    images = g(z, y)
    assert images.shape == (5, 3, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images, y).shape == (5,)
    augmented = diff_augment(images, DiffAugmentConfig())
    assert augmented.shape == images.shape


def test_conditional_sampling_returns_the_asked_counts(tmp_path: Path) -> None:
    generator, _ = load_generator(tiny_checkpoint(tmp_path / "g.pt"))
    counts = sample_counts(CLASSES, 3, ["pro", "benign"])
    assert counts == {"pro": 3, "benign": 3}
    images, labels = sample_images(generator, CLASSES, {"benign": 2, "early": 0, "pro": 5}, seed=0)
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    assert labels.count("benign") == 2 and labels.count("pro") == 5 and "early" not in labels
    index = write_sample_folder(tmp_path / "out", images, labels, progress=False)
    rows = list(csv.DictReader(index.open()))
    assert len(rows) == 7 and all((tmp_path / "out" / r["path"]).is_file() for r in rows)
    assert len(list((tmp_path / "out" / "pro").glob("*.png"))) == 5
    with pytest.raises(HemaclipError, match="not in this GAN"):
        sample_counts(CLASSES, 3, ["basophil"])


def test_same_seed_gives_same_samples(tmp_path: Path) -> None:
    generator, _ = load_generator(tiny_checkpoint(tmp_path / "g.pt"))
    a, _ = sample_images(generator, CLASSES, {"early": 4}, seed=3)
    b, _ = sample_images(generator, CLASSES, {"early": 4}, seed=3)
    c, _ = sample_images(generator, CLASSES, {"early": 4}, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_one_training_step_changes_weights_with_finite_losses() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    g, d = Generator(config), Discriminator(config)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    before_g = [p.detach().clone() for p in g.parameters()]
    before_d = [p.detach().clone() for p in d.parameters()]
    real, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 4, (8,))
    fake = g(torch.randn(8, config.z_dim), y)
    aug = DiffAugmentConfig()
    loss_d = d_hinge_loss(d(diff_augment(real, aug), y), d(diff_augment(fake.detach(), aug), y))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    loss_g = g_hinge_loss(d(diff_augment(fake, aug), y))
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    assert torch.isfinite(loss_d) and torch.isfinite(loss_g)
    assert any(not torch.equal(a, b) for a, b in zip(before_g, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, d.parameters()))


def test_fid_kid_and_precision_recall() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(loc=1.0, size=(400, 8))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, b) > 5.0  # mean shift of 1 in 8 dims gives about 8
    assert abs(kid(a, a, n_subsets=10, subset_size=100)["mean"]) < 0.05
    assert kid(a, b, n_subsets=10, subset_size=100)["mean"] > 0.5
    same = precision_recall(a, a)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(a, a + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    dist, idx = nearest_real(a[:5] + 1e-9, a)
    assert np.array_equal(idx, np.arange(5)) and np.all(dist < 1e-6)


def test_utility_arms_fill_the_rare_class() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 3
    y_real = np.array([0] * 40 + [1] * 40 + [2] * 4)
    X_real = centres[y_real] + rng.normal(size=(len(y_real), 6))
    y_syn = np.repeat(np.arange(3), 50)
    X_syn = centres[y_syn] + rng.normal(size=(len(y_syn), 6))
    y_test = np.repeat(np.arange(3), 30)
    X_test = centres[y_test] + rng.normal(size=(len(y_test), 6))
    preds = utility_arms(X_real, y_real, X_syn, y_syn, X_test, 3, seed=0)
    assert set(preds) == {"real", "real+gan", "gan-only", "oversample", "class-weighted"}
    assert all(len(p) == len(y_test) for p in preds.values())
    assert np.mean(preds["gan-only"] == y_test) > 0.8  # synthetic data from the right classes is learnable


def test_reduce_keeps_the_asked_share(data_root: Path) -> None:
    from hemaclip.data.datasets import load_dataset

    train = load_dataset("all", data_root).split("train")
    kept = reduce_records(train, parse_reduce(["benign=0.1"]), seed=0)
    n_benign = sum(r.label == "benign" for r in train)
    assert sum(r.label == "benign" for r in kept) == round(0.1 * n_benign)
    assert sum(r.label != "benign" for r in kept) == sum(r.label != "benign" for r in train)
    assert kept == reduce_records(train, {"benign": 0.1}, seed=0)
    with pytest.raises(HemaclipError):
        parse_reduce(["benign=2"])


def test_resume_after_a_stop_restores_the_step_and_matches(tmp_path: Path, data_root: Path) -> None:
    config = load_gan_config("tiny")
    full = train_gan("all", tmp_path / "full", config, data_root=data_root, max_images=48, progress=False)
    assert full.finished and full.step == full.total_steps == 12
    for row in full.history:  # the named loss terms of every epoch; G's total is the sum of its parts
        assert row["loss_g"] == pytest.approx(row["loss_g_hinge"] + row["loss_g_mode_seeking"], rel=1e-5, abs=1e-6)
        assert row["loss_g_mode_seeking"] > 0 and "loss_d" in row
    stopped = train_gan("all", tmp_path / "cut", load_gan_config("tiny"), data_root=data_root, max_images=48, stop_after_steps=5, progress=False)
    assert not stopped.finished and read_gan(tmp_path / "cut" / "last.pt").extra["step"] == 5
    with pytest.raises(HemaclipError, match="--resume"):
        train_gan("all", tmp_path / "cut", load_gan_config("tiny"), data_root=data_root, max_images=48, progress=False)
    resumed = train_gan("all", tmp_path / "cut", load_gan_config("tiny"), data_root=data_root, max_images=48, resume=True, progress=False)
    assert resumed.finished and resumed.step == 12
    a, b = read_gan(tmp_path / "full" / "last.pt"), read_gan(tmp_path / "cut" / "last.pt")
    for key, tensor in a.generator.items():
        assert torch.allclose(tensor.float(), b.generator[key].float(), atol=1e-6), key
    assert (tmp_path / "cut" / "samples" / "epoch_002.png").is_file()


def test_sample_cli_refuses_another_datasets_or_a_non_gan_checkpoint(tmp_path: Path, run_cli) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "gan.pt", dataset="all")
    result = run_cli("synth", "sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s"), "--dataset", "pbc", "--per-class", "1")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "gan.pt" in result.stderr and "'all'" in result.stderr
    assert not (tmp_path / "s").exists()
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    result = run_cli("synth", "sample", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "s"))
    assert result.returncode == 1 and "not a hemaclip GAN checkpoint" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    ok = run_cli("synth", "sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s"), "--dataset", "all", "--per-class", "2")
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "s").rglob("*.png"))) == 8
    with pytest.raises(CheckpointError, match="not 'pbc'"):
        read_gan(checkpoint, dataset="pbc")


def test_minibatch_std_is_zero_for_copies_and_positive_for_spread() -> None:
    from hemaclip.models.gan import minibatch_std

    same = torch.randn(1, 8, 4, 4).expand(8, -1, -1, -1).contiguous()
    spread = torch.randn(8, 8, 4, 4)
    assert minibatch_std(same).shape == (8, 1, 4, 4)
    assert minibatch_std(same).max().item() < 1e-3
    assert minibatch_std(spread).min().item() > 0.1
    assert minibatch_std(torch.randn(3, 8, 4, 4)).abs().sum().item() == 0.0  # odd batch: no groups, zeros


def test_mode_seeking_loss_is_lower_when_noises_give_different_images() -> None:
    from hemaclip.models.gan import mode_seeking_loss

    z_a, z_b = torch.randn(4, 16), torch.randn(4, 16)
    image = torch.rand(4, 3, 8, 8)
    collapsed = mode_seeking_loss(image, image + 0.01, z_a, z_b)
    diverse = mode_seeking_loss(image, torch.rand(4, 3, 8, 8), z_a, z_b)
    assert diverse.item() < collapsed.item()



def test_resuming_weights_that_do_not_fit_this_version_is_one_clear_error(tmp_path: Path, data_root: Path) -> None:
    train_gan("all", tmp_path / "run", load_gan_config("tiny"), data_root=data_root, max_images=48, stop_after_steps=3, progress=False)
    # as a run saved before the discriminator's last conv became its own `final` block looks to this version
    raw = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    raw["discriminator"] = {k: v for k, v in raw["discriminator"].items() if not k.startswith("final.")}
    torch.save(raw, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="last.pt: cannot resume this run with this hemaclip version"):
        train_gan("all", tmp_path / "run", load_gan_config("tiny"), data_root=data_root, max_images=48, resume=True, progress=False)
    assert read_gan(tmp_path / "run" / "last.pt").extra["step"] == 3  # the refused resume wrote nothing over it
