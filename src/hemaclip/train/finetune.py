"""Fine-tuning the image tower on a new lab's few labelled cells (the published onboarding recipe, on a CPU).

Why: a read-out on frozen features can only re-weigh what the tower already sees; another lab's stain and camera
change *what* it sees. Chossegros et al. (2024) fine-tune the whole network on the target lab's few cells. Here the
image tower and the class head are trained for a fixed number of steps, each batch half the lab's labelled cells and
half reference cells of the training lab (so the model keeps what it knew), with the training augmentation plus
blur and JPEG, cross-entropy on the class head. Text tower, projection of text and attribute heads stay as they are.
About two minutes for 150 steps on 2 CPU cores (bench/results/lab_finetune.json).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hemaclip.errors import HemaclipError

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = ["FineTuneSettings", "fine_tune_image_tower"]


@dataclass(frozen=True)
class FineTuneSettings:
    """Steps, batch halves and optimiser of a lab fine-tune (fixed before any lab was scored)."""

    steps: int = 150
    lab_per_batch: int = 16
    reference_per_batch: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    blur_p: float = 0.2
    jpeg_p: float = 0.2
    balance_lab_classes: bool = False  # draw the lab's cells with each class equally likely (not the default: see bench.lab_balance)


def fine_tune_image_tower(model: DualEncoder, lab_arrays: Sequence[np.ndarray], lab_targets: Sequence[int],
                          reference_arrays: Sequence[np.ndarray], reference_targets: Sequence[int],
                          settings: FineTuneSettings = FineTuneSettings(), seed: int = 0) -> DualEncoder:
    """A copy of `model` whose image tower and class head were trained on the lab's cells (uint8 arrays at the
    model's input size, targets as indices of the model's classes) mixed with reference cells; in eval mode."""
    import torch
    import torch.nn.functional as F

    from hemaclip.data.preprocess import preprocess_for
    from hemaclip.data.transforms import AugmentConfig

    if getattr(model, "class_head", None) is None:
        raise HemaclipError("fine-tuning a lab needs a model with a class head (the shipped model has one)")
    if len(lab_arrays) == 0 or len(lab_arrays) != len(lab_targets):
        raise HemaclipError(f"fine-tuning needs labelled cells: {len(lab_arrays)} images, {len(lab_targets)} labels")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tuned = copy.deepcopy(model).train()
    preprocess = preprocess_for(tuned)
    transform = preprocess.train_transform(AugmentConfig(blur_p=settings.blur_p, jpeg_p=settings.jpeg_p))
    trained = list(tuned.visual.parameters()) + list(tuned.class_head.parameters())
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
    lab_p = _class_balanced_weights(lab_targets) if settings.balance_lab_classes else None
    for _step in range(int(settings.steps)):
        a = (rng.integers(0, len(lab_arrays), settings.lab_per_batch) if lab_p is None  # the default's draws, as measured
             else rng.choice(len(lab_arrays), settings.lab_per_batch, p=lab_p))
        b = rng.integers(0, len(reference_arrays), settings.reference_per_batch) if len(reference_arrays) else np.array([], int)
        arrays = [lab_arrays[i] for i in a] + [reference_arrays[i] for i in b]
        targets = torch.tensor([int(lab_targets[i]) for i in a] + [int(reference_targets[i]) for i in b])
        logits = tuned.class_head(tuned.encode_image(preprocess.batch(arrays, transform), normalize=False))
        loss = F.cross_entropy(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    return tuned.eval()


def _class_balanced_weights(targets: Sequence[int]) -> np.ndarray:
    """Sampling probabilities that give each class the same total weight (a rare class's few cells drawn more often)."""
    targets = np.asarray(targets)
    counts = {t: int((targets == t).sum()) for t in set(targets.tolist())}
    weights = np.array([1.0 / counts[t] for t in targets.tolist()])
    return weights / weights.sum()
