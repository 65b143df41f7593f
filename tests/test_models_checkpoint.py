"""Checkpoint round trip (full and fp16) and every CheckpointError case."""

from __future__ import annotations

import pytest
import torch

from hemaclip import CHECKPOINT_FORMAT
from hemaclip.errors import CheckpointError
from hemaclip.models import create_model
from hemaclip.models.checkpoint import load_checkpoint, save_checkpoint

SENTENCES = ["a big round cell", "a small cell", "purple granules"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("resnet18-128", image_size=64, embed_dim=32, text_trainable_layers=1, class_names=["a", "b"])
    with torch.no_grad():  # move away from any init so a round trip cannot pass by accident
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        m.logit_scale.fill_(2.5)
    return m.eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, extra={"epoch": 3, "metrics": {"acc": 0.5}, "hist": [1, 2]})
    return path


def _outputs(m):
    torch.manual_seed(5)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        return m(images, m.tokenize(SENTENCES))


def test_round_trip_equal_outputs(model, saved) -> None:
    loaded, meta = load_checkpoint(saved)
    a, b = _outputs(model), _outputs(loaded)
    for key in ("image_features", "text_features", "logit_scale", "class_logits"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert meta["extra"] == {"epoch": 3, "metrics": {"acc": 0.5}, "hist": [1, 2]}
    assert meta["format"] == CHECKPOINT_FORMAT and meta["vocabularies"]["classes"] == ["a", "b"]
    assert loaded.config == model.config and not loaded.training
    # frozen text weights (embeddings + layers 0-4) are not stored; the trainable top layer is
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert not any(k.startswith(("text.transformer.embeddings.", "text.transformer.encoder.layer.0.")) for k in state)
    assert any(k.startswith("text.transformer.encoder.layer.5.") for k in state)
    assert [p.name for p in saved.parent.iterdir()] == ["model.pt"]  # no temp files left behind


def test_half_checkpoint(model, tmp_path) -> None:
    full = save_checkpoint(tmp_path / "full.pt", model)
    half = save_checkpoint(tmp_path / "half.pt", model, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, meta = load_checkpoint(half)
    assert meta["half"] and loaded.logit_scale.dtype == torch.float32
    a, b = _outputs(model), _outputs(loaded)
    assert torch.allclose(a["image_features"], b["image_features"], atol=2e-2)


def test_extra_must_be_plain(model, tmp_path) -> None:
    with pytest.raises(TypeError, match="extra.when"):
        save_checkpoint(tmp_path / "x.pt", model, extra={"when": object()})
    assert not list(tmp_path.iterdir())


def _rewrite(saved, tmp_path, name, **changes):
    payload = torch.load(saved, weights_only=True)
    for key, value in changes.items():
        if callable(value):
            value(payload)
        else:
            payload[key] = value
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_error_missing_file(tmp_path) -> None:
    assert "not found" in _error(tmp_path / "nothing.pt")


def test_error_corrupt_or_foreign_file(tmp_path, saved) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    assert "not a readable PyTorch checkpoint" in _error(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:5000])
    assert "not a readable PyTorch checkpoint" in _error(truncated)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    assert "not a hemaclip checkpoint" in _error(tensor_file)


def test_error_format_mismatch(tmp_path, saved) -> None:
    message = _error(_rewrite(saved, tmp_path, "future.pt", format=CHECKPOINT_FORMAT + 1))
    assert f"format {CHECKPOINT_FORMAT + 1}" in message and f"reads format {CHECKPOINT_FORMAT}" in message


def test_error_config_cannot_build(tmp_path, saved) -> None:
    def bad_tower(payload):
        payload["model_config"]["image_tower"] = "no_such_net_v9"

    assert "cannot build the model" in _error(_rewrite(saved, tmp_path, "badcfg.pt", x=bad_tower))

    def unknown_key(payload):
        payload["model_config"]["wings"] = 2

    assert "unknown model config key" in _error(_rewrite(saved, tmp_path, "badkey.pt", x=unknown_key))


def test_error_state_dict_mismatch(tmp_path, saved) -> None:
    def drop_and_add(payload):
        payload["state_dict"].pop("text_projection.weight")
        payload["state_dict"]["bogus.weight"] = torch.zeros(1)

    message = _error(_rewrite(saved, tmp_path, "mismatch.pt", x=drop_and_add))
    assert "missing 1 (text_projection.weight)" in message and "unexpected 1 (bogus.weight)" in message

    def wrong_shape(payload):
        payload["state_dict"]["logit_scale"] = torch.zeros(2)

    assert "shape mismatch" in _error(_rewrite(saved, tmp_path, "shape.pt", x=wrong_shape))


def test_error_changed_text_package(tmp_path, saved) -> None:
    message = _error(_rewrite(saved, tmp_path, "fp.pt", text_frozen_fingerprint=[1.0, 2.0]))
    assert "frozen text weights" in message
