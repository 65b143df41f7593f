"""Batched, gradient-free inference shared by validation, evaluation, describe, indexing and search:
image outputs, text embeddings, and the fast CPU layout of a model loaded for inference."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from hemaclip.data.preprocess import Preprocess, preprocess_for
from hemaclip.errors import HemaclipError
from hemaclip.models.modes import eval_mode

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder
    from hemaclip.models.text_cache import PooledTextCache


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm into the convolution registered just before it, in place.

    Why: on a 2-core CPU the separate normalisation pass is a sizeable part of an EfficientNet's
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


def _static_same_conv(conv: nn.Conv2d, input_hw: tuple[int, int]) -> nn.Conv2d:
    """An ordinary conv equal to TF-"same" `conv` on inputs of size `input_hw`, without the pad copy.

    TF "same" pads p // 2 before and p - p // 2 after. The same sums come from symmetric padding of the
    larger side and a kernel grown by the difference, with the original taps at its far end:
    out[j] = sum_k w[k] x[s*j + k - before] either way, with the same output size.
    """
    grow, pads = [], []
    for size, k, s, d in zip(input_hw, conv.kernel_size, conv.stride, conv.dilation):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        before, after = total // 2, total - total // 2
        grow.append(after - before)
        pads.append(after)
    static = nn.Conv2d(conv.in_channels, conv.out_channels, (conv.kernel_size[0] + grow[0], conv.kernel_size[1] + grow[1]),
                       stride=conv.stride, padding=tuple(pads), dilation=conv.dilation, groups=conv.groups,
                       bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        static.weight.zero_()
        static.weight[:, :, grow[0] :: conv.dilation[0], grow[1] :: conv.dilation[1]][:, :, : conv.kernel_size[0], : conv.kernel_size[1]] = conv.weight
        if conv.bias is not None:
            static.bias.copy_(conv.bias)
    return static


def static_same_padding(model: nn.Module, image_size: int) -> int:
    """Replace timm's dynamically padded TF-"same" convs by static ones for `image_size` inputs, in place.

    Why: tf_efficientnet_lite0 pads five stride-2 convs with a separate `F.pad` copy at every call,
    about a sixth of its CPU forward time. Only valid while inputs are `image_size` square (the
    inference paths always resize to it). Returns how many convs were replaced.
    """
    from timm.layers.conv2d_same import Conv2dSame

    targets = {m for m in model.modules() if isinstance(m, Conv2dSame) and max(m.dilation) == 1}
    if not targets:
        return 0
    shapes: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        shapes.setdefault(module, tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in targets]
    try:
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in shapes:
                setattr(parent, name, _static_same_conv(child, shapes[child]))
                replaced += 1
    return replaced


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, BatchNorm folded into convolutions, static "same" padding at the model's resolution,
    channels-last weights: the fast CPU layout. Inputs must then be `model.config.image_size` square."""
    model.eval()
    fold_batchnorm(model)
    static_same_padding(model, int(model.config.image_size))
    return model.to(memory_format=torch.channels_last)


def _batches(images: np.ndarray, batch_size: int, preprocess: Preprocess, transform: Any) -> Iterable[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield preprocess.batch(images[start : start + batch_size], transform)


@torch.no_grad()
def image_outputs(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 128, device: torch.device | str = "cpu", progress: bool = False
) -> dict[str, torch.Tensor | dict[str, torch.Tensor] | None]:
    """Normalised embeddings [N, D] and head logits for uint8 images [N, H, W, 3] (all on the CPU).

    Images are the model's uint8 arrays (:meth:`hemaclip.data.preprocess.Preprocess.to_array`); the
    model's preprocessing turns them into normalised tensors at its input size.
    """
    preprocess = preprocess_for(model)
    transform = preprocess.eval_transform()
    embeds, attrs, classes = [], {}, []
    show = progress and sys.stderr.isatty()
    with eval_mode(model):
        total = (len(images) + batch_size - 1) // batch_size
        for batch in tqdm(_batches(images, batch_size, preprocess, transform), total=total, desc="embedding images", unit="batch", disable=not show):
            raw = model.encode_image(batch.to(device).contiguous(memory_format=torch.channels_last), normalize=False)
            attribute_logits, class_logits = model.aux_logits(raw)
            embeds.append(F.normalize(raw, dim=-1).float().cpu())
            if attribute_logits is not None:
                for name, logits in attribute_logits.items():
                    attrs.setdefault(name, []).append(logits.float().cpu())
                classes.append(class_logits.float().cpu())
    width = model.config.embed_dim
    return {
        "features": torch.cat(embeds) if embeds else torch.empty(0, width),
        "attribute_logits": {name: torch.cat(chunks) for name, chunks in attrs.items()} if attrs else None,
        "class_logits": torch.cat(classes) if classes else None,
    }


TEXT_CHUNK = 1024  # pooled text features projected per step


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: Sequence[str], text_cache: PooledTextCache | None = None) -> np.ndarray:
    """L2-normalised text embeddings [T, D] float32: the one text-embedding helper (search queries,
    retrieval prompts and captions).

    An empty list gives an empty [0, D] array; a blank text is a user error (`HemaclipError`: there is
    nothing to look for). With `text_cache` (a :class:`hemaclip.models.text_cache.PooledTextCache`)
    pooled text-tower features come from / go to it; without, the text tower runs on these texts only
    (nothing is written to disk, as a server answering queries needs).
    """
    texts = [str(t).strip() for t in texts]
    if any(not t for t in texts):
        raise HemaclipError("empty text query: describe the cells to find, e.g. 'large cell with coarse red granules'")
    if not texts:
        return np.zeros((0, int(model.config.embed_dim)), dtype=np.float32)
    with eval_mode(model):
        pooled = text_cache.get(texts) if text_cache is not None else model.text.embed_sentences(texts)
        device = next(model.parameters()).device
        chunks = [
            model.encode_text(pooled[s : s + TEXT_CHUNK].to(device), normalize=True).float().cpu()
            for s in range(0, len(texts), TEXT_CHUNK)
        ]
    return np.ascontiguousarray(torch.cat(chunks).numpy(), dtype=np.float32)
