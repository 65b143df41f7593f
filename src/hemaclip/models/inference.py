"""Batched, gradient-free image inference shared by validation, evaluation, describe and indexing."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from hemaclip.data.transforms import eval_transform


def model_eval_transform(model: torch.nn.Module):
    """The eval transform matching the model's resolution and normalisation statistics."""
    config = model.config
    return eval_transform(config.image_size, tuple(config.image_mean), tuple(config.image_std))


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm into the convolution registered just before it, in place.

    Why: on a 2-core CPU the separate normalisation pass costs about a quarter of an EfficientNet's
    forward time (bench/results/describe_speed.json); folded, outputs agree to ~1e-5. Only for
    models that will not train again (BatchNorm statistics are gone). A timm ``BatchNormAct2d`` keeps
    its dropout and activation. Returns how many BatchNorms were folded (0 for a ViT).
    """
    folded = 0
    names = list(module._modules)
    for conv_name, norm_name in zip(names, names[1:]):
        conv, norm = module._modules[conv_name], module._modules[norm_name]
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and norm.track_running_stats
            and norm.num_features == conv.out_channels
        ):
            module._modules[conv_name] = fuse_conv_bn_eval(conv.eval(), norm.eval())
            rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            module._modules[norm_name] = nn.Sequential(*rest) if rest else nn.Identity()
            folded += 1
    for child in module.children():
        folded += fold_batchnorm(child)
    return folded


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, BatchNorm folded into convolutions, channels-last weights: the fast CPU layout."""
    model.eval()
    fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last)


def _batches(images: np.ndarray, batch_size: int, transform) -> Iterable[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        yield torch.stack([transform(torch.from_numpy(np.array(a)).permute(2, 0, 1)) for a in chunk])


@torch.no_grad()
def image_outputs(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 128, device: torch.device | str = "cpu", progress: bool = False
) -> dict[str, torch.Tensor | dict[str, torch.Tensor] | None]:
    """Normalised embeddings [N, D] and head logits for uint8 images [N, H, W, 3] (all on the CPU)."""
    transform = model_eval_transform(model)
    was_training = model.training
    model.eval()
    embeds, attrs, classes = [], {}, []
    show = progress and sys.stderr.isatty()
    try:
        total = (len(images) + batch_size - 1) // batch_size
        for batch in tqdm(_batches(images, batch_size, transform), total=total, desc="embedding images", unit="batch", disable=not show):
            raw = model.encode_image(batch.to(device).contiguous(memory_format=torch.channels_last), normalize=False)
            attribute_logits, class_logits = model.aux_logits(raw)
            embeds.append(F.normalize(raw, dim=-1).float().cpu())
            if attribute_logits is not None:
                for name, logits in attribute_logits.items():
                    attrs.setdefault(name, []).append(logits.float().cpu())
                classes.append(class_logits.float().cpu())
    finally:
        model.train(was_training)
    width = model.config.embed_dim
    return {
        "features": torch.cat(embeds) if embeds else torch.empty(0, width),
        "attribute_logits": {name: torch.cat(chunks) for name, chunks in attrs.items()} if attrs else None,
        "class_logits": torch.cat(classes) if classes else None,
    }
