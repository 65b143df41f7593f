"""Where in the image a prediction comes from: Grad-CAM for CNN towers, gradient-weighted attention rollout for ViTs.

A saliency map is a coarse sanity check for a reviewer ("is the model looking at the cell or at the
background?"), not an explanation of the decision; maps are at the resolution of the last feature map
(4x4 for a 128 px EfficientNet) or of the patch grid, upsampled to the image.

* **CNN towers** (timm or torchvision): Grad-CAM (Selvaraju et al. 2017) on the last 4-D feature map
  the trunk produces before pooling, found with forward hooks, so no architecture table is needed.
* **ViT towers** (timm): attention rollout (Abnar & Zuidema 2020) with every layer's head-averaged
  attention weighted by its positive gradient (Chefer et al. 2021), so it depends on the target.

The target is the class read-out or one attribute's read-out: the model's supervised head when it has
one, else the zero-shot prompt ensemble; `value=None` explains the predicted class/value.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.errors import HemaclipError
from hemaclip.models.modes import eval_mode

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = ["overlay_png", "saliency_map"]

Prompts = Mapping[str, Sequence[str]]

OVERLAY_ALPHA = 0.45
OVERLAY_COLORMAP = "jet"


def _input_tensor(model: DualEncoder, image: np.ndarray) -> torch.Tensor:
    from hemaclip.data.preprocess import preprocess_for

    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise HemaclipError(f"saliency needs a uint8 HxWx3 RGB image, got {array.dtype} {array.shape}")
    return preprocess_for(model).batch([array])


def _target_score(model: DualEncoder, raw: torch.Tensor, target: str, value: str | None, class_prompts: Prompts | None = None) -> torch.Tensor:
    """Scalar logit of the chosen class / attribute value for the single image of `raw` [1, D]."""
    from hemaclip.models.text_cache import PooledTextCache
    from hemaclip.models.zero_shot import build_zero_shot_classifier
    from hemaclip.text.prompts import load_prompts

    attribute_logits, class_logits = model.aux_logits(raw)
    if target == "class":
        if class_prompts is not None:  # read through these prompts even if the model has a (maybe untrained) head
            weights = build_zero_shot_classifier(model, class_prompts, PooledTextCache(model.text)).to(raw.dtype)
            logits, names = (F.normalize(raw, dim=-1) @ weights.T)[0], list(class_prompts)
        elif class_logits is not None:
            logits, names = class_logits[0], list(model.class_names)
        else:
            prompts = load_prompts().class_prompts("pbc")
            weights = build_zero_shot_classifier(model, prompts, PooledTextCache(model.text)).to(raw.dtype)
            logits, names = (F.normalize(raw, dim=-1) @ weights.T)[0], list(prompts)
    elif target in ATTRIBUTES:
        if attribute_logits is not None and target in attribute_logits:
            logits, names = attribute_logits[target][0], list(model.attributes[target])
        else:
            prompts = load_prompts().attribute_prompts()[target]
            weights = build_zero_shot_classifier(model, prompts, PooledTextCache(model.text)).to(raw.dtype)
            logits, names = (F.normalize(raw, dim=-1) @ weights.T)[0], list(prompts)
    else:
        raise HemaclipError(f"unknown saliency target '{target}'; use 'class' or one of {', '.join(ATTRIBUTES)}")
    if value is None:
        return logits[int(torch.argmax(logits))]
    if value not in names:
        raise HemaclipError(f"'{value}' is not a value of {target} (choose from {', '.join(names)})")
    return logits[names.index(value)]


def _is_vit(trunk: torch.nn.Module) -> bool:
    return hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed")


def _normalise(heat: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    heat = heat.detach().float().clamp(min=0)[None, None]
    heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0, 0]
    low, high = float(heat.min()), float(heat.max())
    out = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    return out.clamp(0, 1).numpy().astype(np.float32)


def _grad_cam(model: DualEncoder, x: torch.Tensor, target: str, value: str | None, class_prompts: Prompts | None = None) -> torch.Tensor:
    trunk = model.visual.trunk
    maps: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if module is not trunk and isinstance(output, torch.Tensor) and output.ndim == 4:
            maps.append(output)

    handles = [m.register_forward_hook(hook) for m in trunk.modules()]
    try:
        raw = model.encode_image(x, normalize=False)
    finally:
        for h in handles:
            h.remove()
    if not maps:
        raise HemaclipError(f"no 4-D feature map found in the image tower {type(trunk).__name__}")
    # The last feature map before pooling; if it is 1x1 (tiny inputs) use the last one with some extent.
    spatial = [m for m in maps if m.shape[-1] * m.shape[-2] > 1]
    fmap = spatial[-1] if spatial and maps[-1].shape[-1] * maps[-1].shape[-2] == 1 else maps[-1]
    score = _target_score(model, raw, target, value, class_prompts)
    (grad,) = torch.autograd.grad(score, fmap)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * fmap).sum(dim=1))[0]


def _attention_rollout(model: DualEncoder, x: torch.Tensor, target: str, value: str | None, class_prompts: Prompts | None = None) -> torch.Tensor:
    trunk = model.visual.trunk
    attentions: list[torch.Tensor] = []
    blocks = list(trunk.blocks)
    fused = [getattr(b.attn, "fused_attn", False) for b in blocks]

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        attentions.append(output)

    handles = []
    try:
        for block in blocks:
            block.attn.fused_attn = False  # the fused kernel never materialises the attention matrix
            handles.append(block.attn.attn_drop.register_forward_hook(hook))
        raw = model.encode_image(x, normalize=False)
    finally:
        for h in handles:
            h.remove()
        for block, was in zip(blocks, fused):
            block.attn.fused_attn = was
    if len(attentions) != len(blocks):
        raise HemaclipError("could not capture the ViT attention maps")
    score = _target_score(model, raw, target, value, class_prompts)
    grads = torch.autograd.grad(score, attentions)
    tokens = attentions[0].shape[-1]
    rollout = torch.eye(tokens)
    for attn, grad in zip(attentions, grads):
        weighted = (grad * attn).clamp(min=0).mean(dim=1)[0]  # heads averaged, positive contributions
        rollout = rollout + weighted.detach() @ rollout
    prefix = int(getattr(trunk, "num_prefix_tokens", 1))
    grid = trunk.patch_embed.grid_size
    return rollout[0, prefix:].reshape(int(grid[0]), int(grid[1]))


def saliency_map(
    model: DualEncoder, image: np.ndarray, target: str = "class", value: str | None = None, class_prompts: Prompts | None = None
) -> np.ndarray:
    """Saliency of `target` ("class" or an attribute name; `value` None = the predicted one) for one
    uint8 HxWx3 image, as float32 [H, W] in [0, 1] at the image's own size. `class_prompts` (class ->
    prompts) reads the class through those prompts instead of the head (a model trained with sentences only).

    An all-zero map means the feature map holds no positive evidence for that target (Grad-CAM keeps
    only positive contributions), which can happen for a value the model does not predict.
    """
    x = _input_tensor(model, image).requires_grad_(True)
    with eval_mode(model):
        with torch.enable_grad():
            trunk = model.visual.trunk
            explain = _attention_rollout if _is_vit(trunk) else _grad_cam
            heat = explain(model, x, target, value, class_prompts)
    return _normalise(heat, tuple(np.asarray(image).shape[:2]))


def overlay_png(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> bytes:
    """PNG bytes of `image` with `heat` ([H, W] in [0, 1]) blended on top as a colour map."""
    from matplotlib import colormaps

    array = np.asarray(image, dtype=np.uint8)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != array.shape[:2]:
        raise HemaclipError(f"heat map {heat.shape} does not match the image {array.shape[:2]}")
    coloured = colormaps[OVERLAY_COLORMAP](np.clip(heat, 0, 1))[..., :3] * 255.0
    blended = (1 - alpha) * array.astype(np.float32) + alpha * coloured
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
