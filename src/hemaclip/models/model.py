"""The CLIP-style dual encoder with optional supervised heads on the image embedding."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hemaclip.errors import HemaclipError
from hemaclip.models.config import ModelConfig
from hemaclip.models.image import ImageTower
from hemaclip.models.text import TextTower


def _linear_proj(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=False)


def _mlp_proj(in_dim: int, out_dim: int) -> nn.Module:
    hidden = (in_dim + out_dim) // 2
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))


# Projection kinds (as in open_clip's HF text tower: bias-free linear, or a 2-layer GELU MLP).
PROJECTIONS: dict[str, Callable[[int, int], nn.Module]] = {"linear": _linear_proj, "mlp": _mlp_proj}


def build_projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Projection head from tower features to the joint embedding space."""
    if kind not in PROJECTIONS:
        raise HemaclipError(f"unknown proj_type '{kind}' (known: {', '.join(PROJECTIONS)})")
    return PROJECTIONS[kind](in_dim, out_dim)


TextInput = Tensor | Mapping[str, Tensor]


class DualEncoder(nn.Module):
    """Image and text towers projected to `embed_dim`, plus a learnable temperature.

    Text can be given as token ids (LongTensor, padding = pad id), a tokenizer dict with
    `input_ids`/`attention_mask`, or precomputed pooled features (float [N, text_width], e.g. from
    `embed_sentences`); all paths meet at `text_projection`.
    With `config.aux_heads`, one linear head per attribute and one class head read the
    *pre-normalisation* image embedding. Vocabularies are kept in `config`, so checkpoints carry them.
    """

    def __init__(self, config: ModelConfig, visual: ImageTower, text: TextTower) -> None:
        super().__init__()
        self.config = config
        self.visual = visual
        self.text = text
        self.text_projection = build_projection(config.proj_type, text.width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.init_logit_scale)))
        self.attribute_heads: nn.ModuleDict | None = None
        self.class_head: nn.Linear | None = None
        if config.aux_heads:
            self.attribute_heads = nn.ModuleDict(
                {name: nn.Linear(config.embed_dim, len(values)) for name, values in config.attributes.items()}
            )
            self.class_head = nn.Linear(config.embed_dim, len(config.class_names))

    # ---- vocabularies -------------------------------------------------

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        return self.config.attributes

    def vocabularies(self) -> dict[str, Any]:
        """Class names and attribute values in head order (plain lists, for checkpoints/exports)."""
        return {"classes": list(self.class_names), "attributes": {k: list(v) for k, v in self.attributes.items()}}

    # ---- encoders -----------------------------------------------------

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Images [N, 3, H, W] (normalised with config.image_mean/std) -> embeddings [N, embed_dim]."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def text_pooled(self, text: TextInput) -> Tensor:
        """Pooled text-tower features [N, text_width] from tokens, a tokenizer dict or features."""
        if isinstance(text, Mapping):
            return self.text(text["input_ids"], text.get("attention_mask"))
        if text.is_floating_point():
            if text.shape[-1] != self.text.width:
                raise ValueError(f"text features must have {self.text.width} channels, got {tuple(text.shape)}")
            return text
        return self.text(text)

    def encode_text_features(self, pooled: Tensor, normalize: bool = True) -> Tensor:
        """Project pooled (e.g. cached) text-tower features [N, text_width] -> [N, embed_dim]."""
        pooled = pooled.to(self.logit_scale.dtype)
        features = self.text_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: TextInput, normalize: bool = True) -> Tensor:
        """Token ids, a tokenizer dict, or pooled features -> text embeddings [N, embed_dim]."""
        return self.encode_text_features(self.text_pooled(text), normalize=normalize)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise with the text tower's tokenizer (`config.text_max_length`)."""
        return self.text.tokenize(texts)

    def embed_sentences(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Pooled text-tower features [N, text_width] for caching (see `TextTower.embed_sentences`)."""
        return self.text.embed_sentences(texts, batch_size=batch_size)

    # ---- heads --------------------------------------------------------

    def get_logit_scale(self) -> Tensor:
        """exp(logit_scale), clamped at config.max_logit_scale (CLIP's 100)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def aux_logits(self, image_embeds: Tensor) -> tuple[dict[str, Tensor] | None, Tensor | None]:
        """Attribute and class logits from un-normalised image embeddings (None when heads are off)."""
        if self.attribute_heads is None or self.class_head is None:
            return None, None
        attrs = {name: head(image_embeds) for name, head in self.attribute_heads.items()}
        return attrs, self.class_head(image_embeds)

    def forward(self, images: Tensor, text: TextInput) -> dict[str, Any]:
        """Normalised image/text features, the clamped logit scale, and aux logits (or None)."""
        image_embeds = self.encode_image(images, normalize=False)
        attribute_logits, class_logits = self.aux_logits(image_embeds)
        return {
            "image_features": F.normalize(image_embeds, dim=-1),
            "text_features": self.encode_text(text, normalize=True),
            "logit_scale": self.get_logit_scale(),
            "attribute_logits": attribute_logits,
            "class_logits": class_logits,
        }

    def text_frozen_keys(self) -> list[str]:
        """State-dict keys of text-tower weights that are exactly as shipped by the package."""
        prefixes = tuple(f"text.transformer.{p}" for p in self.text.frozen_prefixes())
        return [k for k in self.state_dict() if k.startswith(prefixes)]
