"""Text-tower freezing/pooling and offline image weights (package files and local state dicts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hemaclip.errors import CheckpointError, HemaclipError
from hemaclip.models import create_model
from hemaclip.models.image import _load_by_position, build_trunk, package_weights_file, read_state_dict
from hemaclip.models.text import resolve_text_source

SENTENCES = ["a big round cell", "a small cell with a round nucleus and purple granules"]


def _text_layer_grads(model) -> dict[str, bool]:
    return {name: p.grad is not None for name, p in model.text.transformer.named_parameters()}


def test_text_tower_frozen_when_zero_layers() -> None:
    model = create_model("resnet18-128", image_size=64, embed_dim=32).train()
    assert not any(p.requires_grad for p in model.text.transformer.parameters())
    out = model(torch.randn(2, 3, 64, 64), model.tokenize(SENTENCES))
    (out["image_features"] * out["text_features"]).sum().mul(out["logit_scale"]).backward()
    assert not any(_text_layer_grads(model).values())
    assert model.text_projection.weight.grad is not None
    assert model.visual.head.weight.grad is not None and model.logit_scale.grad is not None
    assert not model.text.transformer.training  # frozen tower: no dropout even in train mode


def test_text_tower_top_layers_trainable() -> None:
    model = create_model("resnet18-128", image_size=64, embed_dim=32, text_trainable_layers=2).train()
    out = model(torch.randn(2, 3, 64, 64), model.tokenize(SENTENCES))
    out["text_features"].sum().backward()
    grads = _text_layer_grads(model)
    for name, has_grad in grads.items():
        top = name.startswith(("encoder.layer.4.", "encoder.layer.5."))
        assert has_grad == top, name
        assert model.text.transformer.get_parameter(name).requires_grad == top
    layers = model.text.transformer.encoder.layer
    assert layers[5].training and not layers[3].training and not model.text.transformer.embeddings.training
    with pytest.raises(HemaclipError, match="text_trainable_layers"):
        create_model("resnet18-128", image_size=64, text_trainable_layers=7)


def test_embed_sentences_matches_sentence_transformers() -> None:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    model = create_model("resnet18-128", image_size=64).train()  # frozen tower ignores train mode
    ours = model.embed_sentences(SENTENCES)
    again = model.text(**model.tokenize(SENTENCES)).detach()
    reference = st.SentenceTransformer(str(resolve_text_source(model.config.text_tower)), device="cpu")
    ref = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    assert ours.shape == (2, 384)
    assert torch.allclose(ours, again, atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(ours, dim=-1), ref, atol=1e-5)


def test_efficientnet_lite0_package_weights() -> None:
    path = package_weights_file("efficientnet-lite0")
    shipped = list(read_state_dict(path).values())
    random_trunk, _ = build_trunk("timm", "tf_efficientnet_lite0", 64)
    trunk, features = build_trunk("timm", "tf_efficientnet_lite0", 64, pretrained="package:efficientnet-lite0")
    assert features == 1280
    assert torch.equal(trunk.conv_stem.weight, shipped[0])
    assert torch.equal(trunk.bn2.running_var, shipped[-4])  # last tensor before the dropped classifier
    assert not torch.equal(trunk.conv_stem.weight, random_trunk.conv_stem.weight)


def test_mobilenetv2_package_weights() -> None:
    shipped = read_state_dict(package_weights_file("mobilenetv2"))
    random_trunk, _ = build_trunk("torchvision", "mobilenet_v2", 64)
    trunk, features = build_trunk("torchvision", "mobilenet_v2", 64, pretrained="package:mobilenetv2")
    assert features == 1280
    assert torch.equal(trunk.features[0][0].weight, shipped["features.0.0.weight"])
    assert not torch.equal(trunk.features[0][0].weight, random_trunk.features[0][0].weight)
    with pytest.raises(HemaclipError, match="not timm 'resnet18'"):
        build_trunk("timm", "resnet18", 64, pretrained="package:mobilenetv2")


def test_position_copy_rejects_shape_mismatch() -> None:
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    good = {f"w{i}": torch.randn_like(t) for i, t in enumerate(target.state_dict().values())}
    _load_by_position(target, good, "fake.pth")
    assert torch.equal(target[1].bias, good["w3"])
    bad = dict(good, w2=torch.randn(5, 4))
    with pytest.raises(CheckpointError, match="fake.pth: tensor #2 'w2'"):
        _load_by_position(target, bad, "fake.pth")
    with pytest.raises(CheckpointError, match="3 tensors"):
        _load_by_position(target, dict(list(good.items())[:3]), "fake.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_image_weights(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    source, _ = build_trunk("timm", "resnet18", 64)
    for p in source.parameters():
        nn.init.normal_(p)
    path = tmp_path / f"tower{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    model = create_model("resnet18-128", image_size=64, image_pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.visual.trunk.state_dict()[key], value), key


def test_local_image_weights_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing.pth: weights file not found"):
        build_trunk("timm", "resnet18", 64, pretrained=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pth: cannot read weights"):
        build_trunk("timm", "resnet18", 64, pretrained=str(garbage))
    other, _ = build_trunk("torchvision", "mobilenet_v2", 64)
    wrong = tmp_path / "mobilenet.pth"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(
        CheckpointError, match=r"mobilenet.pth: weights do not fit .*missing \d+ .*unexpected \d+"
    ) as info:
        build_trunk("timm", "resnet18", 64, pretrained=str(wrong))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["effnet-lite0-128", "resnet18-128", "mobilenetv2-128"])
def test_prepare_for_inference_folds_batchnorm_without_changing_outputs(name: str) -> None:
    from hemaclip.models.inference import image_outputs, prepare_for_inference

    model = create_model(name, image_size=64, embed_dim=32, image_pretrained=None).eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics, as a trained model has
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8).numpy()
    before = image_outputs(model, images, batch_size=2)
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.visual.trunk.modules())
    fast = prepare_for_inference(model)
    assert n_norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.visual.trunk.modules())
    assert not any(type(m).__name__ == "Conv2dSame" for m in fast.modules())  # static padding at 64 px
    after = image_outputs(fast, images, batch_size=2)
    assert torch.allclose(before["features"], after["features"], atol=1e-4)
    assert torch.allclose(before["class_logits"], after["class_logits"], atol=1e-3)


def test_fold_batchnorm_leaves_a_vit_alone() -> None:
    from hemaclip.models.inference import fold_batchnorm

    model = create_model("vit-tiny-128", image_size=64, embed_dim=32, image_pretrained=None)
    assert fold_batchnorm(model) == 0
