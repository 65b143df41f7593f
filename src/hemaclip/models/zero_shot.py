"""Zero-shot classifiers from text prompts (open_clip's `build_zero_shot_classifier`, for hemaclip towers).

A class is represented by the normalised mean of the normalised embeddings of all its prompts
(a prompt ensemble: synonyms x templates), so no single wording decides the prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from hemaclip.models.text_cache import PooledTextCache

Template = str | Callable[[str], str]


def build_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> dict[str, list[str]]:
    """Prompts per class from templates that are format strings with '{}' or callables."""
    return {name: [t(name) if callable(t) else t.format(name) for t in templates] for name in classnames}


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
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        embedded = model.encode_text(cache.get(flat).to(device), normalize=True)
    finally:
        model.train(was_training)
    weights, start = [], 0
    for name in names:
        count = len(prompts[name])
        mean = embedded[start : start + count].mean(dim=0)
        weights.append(mean / mean.norm().clamp_min(1e-12))
        start += count
    return torch.stack(weights)
