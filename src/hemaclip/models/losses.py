"""Contrastive losses (InfoNCE, WBC-CLIP soft targets, multi-positive) and the auxiliary head loss.

Every contrastive loss is called as `loss(image_features, text_features, logit_scale, group_ids=None)`
with L2-normalised features, and supports data-parallel training: with `world_size > 1` features
(and group ids) are gathered from all ranks with open_clip's `gather_features`. `local_loss=True`
scores only this rank's rows against all columns (memory O(B·N) instead of O(N²));
`gather_with_grad=True` back-propagates through the gather (recommended with `local_loss`).
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

    `group_ids` is accepted and ignored so all contrastive losses are interchangeable.
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
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, group_ids: Tensor | None = None, **_masks: Tensor
    ) -> Tensor:
        return super().forward(image_features, text_features, logit_scale)


class _GatheredContrastiveLoss(nn.Module):
    """Shared gathering for losses that need all-rank features *and* per-item group ids."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def _gather_ids(self, ids: Tensor) -> Tensor:
        """All ranks' ids (integer, no gradient; every rank must hold the same batch size)."""
        parts = [torch.empty_like(ids) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, ids.contiguous())
        return torch.cat(parts)

    def gather(
        self, image_features: Tensor, text_features: Tensor, ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """(row images, row texts, all images, all texts, row ids, all ids) for this rank's loss."""
        if self.world_size <= 1:
            return image_features, text_features, image_features, text_features, ids, ids
        all_img, all_txt = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        all_ids = self._gather_ids(ids) if ids is not None else None
        if self.local_loss:
            return image_features, text_features, all_img, all_txt, ids, all_ids
        return all_img, all_txt, all_img, all_txt, all_ids, all_ids


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

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, group_ids: Tensor | None = None, **_masks: Tensor
    ) -> Tensor:
        row_img, row_txt, all_img, all_txt, _, _ = self.gather(image_features, text_features)
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
    """Label-aware InfoNCE: items sharing a group id (same class or attribute set) are all positives.

    Target distribution = uniform over positives; cross-entropy image→text and text→image, averaged.
    Negative ids mean "no group" (positive only with itself). With all-distinct groups this is InfoNCE.
    """

    def _masked(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, positive: Tensor, known: Tensor | None
    ) -> Tensor:
        if self.local_loss:
            raise ValueError("statement masks need local_loss=False")
        _, _, all_img, all_txt, _, _ = self.gather(image_features, text_features)
        positive = positive.to(all_img.device).bool()
        known = (torch.ones_like(positive) if known is None else known.to(all_img.device).bool()) | positive
        logits = logit_scale * all_img @ all_txt.T
        return (_masked_soft_ce(logits, positive, known) + _masked_soft_ce(logits.T, positive.T, known.T)) / 2

    def _unique_negatives(self, group_ids: Tensor) -> Tensor:
        index = torch.arange(group_ids.numel(), device=group_ids.device) + self.rank * group_ids.numel()
        return torch.where(group_ids < 0, -1 - index, group_ids)

    def targets(self, row_ids: Tensor, all_ids: Tensor) -> Tensor:
        positives = (row_ids[:, None] == all_ids[None, :]).float()
        return positives / positives.sum(dim=1, keepdim=True)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        group_ids: Tensor | None = None,
        positive: Tensor | None = None,
        known: Tensor | None = None,
    ) -> Tensor:
        """Positives from `group_ids`, or from explicit global masks [N_images, N_texts].

        `positive[i, j]`: text j is true of image i; `known[i, j]` False leaves the pair out of both
        softmaxes (e.g. an attribute statement about an image without attribute labels). Masks
        cover the whole (gathered) batch; with them `local_loss` is not supported.
        """
        if positive is not None:
            return self._masked(image_features, text_features, logit_scale, positive, known)
        if group_ids is None:
            raise ValueError("MultiPositiveLoss needs group_ids (one integer per pair) or a positive mask")
        ids = self._unique_negatives(group_ids.to(device=image_features.device, dtype=torch.long).flatten())
        row_img, row_txt, all_img, all_txt, row_ids, all_ids = self.gather(image_features, text_features, ids)
        assert row_ids is not None and all_ids is not None
        targets = self.targets(row_ids, all_ids)
        logits_per_image = logit_scale * row_img @ all_txt.T
        logits_per_text = logit_scale * row_txt @ all_img.T
        return (soft_cross_entropy(logits_per_image, targets) + soft_cross_entropy(logits_per_text, targets)) / 2


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


def aux_supervised_loss(
    outputs: Mapping[str, Any],
    attribute_labels: Tensor | Mapping[str, Tensor] | None = None,
    class_labels: Tensor | None = None,
    attribute_weight: float = 1.0,
    class_weight: float = 1.0,
) -> Tensor:
    """attribute_weight * Σ_attributes CE + class_weight * CE on the auxiliary heads.

    `outputs` is `DualEncoder.forward`'s dict. `attribute_labels` is a dict name -> [B] or a [B, A]
    LongTensor in the model's attribute order (value indices); -1 marks a missing label everywhere.
    """
    attribute_logits: Mapping[str, Tensor] | None = outputs.get("attribute_logits")
    class_logits: Tensor | None = outputs.get("class_logits")
    if attribute_logits is None or class_logits is None:
        raise HemaclipError("aux_supervised_loss needs a model built with aux_heads=true")
    total = class_logits.new_zeros(())
    if attribute_labels is not None and attribute_weight:
        if isinstance(attribute_labels, Tensor):
            if attribute_labels.shape[-1] != len(attribute_logits):
                raise ValueError(
                    f"attribute_labels has {attribute_labels.shape[-1]} columns, model has {len(attribute_logits)} heads"
                )
            attribute_labels = {name: attribute_labels[:, i] for i, name in enumerate(attribute_logits)}
        for name, labels in attribute_labels.items():
            total = total + attribute_weight * _masked_ce(attribute_logits[name], labels)
    if class_labels is not None and class_weight:
        total = total + class_weight * _masked_ce(class_logits, class_labels)
    return total
