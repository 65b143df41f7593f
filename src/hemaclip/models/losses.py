"""Contrastive losses (InfoNCE, WBC-CLIP soft targets, multi-positive) and the auxiliary head losses.

Every contrastive loss is called as `loss(image_features, text_features, logit_scale, positive=None,
known=None)` with L2-normalised features and returns one tensor; only the multi-positive loss reads the
statement masks (which image each sentence is true of, and where that is known). All support
data-parallel training: with `world_size > 1` features are gathered from all ranks with open_clip's
`gather_features`, `gather_with_grad=True` back-propagating through the gather; InfoNCE and the soft-target
loss also offer `local_loss=True` (this rank's rows against all columns, memory O(B·N) instead of O(N²)).

The trainer keeps the loss as named terms (:data:`TERMS`): the weighted contrastive loss and the weighted
attribute-head and class-head cross-entropies (:func:`aux_supervised_loss` returns them as a dict), logs
each one, and optimises their sum.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features
from torch import Tensor, nn

from hemaclip.errors import HemaclipError


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets[i, j] * log_softmax(logits)[i, j]."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class ClipInfoNCELoss(ClipLoss):
    """Symmetric CLIP InfoNCE: open_clip's `ClipLoss`, with the hemaclip call signature.

    Statement masks are accepted and ignored so all contrastive losses are interchangeable.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
        )

    def forward(  # type: ignore[override]
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, **_masks: Tensor | None
    ) -> Tensor:
        return super().forward(image_features, text_features, logit_scale)


class _GatheredContrastiveLoss(nn.Module):
    """Shared gathering of all ranks' features for the losses that are not open_clip's."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def gather(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(row images, row texts, all images, all texts) for this rank's loss."""
        if self.world_size <= 1:
            return image_features, text_features, image_features, text_features
        all_img, all_txt = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        if self.local_loss:
            return image_features, text_features, all_img, all_txt
        return all_img, all_txt, all_img, all_txt


class SoftTargetLoss(_GatheredContrastiveLoss):
    """WBC-CLIP soft-target loss: near-duplicate pairs are not treated as negatives.

    Targets Y = softmax(target_scale * (S_img + S_txt) / 2) row-wise, with S_img / S_txt the
    image-image / text-text cosine similarities (detached: targets are not optimised). Logits are
    logit_scale * I·Tᵀ; the loss is soft cross-entropy image→text and text→image, averaged (the pair
    similarity matrix is symmetric, so one Y serves both directions). `target_scale` is τ_t: it
    multiplies the similarities, so larger = sharper targets (→ InfoNCE as it grows).
    """

    def __init__(
        self,
        target_scale: float = 1.0 / 0.07,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        self.target_scale = target_scale

    def targets(self, row_img: Tensor, row_txt: Tensor, all_img: Tensor, all_txt: Tensor) -> Tensor:
        """Soft target distribution for each row (rows sum to 1)."""
        with torch.no_grad():
            sims = (row_img @ all_img.T + row_txt @ all_txt.T) / 2
            return F.softmax(self.target_scale * sims.float(), dim=-1)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, **_masks: Tensor | None) -> Tensor:
        row_img, row_txt, all_img, all_txt = self.gather(image_features, text_features)
        targets = self.targets(row_img, row_txt, all_img, all_txt)
        logits_per_image = logit_scale * row_img @ all_txt.T
        logits_per_text = logit_scale * row_txt @ all_img.T
        return (soft_cross_entropy(logits_per_image, targets) + soft_cross_entropy(logits_per_text, targets)) / 2


def _masked_soft_ce(logits: Tensor, positive: Tensor, known: Tensor) -> Tensor:
    logits = logits.masked_fill(~known, float("-inf"))
    targets = positive.float() / positive.float().sum(dim=1, keepdim=True).clamp_min(1)
    log_probs = F.log_softmax(logits, dim=-1).masked_fill(~known, 0.0)
    has_positive = positive.any(dim=1)
    return -(targets * log_probs).sum(dim=-1)[has_positive].mean()


class MultiPositiveLoss(_GatheredContrastiveLoss):
    """Statement-aware InfoNCE: every image a sentence is true of is a positive of that sentence.

    `positive[i, j]`: text j is true of image i; `known[i, j]` False leaves the pair out of both softmaxes
    (e.g. an attribute statement about an image without attribute labels). The masks cover the whole
    (gathered) batch. Target = uniform over the positives; cross-entropy image->text and text->image,
    averaged. With `positive` the identity this is InfoNCE.
    """

    def __init__(self, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(local_loss=False, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        positive: Tensor | None = None,
        known: Tensor | None = None,
    ) -> Tensor:
        if positive is None:
            raise ValueError("MultiPositiveLoss needs the positive mask [N_images, N_texts] of the whole batch")
        _, _, all_img, all_txt = self.gather(image_features, text_features)
        positive = positive.to(all_img.device).bool()
        known = (torch.ones_like(positive) if known is None else known.to(all_img.device).bool()) | positive
        logits = logit_scale * all_img @ all_txt.T
        return (_masked_soft_ce(logits, positive, known) + _masked_soft_ce(logits.T, positive.T, known.T)) / 2


# Contrastive losses by name (`build_loss`); all share the call signature above.
LOSSES: dict[str, type[nn.Module]] = {
    "clip": ClipInfoNCELoss,
    "soft": SoftTargetLoss,
    "multipos": MultiPositiveLoss,
}


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Contrastive loss by name ("clip", "soft", "multipos") with its options (rank, world_size, ...)."""
    if name not in LOSSES:
        raise HemaclipError(f"unknown loss '{name}' (known: {', '.join(LOSSES)})")
    cls = LOSSES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise HemaclipError(f"loss '{name}' has no option(s) {', '.join(unknown)} (options: {', '.join(sorted(accepted))})")
    return cls(**kwargs)


def _masked_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over labelled rows (label -1 = missing); 0 with the graph kept if none are labelled."""
    labels = labels.to(device=logits.device, dtype=torch.long)
    if bool((labels >= 0).any()):
        return F.cross_entropy(logits, labels, ignore_index=-1)
    return logits.sum() * 0.0


TERMS = ("contrastive", "attribute_heads", "class_head")  # the named loss terms a training run logs


def aux_supervised_loss(
    outputs: Mapping[str, Any],
    attribute_labels: Tensor | Mapping[str, Tensor] | None = None,
    class_labels: Tensor | None = None,
    attribute_weight: float = 1.0,
    class_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The weighted head losses as named terms: ``attribute_heads`` = attribute_weight * Σ_attributes CE,
    ``class_head`` = class_weight * CE (a term is absent when its labels are None or its weight is 0).

    `outputs` is `DualEncoder.forward`'s dict. `attribute_labels` is a dict name -> [B] or a [B, A]
    LongTensor in the model's attribute order (value indices); -1 marks a missing label everywhere.
    The trainer adds the terms in this order (their sum is the supervised loss).
    """
    attribute_logits: Mapping[str, Tensor] | None = outputs.get("attribute_logits")
    class_logits: Tensor | None = outputs.get("class_logits")
    if attribute_logits is None or class_logits is None:
        raise HemaclipError("aux_supervised_loss needs a model built with aux_heads=true")
    terms: dict[str, Tensor] = {}
    if attribute_labels is not None and attribute_weight:
        if isinstance(attribute_labels, Tensor):
            if attribute_labels.shape[-1] != len(attribute_logits):
                raise ValueError(
                    f"attribute_labels has {attribute_labels.shape[-1]} columns, model has {len(attribute_logits)} heads"
                )
            attribute_labels = {name: attribute_labels[:, i] for i, name in enumerate(attribute_logits)}
        total = class_logits.new_zeros(())
        for name, labels in attribute_labels.items():
            total = total + attribute_weight * _masked_ce(attribute_logits[name], labels)
        terms["attribute_heads"] = total
    if class_labels is not None and class_weight:
        terms["class_head"] = class_weight * _masked_ce(class_logits, class_labels)
    return terms
