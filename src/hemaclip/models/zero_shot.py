"""Zero-shot classifiers from text prompts (open_clip's `build_zero_shot_classifier`, for hemaclip towers).

A class is represented by the normalised mean of the normalised embeddings of all its prompts
(a prompt ensemble: synonyms x templates), so no single wording decides the prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from hemaclip.errors import DataError
from hemaclip.models.modes import eval_mode
from hemaclip.models.text_cache import PooledTextCache

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

_CHUNK = 8192


@torch.no_grad()
def build_zero_shot_classifier(
    model: torch.nn.Module, prompts: Mapping[str, Sequence[str]], text_cache: PooledTextCache | None = None
) -> torch.Tensor:
    """Weights [num_classes, embed_dim]: one normalised prompt-ensemble embedding per class, in `prompts` order."""
    cache = text_cache or PooledTextCache(model.text)
    names = list(prompts)
    flat = [text for name in names for text in prompts[name]]
    if any(not prompts[name] for name in names):
        empty = [name for name in names if not prompts[name]]
        raise ValueError(f"no prompts for class(es) {', '.join(empty)}")
    with eval_mode(model):
        device = next(model.parameters()).device
        embedded = model.encode_text(cache.get(flat).to(device), normalize=True)
    weights, start = [], 0
    for name in names:
        count = len(prompts[name])
        mean = embedded[start : start + count].mean(dim=0)
        weights.append(mean / mean.norm().clamp_min(1e-12))
        start += count
    return torch.stack(weights)


def class_embeddings(
    model: DualEncoder, prompts: Mapping[str, Sequence[str]], text_cache: PooledTextCache | None = None
) -> np.ndarray:
    """Normalised prompt-ensemble embeddings [C, D] float32, one per key of `prompts`, in its order."""
    weights = build_zero_shot_classifier(model, prompts, text_cache if text_cache is not None else PooledTextCache(model.text))
    return weights.detach().float().cpu().numpy()


def check_same_width(features: np.ndarray, text_embeddings: np.ndarray) -> None:
    """Image features and text embeddings must come from the same model (external features cannot)."""
    if features.ndim != 2 or features.shape[1] != text_embeddings.shape[1]:
        raise DataError(
            f"image features of shape {tuple(features.shape)} do not match the text embedding width "
            f"{text_embeddings.shape[1]}; text-based tasks need features from this model's own image tower"
        )


def scores_against(model: DualEncoder, features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """logit_scale x cosine of normalised `features` [N, D] against normalised `weights` [C, D].

    The one zero-shot scoring of hemaclip: training-time validation, `evaluate`, `describe` and
    robustness all read classes and attributes through it, so they agree on every prediction.
    """
    features = np.asarray(features, dtype=np.float32)
    check_same_width(features, weights)
    with torch.no_grad():
        scale = np.float32(float(model.get_logit_scale()))
    out = np.empty((len(features), len(weights)), dtype=np.float32)
    for start in range(0, len(features), _CHUNK):
        out[start : start + _CHUNK] = scale * (features[start : start + _CHUNK] @ weights.T)
    return out


def zero_shot_scores(
    model: DualEncoder,
    features: np.ndarray,
    prompts: Mapping[str, Sequence[str]],
    text_cache: PooledTextCache | None = None,
) -> np.ndarray:
    """Logits [N, C] (logit_scale x cosine with the prompt-ensemble classifier), columns in `prompts` order.

    `features` must be L2-normalised image features of `model`.
    """
    return scores_against(model, features, class_embeddings(model, prompts, text_cache))
