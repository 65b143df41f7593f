"""ONNX export: outputs of onnxruntime match PyTorch within 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export test needs 'onnx' (pip install 'hemaclip[export]')")
ort = pytest.importorskip("onnxruntime", reason="ONNX export test needs 'onnxruntime' (pip install 'hemaclip[export]')")

from hemaclip.models import create_model  # noqa: E402
from hemaclip.models.export import export_onnx, image_output_names, verify_onnx  # noqa: E402


def test_onnx_matches_pytorch(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2-128", image_size=64, embed_dim=64).eval()
    paths = export_onnx(model, tmp_path)
    meta = json.loads(paths["meta"].read_text())
    assert meta["files"]["image"] == "image_encoder.onnx" and meta["image_size"] == 64

    images = torch.randn(3, 3, 64, 64)  # batch differs from the export example (dynamic axis)
    texts = ["a cell", "a big round cell with purple granules", "segmented nucleus, frosted cytoplasm"]
    tokens = model.tokenize(texts)
    pooled = model.embed_sentences(texts)
    with torch.no_grad():
        embeds = model.encode_image(images, normalize=False)
        attrs, classes = model.aux_logits(embeds)
        expected_image = [torch.nn.functional.normalize(embeds, dim=-1), classes, *attrs.values()]
        expected_text = model.encode_text(tokens)
        expected_proj = model.encode_text_features(pooled)

    got = ort.InferenceSession(str(paths["image"])).run(None, {"images": images.numpy()})
    assert len(got) == len(image_output_names(model)) == len(expected_image)
    for g, e in zip(got, expected_image):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4)
    got_text = ort.InferenceSession(str(paths["text"])).run(
        None, {"input_ids": tokens["input_ids"].numpy(), "attention_mask": tokens["attention_mask"].numpy()}
    )[0]
    np.testing.assert_allclose(got_text, expected_text.numpy(), atol=1e-4)
    got_proj = ort.InferenceSession(str(paths["text_projection"])).run(None, {"pooled": pooled.numpy()})[0]
    np.testing.assert_allclose(got_proj, expected_proj.numpy(), atol=1e-4)
    assert model.text.transformer.config._attn_implementation == "sdpa"  # restored after export
    differences = verify_onnx(model, paths)
    assert set(differences) == {"image", "text", "text_projection"}
    assert max(differences.values()) < 1e-4
