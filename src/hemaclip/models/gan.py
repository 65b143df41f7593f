"""A small class-conditional GAN for synthesising cell images of one dataset (class balancing).

Why this design: the datasets are small (the ALL train split is ~2,250 images) and training runs on
2 CPU cores, so the nets are DCGAN-sized (about 1-2 M parameters each at 64 px). Stabilisers that
cost nothing at this size are used: spectral normalisation in every discriminator layer, a
projection discriminator (Miyato & Koyama 2018) for the class condition, class-conditional batch
norm in the generator, the hinge loss, and DiffAugment (Zhao et al. 2020: colour, translation and
cutout applied to real *and* generated images before the discriminator, differentiably, so the
discriminator cannot simply memorise a few hundred images).

A GAN checkpoint is one file (``torch.save`` of plain values, loadable with ``weights_only=True``)
whose ``kind`` is :data:`GAN_KIND`; it records the dataset name, class list, image size and
:data:`GAN_FORMAT`, so sampling can refuse a checkpoint of another dataset or another kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from hemaclip import __version__
from hemaclip.errors import CheckpointError, HemaclipError
from hemaclip.io import Rule, at_least, atomic_write, between, check_values, config_from_dict, one_of
from hemaclip.models.modes import eval_mode

GAN_KIND = "hemaclip-gan"
GAN_FORMAT = 1
SUPPORTED_SIZES = (32, 64, 128)


@dataclass
class GanConfig:
    """Architecture of generator and discriminator (saved in every checkpoint)."""

    image_size: int = 64
    num_classes: int = 4
    z_dim: int = 128
    g_channels: int = 32  # width of the last generator stage; earlier stages double it, up to 8x
    d_channels: int = 32  # width of the first discriminator stage; later stages double it, up to 8x
    class_embed_dim: int = 128
    minibatch_std: bool = True  # a batch-spread feature in D (StyleGAN's cure for a generator that ignores z)

    RULES: ClassVar[dict[str, Rule]] = {
        "image_size": one_of(SUPPORTED_SIZES), "num_classes": at_least(1), "z_dim": at_least(1),
        "g_channels": at_least(1), "d_channels": at_least(1), "class_embed_dim": at_least(1),
    }

    def __post_init__(self) -> None:
        check_values(self, "GAN model config", self.RULES)

    @property
    def n_stages(self) -> int:
        """Number of 2x up-(G) or down-(D) sampling stages between 4x4 and `image_size`."""
        return int(math.log2(self.image_size // 4))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> "GanConfig":
        return config_from_dict(cls, data, "GAN model config", source)


def _stage_widths(base: int, n: int) -> list[int]:
    """Widths from coarse to fine: base * 8, ..., base (capped at 8x), length n + 1."""
    return [base * min(8, 2 ** (n - i)) for i in range(n + 1)]


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine, whose gain and bias are looked up per class."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.embed = nn.Embedding(num_classes, channels * 2)
        nn.init.ones_(self.embed.weight[:, :channels])
        nn.init.zeros_(self.embed.weight[:, channels:])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gain, bias = self.embed(y).chunk(2, dim=1)
        return self.bn(x) * gain[:, :, None, None] + bias[:, :, None, None]


class GeneratorBlock(nn.Module):
    """DCGAN up-step: 4x4 transposed conv with stride 2, class-conditional BN, ReLU.

    (A transposed conv costs 4/9 of nearest-upsampling + 3x3 conv at the same widths, which
    matters on 2 CPU cores.)
    """

    def __init__(self, c_in: int, c_out: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
        self.norm = ConditionalBatchNorm(c_out, num_classes)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x), y))


class Generator(nn.Module):
    """(z [N, z_dim], class index [N]) -> images [N, 3, S, S] in [-1, 1]."""

    def __init__(self, config: GanConfig) -> None:
        super().__init__()
        self.config = config
        widths = _stage_widths(config.g_channels, config.n_stages)
        self.class_embed = nn.Embedding(config.num_classes, config.class_embed_dim)
        self.fc = nn.Linear(config.z_dim + config.class_embed_dim, widths[0] * 16)
        self.blocks = nn.ModuleList(
            GeneratorBlock(widths[i], widths[i + 1], config.num_classes) for i in range(config.n_stages)
        )
        self.out_norm = nn.BatchNorm2d(widths[-1])
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, self.class_embed(y)], dim=1))
        # channels-last memory is ~3x faster for these convs on CPU (oneDNN)
        h = F.relu(h.view(z.shape[0], -1, 4, 4)).contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.to_rgb(F.relu(self.out_norm(h))))


class Discriminator(nn.Module):
    """Spectrally normalised strided convs, sum pooling, and a projection term for the class.

    Output = linear(h) + <embed(y), h>: the class enters as an inner product with the image
    features, which is what makes the projection discriminator stable for many classes.
    """

    def __init__(self, config: GanConfig) -> None:
        super().__init__()
        self.config = config
        widths = list(reversed(_stage_widths(config.d_channels, config.n_stages)))
        layers: list[nn.Module] = []
        c_in = 3
        for width in widths[:-1]:
            layers += [spectral_norm(nn.Conv2d(c_in, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in = width
        self.features = nn.Sequential(*layers)
        extra = 1 if config.minibatch_std else 0
        self.final = nn.Sequential(spectral_norm(nn.Conv2d(c_in + extra, widths[-1], 3, padding=1)), nn.LeakyReLU(0.2))
        self.linear = spectral_norm(nn.Linear(widths[-1], 1))
        self.class_embed = spectral_norm(nn.Embedding(config.num_classes, widths[-1]))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.features(x.contiguous(memory_format=torch.channels_last))
        if self.config.minibatch_std:
            h = torch.cat([h, minibatch_std(h)], dim=1)
        h = self.final(h).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.class_embed(y) * h).sum(dim=1)


def minibatch_std(h: Tensor, group: int = 4) -> Tensor:
    """One feature map [N, 1, H, W]: the mean standard deviation of `h` across small groups of the batch.

    (Karras et al. 2018.) A generator that ignores its noise makes this ~0 on fakes and not on reals,
    so the discriminator can see the missing diversity that a per-image judgement cannot.
    """
    n, c, height, width = h.shape
    g = group if n % group == 0 else (2 if n % 2 == 0 else 1)
    if g == 1:
        return h.new_zeros(n, 1, height, width)
    spread = h.view(g, n // g, c, height, width).float().var(dim=0, unbiased=False).add(1e-8).sqrt()
    spread = spread.mean(dim=(1, 2, 3)).to(h.dtype)  # [n // g]
    return spread.view(1, n // g, 1, 1, 1).expand(g, -1, 1, height, width).reshape(n, 1, height, width)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# Losses and differentiable augmentation
# ------------------------------------------------------------------------------------------------


def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def g_hinge_loss(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss: -mean(D(G(z)))."""
    return -fake_logits.mean()


def mode_seeking_loss(fake_a: Tensor, fake_b: Tensor, z_a: Tensor, z_b: Tensor, eps: float = 1e-5) -> Tensor:
    """MSGAN's term: 1 / (mean |G(z_a) - G(z_b)| / mean |z_a - z_b|), small when different noises give different images."""
    ratio = (fake_a - fake_b).abs().mean() / (z_a - z_b).abs().mean()
    return 1.0 / (ratio + eps)


@dataclass
class DiffAugmentConfig:
    """Which DiffAugment transforms run (applied identically in kind to real and fake batches)."""

    color: bool = True
    translation: float = 0.125  # max shift as a fraction of the image side; 0 disables
    cutout: float = 0.5  # side of the cut-out square as a fraction of the image side; 0 disables

    RULES: ClassVar[dict[str, Rule]] = {"translation": between(0, 1), "cutout": between(0, 1)}

    def __post_init__(self) -> None:
        check_values(self, "GAN augment config", self.RULES)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> "DiffAugmentConfig":
        return config_from_dict(cls, data, "GAN augment config", source)


def diff_augment(x: Tensor, config: DiffAugmentConfig) -> Tensor:
    """DiffAugment (Zhao et al. 2020) on images in [-1, 1]: every op is differentiable in `x`.

    Randomness comes from torch's global generator, so a seeded training step is reproducible.
    """
    n = x.shape[0]
    if config.color:
        x = x + (torch.rand(n, 1, 1, 1, device=x.device) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) + 0.5) + mean
    if config.translation > 0:
        x = _translate(x, config.translation)
    if config.cutout > 0:
        x = _cutout(x, config.cutout)
    return x


def _translate(x: Tensor, ratio: float) -> Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device), torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij"
    )
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x: Tensor, ratio: float) -> Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device), torch.arange(ch, device=x.device), torch.arange(cw, device=x.device), indexing="ij"
    )
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC (CPU)."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(
    generator: Generator, labels: Sequence[int] | Tensor, seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu"
) -> Tensor:
    """uint8 images [N, S, S, 3], one per entry of `labels` (class indices), reproducible from `seed`."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    rng = torch.Generator().manual_seed(int(seed))
    out = []
    with eval_mode(generator):
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size]
            z = torch.randn(len(y), generator.config.z_dim, generator=rng)
            out.append(to_uint8(generator(z.to(device), y.to(device))))
    size = generator.config.image_size
    return torch.cat(out) if out else torch.empty(0, size, size, 3, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


@dataclass
class GanState:
    """Everything a GAN checkpoint holds besides the weights' classes (see :func:`save_gan`)."""

    config: GanConfig
    dataset: str
    classes: list[str]
    generator: dict[str, Tensor]
    discriminator: dict[str, Tensor] | None = None
    generator_ema: dict[str, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save_gan(path: str | Path, state: GanState) -> Path:
    """Write a GAN checkpoint atomically (one file; plain values and tensors only)."""
    path = Path(path)
    if len(state.classes) != state.config.num_classes:
        raise ValueError(f"{len(state.classes)} class names for a GAN with {state.config.num_classes} classes")
    payload = {
        "kind": GAN_KIND,
        "format": GAN_FORMAT,
        "hemaclip_version": __version__,
        "dataset": state.dataset,
        "classes": list(state.classes),
        "image_size": state.config.image_size,
        "config": state.config.to_dict(),
        "generator": state.generator,
        "discriminator": state.discriminator,
        "generator_ema": state.generator_ema,
        "extra": state.extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def read_gan(path: str | Path, dataset: str | None = None) -> GanState:
    """Read a GAN checkpoint; one-line `CheckpointError` naming the file if it is not one we can use.

    With `dataset` given, a checkpoint trained on another dataset is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "unreadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})") from exc
    if not isinstance(payload, Mapping) or payload.get("kind") != GAN_KIND:
        raise CheckpointError(f"{path}: not a hemaclip GAN checkpoint (train one with `hemaclip synth train`)")
    if payload.get("format") != GAN_FORMAT:
        raise CheckpointError(f"{path}: GAN checkpoint format {payload.get('format')} is not supported (expected {GAN_FORMAT})")
    if dataset is not None and payload["dataset"] != dataset:
        raise CheckpointError(f"{path}: GAN was trained on dataset '{payload['dataset']}', not '{dataset}'")
    try:
        config = GanConfig.from_dict(payload["config"])
    except HemaclipError as exc:
        raise CheckpointError(f"{path}: bad GAN config ({exc})") from exc
    return GanState(
        config=config,
        dataset=str(payload["dataset"]),
        classes=list(payload["classes"]),
        generator=payload["generator"],
        discriminator=payload.get("discriminator"),
        generator_ema=payload.get("generator_ema"),
        extra=dict(payload.get("extra") or {}),
    )


def load_generator(path: str | Path, dataset: str | None = None, use_ema: bool = True) -> tuple[Generator, GanState]:
    """The generator of a checkpoint (its EMA copy when present and `use_ema`), in eval mode."""
    state = read_gan(path, dataset)
    generator = Generator(state.config)
    weights = state.generator_ema if (use_ema and state.generator_ema is not None) else state.generator
    try:
        generator.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: generator weights do not match its config ({str(exc).splitlines()[0]})") from exc
    return generator.eval(), state
