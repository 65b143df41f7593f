"""Train a class-conditional GAN on one dataset's train split (sampling: `hemaclip.tasks.synthesis`).

Only the **train** split is ever shown to the GAN (val/test stay untouched for the downstream
checks). Training is resumable to the exact step: every random draw of a step (which real images,
the noise, DiffAugment) is seeded from (seed, step), and the checkpoint holds both nets, the EMA
generator, both optimizers and the position. A checkpoint is written atomically every
``save_every_steps`` steps, at each epoch end and when a wall-clock budget runs out.

For the class-balancing experiment one class can be thinned on purpose before training
(:func:`reduce_records`, e.g. keep 10 % of benign hematogones); the reduction is recorded in the
checkpoint so evaluation rebuilds exactly the same reduced set.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hemaclip.data.datasets import CellRecord, load_dataset
from hemaclip.data.image_cache import decoded_images
from hemaclip.errors import CheckpointError, DataError, HemaclipError
from hemaclip.io import Rule, apply_overrides, at_least, atomic_write, between, check_values, config_from_dict, greater_than, one_of, read_config, remove_stale_temps, write_json
from hemaclip.log import logged_run
from hemaclip.models.gan import (
    DiffAugmentConfig,
    Discriminator,
    GanConfig,
    GanState,
    Generator,
    count_parameters,
    d_hinge_loss,
    diff_augment,
    g_hinge_loss,
    generate,
    mode_seeking_loss,
    read_gan,
    save_gan,
)
from hemaclip.train.seeds import step_seed

LAST = "last.pt"
HISTORY = "metrics.jsonl"
SAMPLING_MODES = ("uniform", "balanced")


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class GanTrainConfig:
    """Everything a GAN run needs besides the data (`src/hemaclip/configs/gan/*.json`)."""

    model: GanConfig = field(default_factory=GanConfig)
    augment: DiffAugmentConfig = field(default_factory=DiffAugmentConfig)
    epochs: int = 30
    batch_size: int = 32
    lr_g: float = 1e-4
    lr_d: float = 4e-4  # two time-scale update rule (TTUR): D learns faster
    betas: tuple[float, float] = (0.0, 0.9)
    ema_decay: float = 0.995
    # mode-seeking term (Mao et al. 2019): pushes two noises of one class apart in image space, the
    # remedy for a conditional generator that learns to ignore z (seen here without it); 0 disables
    mode_seeking_weight: float = 0.2
    sampling: str = "balanced"  # "balanced": each real image's class drawn uniformly, so rare classes train as often
    real_flips: bool = True  # flips/90-degree turns of real images (cells have no up or down)
    save_every_steps: int = 50
    grid_per_class: int = 8
    seed: int = 0

    RULES: ClassVar[dict[str, Rule]] = {
        "epochs": at_least(1), "batch_size": at_least(1), "lr_g": greater_than(0), "lr_d": greater_than(0),
        "betas": ("two numbers within [0, 1)", lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)),
        "ema_decay": between(0, 1), "mode_seeking_weight": at_least(0), "sampling": one_of(SAMPLING_MODES),
        "save_every_steps": at_least(1), "grid_per_class": at_least(1), "seed": at_least(0),
    }

    def __post_init__(self) -> None:
        check_values(self, "GAN config", self.RULES)
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "GAN config") -> "GanTrainConfig":
        return config_from_dict(cls, data, "GAN config", source, nested={"model": GanConfig, "augment": DiffAugmentConfig})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_gan_config(name_or_path: str | Path = "default", overrides: Mapping[str, Any] | None = None) -> GanTrainConfig:
    """A packaged GAN config by name ('default', 'tiny') or a JSON path, with `overrides` on top.

    Override keys may be top-level options or ``model.<key>`` / ``augment.<key>``.
    """
    path, payload = read_config(name_or_path, "gan", "GAN config")
    return GanTrainConfig.from_dict(apply_overrides(payload, overrides), source=str(path))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def parse_reduce(spec: Sequence[str] | None) -> dict[str, float]:
    """`['benign=0.1']` -> {'benign': 0.1} (fraction of that class's train images to keep)."""
    out: dict[str, float] = {}
    for item in spec or ():
        name, sep, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = float("nan")
        if not sep or not name or not (0.0 < fraction <= 1.0):
            raise HemaclipError(f"--reduce '{item}': expected CLASS=FRACTION with 0 < FRACTION <= 1 (e.g. benign=0.1)")
        out[name] = fraction
    return out


def reduce_records(records: Sequence[CellRecord], fractions: Mapping[str, float], seed: int = 0) -> list[CellRecord]:
    """Keep round(fraction * n) (at least 1) of each named class, chosen by a seeded shuffle; order kept."""
    labels = {r.label for r in records}
    unknown = sorted(set(fractions) - labels)
    if unknown:
        raise DataError(f"--reduce: class(es) {', '.join(unknown)} not in this split (classes: {', '.join(sorted(labels))})")
    drop: set[int] = set()
    for name, fraction in sorted(fractions.items()):
        members = sorted((i for i, r in enumerate(records) if r.label == name), key=lambda i: str(records[i].path))
        rng = np.random.default_rng([seed, sum(name.encode())])
        keep = max(1, int(round(fraction * len(members))))
        order = rng.permutation(len(members))
        drop.update(members[j] for j in order[keep:])
    return [r for i, r in enumerate(records) if i not in drop]


def train_records(
    dataset: str, data_root: Path | str | None = None, reduce: Mapping[str, float] | None = None, reduce_seed: int = 0
) -> tuple[tuple[str, ...], list[CellRecord]]:
    """The dataset's class list and the (optionally reduced) train split the GAN may see."""
    ds = load_dataset(dataset, data_root)
    records = ds.split("train")
    if reduce:
        records = reduce_records(records, reduce, reduce_seed)
    if not records:
        raise DataError(f"dataset '{dataset}' has no train images")
    return ds.classes, records


def _draw_batch(labels: np.ndarray, n_classes: int, batch: int, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of one real batch: uniform over images, or class drawn uniformly then an image of it."""
    if sampling == "uniform":
        return rng.choice(len(labels), size=min(batch, len(labels)), replace=len(labels) < batch)
    present = [c for c in range(n_classes) if np.any(labels == c)]
    classes = rng.choice(present, size=batch)
    members = {c: np.flatnonzero(labels == c) for c in present}
    return np.array([members[c][rng.integers(len(members[c]))] for c in classes])


def _flip_rotate(x: torch.Tensor) -> torch.Tensor:
    """A random flip and 90-degree turn per image (uses torch's seeded global generator)."""
    flips = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flips[:, None, None, None], x.flip(3), x)
    turns = torch.randint(0, 4, (x.shape[0],))
    return torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(x, turns)])


# ------------------------------------------------------------------------------------------------
# Sample grids
# ------------------------------------------------------------------------------------------------


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2) -> np.ndarray:
    """uint8 [rows*cols, H, W, 3] -> one uint8 image with white padding (missing cells stay white)."""
    n, h, w, _ = images.shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(min(n, rows * cols)):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    return grid


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write a uint8 HxWx3 array as PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def class_grid(generator: Generator, n_per_class: int, seed: int, classes: Sequence[int] | None = None) -> np.ndarray:
    """One row per class of `n_per_class` samples (fixed noise from `seed`)."""
    classes = list(range(generator.config.num_classes)) if classes is None else list(classes)
    labels = [c for c in classes for _ in range(n_per_class)]
    images = generate(generator, labels, seed=seed).numpy()
    return image_grid(images, len(classes), n_per_class)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a call of :func:`train_gan` did."""

    out: Path
    step: int
    epoch: float
    total_steps: int
    finished: bool
    seconds: float
    history: list[dict[str, Any]]


def _ema_update(ema: Generator, generator: Generator, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), generator.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), generator.buffers()):
            e.copy_(b)


@logged_run("synth train")
def train_gan(
    dataset: str,
    out: Path | str,
    config: GanTrainConfig,
    *,
    data_root: Path | str | None = None,
    reduce: Mapping[str, float] | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    max_minutes: float | None = None,
    stop_after_steps: int | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) a GAN on the train split of `dataset`; writes ``OUT/last.pt`` and grids.

    `max_minutes` stops cleanly after that much wall-clock time (checkpoint written, `--resume`
    continues); `stop_after_steps` stops after that global step (used by tests to simulate a stop);
    `max_images` keeps a class-stratified subset of the train split (smoke runs).
    """
    out = Path(out)
    device = torch.device(device)
    last = out / LAST
    if last.exists() and not resume:
        raise HemaclipError(f"{out}: a GAN run is already here; pass --resume to continue it or choose another --out")
    if resume and not last.exists():
        raise HemaclipError(f"{last}: nothing to resume (no checkpoint)")
    state: GanState | None = None
    if resume:
        remove_stale_temps(out)
        state = read_gan(last, dataset)
        config = GanTrainConfig.from_dict(state.extra["train_config"], source=str(last))
        reduce = state.extra.get("reduce") or {}

    classes, records = train_records(dataset, data_root, reduce, config.seed)
    if max_images is not None and len(records) > max_images:
        rng = np.random.default_rng(config.seed)
        records = [records[i] for i in sorted(rng.permutation(len(records))[:max_images])]
    model_config = GanConfig.from_dict({**config.model.to_dict(), "num_classes": len(classes)})
    config.model = model_config
    size = model_config.image_size

    images = decoded_images([r.path for r in records], size, progress=progress)
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[r.label] for r in records])

    torch.manual_seed(config.seed)
    generator = Generator(model_config).to(device, memory_format=torch.channels_last)
    discriminator = Discriminator(model_config).to(device, memory_format=torch.channels_last)
    ema = Generator(model_config).to(device, memory_format=torch.channels_last)
    ema.load_state_dict(generator.state_dict())
    ema.eval()
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr_d, betas=config.betas)

    steps_per_epoch = max(1, len(records) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    step = 0
    history: list[dict[str, Any]] = []
    if state is not None:
        try:
            generator.load_state_dict(state.generator)
            discriminator.load_state_dict(state.discriminator)
            ema.load_state_dict(state.generator_ema)
            opt_g.load_state_dict(state.extra["opt_g"])
            opt_d.load_state_dict(state.extra["opt_d"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{last}: cannot resume this run with this hemaclip version ({first})") from None
        step = int(state.extra["step"])
        history = list(state.extra.get("history", []))
        if int(state.extra.get("train_images", len(records))) != len(records):
            raise HemaclipError(f"{last}: trained on {state.extra['train_images']} images but the data now gives {len(records)}")

    counts = {c: int(np.sum(labels == i)) for i, c in enumerate(classes)}
    train_config_dict = config.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"dataset": dataset, "reduce": dict(reduce or {}), "train_counts": counts, **train_config_dict})

    def checkpoint(extra_status: str) -> None:
        save_gan(
            last,
            GanState(
                config=model_config,
                dataset=dataset,
                classes=list(classes),
                generator={k: v.detach().cpu() for k, v in generator.state_dict().items()},
                discriminator={k: v.detach().cpu() for k, v in discriminator.state_dict().items()},
                generator_ema={k: v.detach().cpu() for k, v in ema.state_dict().items()},
                extra={
                    "step": step,
                    "total_steps": total_steps,
                    "status": extra_status,
                    "train_config": train_config_dict,
                    "reduce": dict(reduce or {}),
                    "train_counts": counts,
                    "train_images": len(records),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "history": history,
                    "parameters": {"generator": count_parameters(generator), "discriminator": count_parameters(discriminator)},
                },
            ),
        )

    def epoch_end(epoch: int, sums: dict[str, float], n: int, seconds: float) -> None:
        row = {"epoch": epoch, "step": step, "seconds": round(seconds, 2), **{k: v / max(n, 1) for k, v in sums.items()}}
        history.append(row)
        grid = class_grid(ema, config.grid_per_class, seed=config.seed)
        write_png(out / "samples" / f"epoch_{epoch:03d}.png", grid)
        buffer = "".join(json.dumps(r) + "\n" for r in history)
        with atomic_write(out / HISTORY) as handle:
            handle.write(buffer)

    start = time.monotonic()
    show = progress and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=step, desc="GAN", unit="step", disable=not show)
    # Named loss terms, each logged per epoch: D's hinge loss, G's total and its two parts.
    sums: dict[str, float] = {"loss_d": 0.0, "loss_g": 0.0, "loss_g_hinge": 0.0, "loss_g_mode_seeking": 0.0, "d_real": 0.0, "d_fake": 0.0}
    n_in_epoch = 0
    epoch_start = time.monotonic()
    finished = True
    generator.train()
    discriminator.train()
    try:
        while step < total_steps:
            if stop_after_steps is not None and step >= stop_after_steps:
                finished = False
                break
            if max_minutes is not None and time.monotonic() - start > max_minutes * 60:
                finished = False
                break
            seed = step_seed(config.seed, step)
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            idx = _draw_batch(labels, len(classes), config.batch_size, config.sampling, rng)
            real = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            if config.real_flips:
                real = _flip_rotate(real)
            real = real.to(device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels[idx]).long().to(device)
            z = torch.randn(len(idx), model_config.z_dim, device=device)
            half = len(idx) // 2
            y_fake = torch.cat([y[:half], y[:half], y[2 * half :]])  # two noises per class label: pairs i, i + half

            fake = generator(z, y_fake)
            real_logits = discriminator(diff_augment(real, config.augment), y)
            fake_logits = discriminator(diff_augment(fake.detach(), config.augment), y_fake)
            loss_d = d_hinge_loss(real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            g_hinge = g_hinge_loss(discriminator(diff_augment(fake, config.augment), y_fake))
            loss_g = g_hinge
            g_mode_seeking = 0.0
            if config.mode_seeking_weight > 0 and half > 0:
                mode_seeking = config.mode_seeking_weight * mode_seeking_loss(fake[:half], fake[half : 2 * half], z[:half], z[half : 2 * half])
                loss_g = loss_g + mode_seeking
                g_mode_seeking = mode_seeking.item()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            _ema_update(ema, generator, config.ema_decay)

            if not (math.isfinite(loss_d.item()) and math.isfinite(loss_g.item())):
                raise HemaclipError(f"GAN training diverged at step {step} (loss_d={loss_d.item()}, loss_g={loss_g.item()})")
            sums["loss_d"] += loss_d.item()
            sums["loss_g"] += loss_g.item()
            sums["loss_g_hinge"] += g_hinge.item()
            sums["loss_g_mode_seeking"] += g_mode_seeking
            sums["d_real"] += real_logits.mean().item()
            sums["d_fake"] += fake_logits.mean().item()
            n_in_epoch += 1
            step += 1
            bar.update(1)
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
            if step % steps_per_epoch == 0:
                epoch_end(step // steps_per_epoch, sums, n_in_epoch, time.monotonic() - epoch_start)
                sums = dict.fromkeys(sums, 0.0)
                n_in_epoch = 0
                epoch_start = time.monotonic()
                checkpoint("epoch end")
            elif step % config.save_every_steps == 0:
                checkpoint("mid-epoch")
    finally:
        bar.close()
    status = "finished" if finished else "stopped"
    checkpoint(status)
    if finished and history and history[-1]["step"] != step:
        epoch_end(math.ceil(step / steps_per_epoch), sums, n_in_epoch, time.monotonic() - epoch_start)
    return TrainResult(
        out=out,
        step=step,
        epoch=step / steps_per_epoch,
        total_steps=total_steps,
        finished=finished,
        seconds=time.monotonic() - start,
        history=history,
    )
