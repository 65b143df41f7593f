"""ONNX export of the encoders for serving without PyTorch.

Writes, into `out_dir`:
- image_encoder.onnx: images [B,3,H,W] (normalised) -> image_features [B,D] (L2-normalised),
  plus class_logits and attr__<name> logits when the model has auxiliary heads;
- text_encoder.onnx: input_ids, attention_mask [B,L] -> text_features [B,D] (L2-normalised);
- text_projection.onnx: pooled [B,384] (cached `embed_sentences` output) -> text_features;
- export_meta.json: config, vocabularies, normalisation and the input/output names.
Needs the optional packages `onnx` (and `onnxruntime` to run the files).
"""

from __future__ import annotations

import json

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hemaclip.errors import HemaclipError
from hemaclip.models.model import DualEncoder
from hemaclip.models.modes import eval_mode

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
PROJECTION_FILE = "text_projection.onnx"
META_FILE = "export_meta.json"


class _ImageEncoder(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        embeds = self.model.encode_image(images, normalize=False)
        attrs, classes = self.model.aux_logits(embeds)
        out = [F.normalize(embeds, dim=-1)]
        if attrs is not None and classes is not None:
            out += [classes, *attrs.values()]
        return tuple(out)


class _TextEncoder(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})


class _TextProjection(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pooled: Tensor) -> Tensor:
        return self.model.encode_text_features(pooled)


def image_output_names(model: DualEncoder) -> list[str]:
    """Output names of image_encoder.onnx, in order."""
    names = ["image_features"]
    if model.attribute_heads is not None:
        names += ["class_logits", *(f"attr__{a}" for a in model.attribute_heads)]
    return names


def _export(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str], opset: int
) -> None:
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in inputs + outputs}
    for name in ("input_ids", "attention_mask"):
        if name in axes:
            axes[name] = {0: "batch", 1: "tokens"}
    # The TorchScript exporter (dynamo=False) needs no onnxscript and handles HF BERT reliably.
    # Its tracer warnings concern shape checks that are constant for these graphs; keep them quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


def export_onnx(model: DualEncoder, out_dir: str | Path, opset: int = 17) -> dict[str, Path]:
    """Export the image encoder, text encoder and text projection; returns name -> written path."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to serialise)
    except ImportError as exc:
        raise HemaclipError("ONNX export needs the 'onnx' package (pip install 'hemaclip[export]')") from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attn = model.text.transformer.config._attn_implementation
    with eval_mode(model):
        try:
            # Eager attention traces to plain ops; SDPA's mask handling varies across transformers versions.
            model.text.transformer.set_attn_implementation("eager")
            device = model.logit_scale.device
            size = model.config.image_size
            images = torch.zeros(2, 3, size, size, device=device)
            tokens = model.tokenize(["a round cell", "a big irregular cell with a segmented nucleus"])
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            pooled = torch.zeros(2, model.text.width, device=device)
            paths = {"image": out / IMAGE_FILE, "text": out / TEXT_FILE, "text_projection": out / PROJECTION_FILE}
            with torch.no_grad():
                _export(_ImageEncoder(model), (images,), paths["image"], ["images"], image_output_names(model), opset)
                _export(
                    _TextEncoder(model),
                    (ids, mask),
                    paths["text"],
                    ["input_ids", "attention_mask"],
                    ["text_features"],
                    opset,
                )
                _export(_TextProjection(model), (pooled,), paths["text_projection"], ["pooled"], ["text_features"], opset)
        finally:
            model.text.transformer.set_attn_implementation(attn)
    meta: dict[str, Any] = {
        "model_config": model.config.to_dict(),
        "vocabularies": model.vocabularies(),
        "image_size": model.config.image_size,
        "image_mean": list(model.config.image_mean),
        "image_std": list(model.config.image_std),
        "text_max_length": model.config.text_max_length,
        "files": {k: p.name for k, p in paths.items()},
        "image_outputs": image_output_names(model),
        "opset": opset,
    }
    paths["meta"] = out / META_FILE
    paths["meta"].write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return paths


@torch.no_grad()
def verify_onnx(model: DualEncoder, paths: dict[str, Path], batch: int = 3, seed: int = 0) -> dict[str, float]:
    """Largest absolute difference between onnxruntime and PyTorch outputs, per exported file.

    Uses a batch size different from the export example, so the dynamic batch axis is exercised.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise HemaclipError("checking the ONNX files needs 'onnxruntime' (pip install 'hemaclip[export]')") from exc
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    texts = ["a cell", "a big round cell with purple granules", "segmented nucleus, frosted cytoplasm"][:batch]
    tokens = model.tokenize(texts)
    pooled = model.embed_sentences(texts)
    embeds = model.encode_image(images, normalize=False)
    attrs, classes = model.aux_logits(embeds)
    expected_image = [F.normalize(embeds, dim=-1)] + ([classes, *attrs.values()] if attrs is not None else [])
    got_image = ort.InferenceSession(str(paths["image"])).run(None, {"images": images.numpy()})
    got_text = ort.InferenceSession(str(paths["text"])).run(
        None, {"input_ids": tokens["input_ids"].numpy(), "attention_mask": tokens["attention_mask"].numpy()}
    )[0]
    got_projection = ort.InferenceSession(str(paths["text_projection"])).run(None, {"pooled": pooled.numpy()})[0]
    return {
        "image": max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got_image, expected_image, strict=True)),
        "text": float(np.abs(got_text - model.encode_text(tokens).numpy()).max()),
        "text_projection": float(np.abs(got_projection - model.encode_text_features(pooled).numpy()).max()),
    }
