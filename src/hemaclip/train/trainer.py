"""The training loop: contrastive image-text alignment plus optional supervised attribute/class heads.

Design choices that matter to users:
- Exact resume. Every random draw of a step (batch order, sentence choice, augmentation) is seeded
  from (seed, epoch, step), and checkpoints hold model, optimizer, scheduler and position, so a run
  killed at any point and resumed reaches the same weights as one never stopped.
- Frozen-text speed. With a frozen text tower, every training sentence is embedded once and cached.
- One global batch. Under torchrun each rank takes a contiguous slice of the same global batch and
  contrastive features are gathered with gradients, so the loss equals the single-process one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hemaclip.data.datasets import CellRecord, load_dataset
from hemaclip.data.image_cache import decoded_images
from hemaclip.data.preprocess import preprocess_for
from hemaclip.errors import HemaclipError
from hemaclip.io import atomic_write, remove_stale_temps, write_json
from hemaclip.log import get_logger, run_log
from hemaclip.models import create_model
from hemaclip.models.checkpoint import load_checkpoint, save_checkpoint
from hemaclip.models.default import resolve_checkpoint
from hemaclip.models.losses import TERMS, aux_supervised_loss, build_loss
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.text.prompts import PromptSet, load_prompts
from hemaclip.train.config import TrainConfig
from hemaclip.train.seeds import step_seed
from hemaclip.train.distributed import DistInfo, barrier, cleanup, init_distributed, mean_over_ranks
from hemaclip.train.texts import build_text_bank, draw_texts, record_targets, statement_masks
from hemaclip.train.validate import validate

logger = get_logger(__name__)
STORAGE_SIZE = 192  # decoded-cache resolution: the bundled data's native size, crops are taken from it


def stratified_subset(records: list[CellRecord], limit: int | None, seed: int) -> list[CellRecord]:
    """At most `limit` records, keeping class proportions; deterministic for a seed."""
    if limit is None or len(records) <= limit:
        return records
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    by_label: dict[str, list[int]] = {}
    for index in order:
        by_label.setdefault(records[index].label, []).append(int(index))
    share = limit / len(records)
    chosen = [i for members in by_label.values() for i in members[: max(1, int(round(len(members) * share)))]]
    return [records[i] for i in sorted(chosen[:limit])]


def rank_share(local_labels: torch.Tensor, global_labels: torch.Tensor, world_size: int) -> float:
    """Weight turning this rank's mean loss over labelled rows into its part of the global-batch mean.

    Ranks hold different numbers of labelled rows (cells without attributes carry -1), so a plain
    average of per-rank means is not the global mean; DDP averages gradients over ranks, hence the
    factor `world_size`. Equals 1 in a single process whenever the batch has any labelled row.
    """
    total = int((global_labels >= 0).sum())
    return world_size * int((local_labels >= 0).sum()) / total if total else 0.0


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules declare exempt from weight decay.

    Every submodule with a ``no_weight_decay()`` method (timm's ViT: ``pos_embed``, ``cls_token``, ...)
    is asked, and its names are prefixed with the submodule's path, as open_clip's optimiser setup does.
    """
    names: set[str] = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names.update(f"{prefix}.{n}" if prefix else str(n) for n in declared())
    return names


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Backbone at `backbone_lr`, new layers at `lr`; no weight decay on norms, biases, the temperature
    and whatever a module declares in its ``no_weight_decay()`` (a ViT's position embedding and class token)."""
    exempt = no_weight_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.startswith(("visual.trunk.", "text."))
        no_decay = param.ndim <= 1 or name.endswith("logit_scale") or name in exempt
        groups.setdefault((backbone, no_decay), []).append(param)
    return [
        {"params": params, "lr": config.backbone_lr if backbone else config.lr, "weight_decay": 0.0 if no_decay else config.weight_decay}
        for (backbone, no_decay), params in groups.items()
    ]


@dataclass
class RunPaths:
    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    @property
    def history(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.out / "config.json"


def freeze_leading_image_parameters(model: nn.Module, fraction: float) -> list[nn.Module]:
    """Freeze the first `fraction` of the image trunk's parameter tensors (stem and early stages).

    On a CPU this skips the backward pass through the costly high-resolution layers of a
    pretrained tower. Returns the modules now wholly frozen, which must stay in eval mode so their
    batch-norm statistics stay as pretrained.
    """
    params = list(model.visual.trunk.named_parameters())
    count = int(round(len(params) * fraction))
    for _, param in params[:count]:
        param.requires_grad_(False)
    return [
        module
        for module in model.visual.trunk.modules()
        if any(True for _ in module.parameters(recurse=False)) and not any(p.requires_grad for p in module.parameters(recurse=False))
    ]


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "off" or (config.amp == "auto" and device.type != "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _append_history(paths: RunPaths, row: dict[str, Any]) -> None:
    """Rewrite metrics.jsonl atomically with the new row, dropping rows of epochs being redone after a resume."""
    rows = [json.loads(line) for line in paths.history.read_text().splitlines() if line.strip()] if paths.history.exists() else []
    rows = [r for r in rows if r["epoch"] < row["epoch"]] + [row]
    with atomic_write(paths.history) as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)


def _plot_history(paths: RunPaths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in paths.history.read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train loss (sum)")
    for name in TERMS:  # each named term, where the run has it (older runs logged only the sum)
        if all(f"train_loss_{name}" in r for r in rows):
            left.plot(epochs, [r[f"train_loss_{name}"] for r in rows], marker=".", linestyle="--", label=name.replace("_", " "))
    left.set_xlabel("epoch")
    left.set_title("training loss and its terms")
    left.legend()
    for key, label in (
        ("val_zs_class_macro_f1", "zero-shot class"),
        ("val_zs_attr_macro_f1", "zero-shot attributes (mean)"),
        ("val_head_attr_macro_f1", "attribute heads (mean)"),
        ("val_head_class_macro_f1", "class head"),
    ):
        if key in rows[0]:
            right.plot(epochs, [r[key] for r in rows], marker="o", label=label)
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_title("validation macro F1")
    right.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(paths.out / "curves.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def _select_score(metrics: dict[str, float], key: str | None = None) -> float:
    if key is not None:
        if key not in metrics:
            raise HemaclipError(f"select_metric '{key}' is not a validation metric (have: {', '.join(sorted(metrics))})")
        return float(metrics[key])
    keys = [k for k in ("val_zs_class_macro_f1", "val_zs_attr_macro_f1", "val_head_attr_macro_f1") if k in metrics]
    return float(np.mean([metrics[k] for k in keys])) if keys else -metrics.get("train_loss", 0.0)


def seen_only(records: Sequence[CellRecord], config: TrainConfig) -> list[CellRecord]:
    """`records` without the images of the config's held-out classes."""
    return [r for r in records if r.label not in config.holdout_classes]


def initial_model(config: TrainConfig, class_names: Sequence[str]) -> nn.Module:
    """The model a new run starts from: `config.model` freshly built, or `config.init_checkpoint`'s weights.

    Fine-tuning to another label set (e.g. the shipped 8-class model onto the 4 ALL classes) keeps every
    weight but the class head, which is rebuilt (seeded) for `class_names`.
    """
    if config.init_checkpoint is None:
        return create_model(config.model, class_names=tuple(class_names), **config.model_overrides)
    if config.model_overrides:
        raise HemaclipError("model_overrides cannot be combined with init_checkpoint (the checkpoint fixes the model)")
    path = resolve_checkpoint(None if config.init_checkpoint == "default" else config.init_checkpoint)
    model, _ = load_checkpoint(path)
    trained_on = sorted(set(config.holdout_classes) & set(model.class_names))
    if trained_on:
        raise HemaclipError(f"init_checkpoint {path} was trained on held-out class(es) {', '.join(trained_on)}: start from a model that never saw them")
    if tuple(model.class_names) != tuple(class_names):
        model.config = dataclasses.replace(model.config, class_names=tuple(class_names))
        if model.class_head is not None:
            torch.manual_seed(config.seed)
            model.class_head = nn.Linear(model.config.embed_dim, len(class_names))
    return model


def train(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    data_root: str | Path | None = None,
    progress: bool | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train a dual encoder as `config` says, writing checkpoints, history and curves to `out_dir`.

    `stop_after_steps` ends the run early after that many optimiser steps (used by the resume tests to
    simulate a kill). Returns the last validation metrics.
    """
    info = init_distributed(config.device)
    try:
        # One run log per run folder (run.log), written by the main process only.
        logged = run_log(out_dir, "train", keep_if="last.pt") if info.is_main else contextlib.nullcontext()
        with logged:
            return _train(config, RunPaths(Path(out_dir)), resume, data_root, info, progress, stop_after_steps)
    finally:
        cleanup(info)


def _train(
    config: TrainConfig,
    paths: RunPaths,
    resume: bool,
    data_root: str | Path | None,
    info: DistInfo,
    progress: bool | None,
    stop_after_steps: int | None,
) -> dict[str, Any]:
    if config.batch_size % info.world_size:
        raise HemaclipError(f"batch_size {config.batch_size} must be divisible by the number of processes {info.world_size}")
    if paths.out.exists() and paths.last.exists() and not resume:
        raise HemaclipError(f"{paths.out}: run folder already holds a checkpoint; pass --resume to continue or choose another --out")
    if resume and not paths.last.exists():
        raise HemaclipError(f"{paths.last}: nothing to resume from")
    paths.out.mkdir(parents=True, exist_ok=True)
    show = (sys.stderr.isatty() if progress is None else progress) and info.is_main
    torch.manual_seed(config.seed)

    # Data: the training split of `dataset`, the validation split of `val_dataset`; splits saved in the run.
    # Held-out classes (holdout_classes) leave both: no image of them is trained on or validated on.
    dataset = load_dataset(config.dataset, data_root=data_root, split_dir=paths.out / "splits", seed=config.seed)
    seen_classes = config.seen_classes(dataset.classes)
    train_records = stratified_subset(seen_only(dataset.split("train"), config), config.max_train_images, config.seed)
    for extra in config.extra_datasets:  # another lab's train split: class sentences only
        extra_set = load_dataset(extra, data_root=data_root, split_dir=paths.out / "splits", seed=config.seed)
        unknown = sorted({r.label for r in extra_set.split("train")} - set(dataset.classes))
        if unknown:
            raise HemaclipError(f"extra dataset {extra}: class(es) {', '.join(unknown)} are not classes of {config.dataset}")
        extra_records = stratified_subset(seen_only(extra_set.split("train"), config), config.max_train_images, config.seed)
        train_records += [dataclasses.replace(r, attributes=None) for r in extra_records]
    val_set = load_dataset(config.val_dataset, data_root=data_root, split_dir=paths.out / "splits", seed=config.seed)
    val_classes = [c for c in val_set.classes if c not in config.holdout_classes]
    val_records = stratified_subset(seen_only(val_set.split("val"), config), config.max_val_images, config.seed)
    if len(train_records) < config.batch_size:
        raise HemaclipError(f"only {len(train_records)} training images, fewer than one batch of {config.batch_size}")
    prompts: PromptSet = load_prompts(config.prompts)

    if resume:
        remove_stale_temps(paths.out)
        model, meta = load_checkpoint(paths.last)
        state = meta["extra"]["train_state"]
    else:
        model = initial_model(config, seen_classes)
        if config.preprocess is not None:  # how images reach this model from now on (stored in its checkpoints)
            model.config = model.config.replace(preprocess=dict(config.preprocess))
        state = None
    if not config.contrastive_weight:  # a plain supervised classifier: the text side is not trained
        model.text_projection.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
    model.to(info.device).to(memory_format=torch.channels_last)
    frozen_modules = freeze_leading_image_parameters(model, config.freeze_image_fraction)
    if info.is_main:
        write_json(paths.config, {"train": config.to_dict(), "model": model.config.to_dict(), "world_size": info.world_size})

    # Sentences: each with its statement; frozen text features computed once and cached on disk.
    bank = build_text_bank(train_records, model.class_names, prompts, config.dataset, config.captions_per_image, config.seed,
                           holdout=config.holdout_classes)
    text_cache = PooledTextCache(model.text)
    frozen_text = model.config.text_trainable_layers == 0
    bank_features = text_cache.get(bank.texts, progress=show) if frozen_text else None
    text_class, text_attributes = bank.statement_tensors()
    image_class, image_attributes = record_targets(train_records, model.class_names)

    # The model's one preprocessing path: training images stored at STORAGE_SIZE (crops are taken from
    # them), validation images at the model's size, exactly as evaluate, describe and index see them.
    preprocess = preprocess_for(model)
    images = decoded_images([r.path for r in train_records], STORAGE_SIZE, progress=show, preprocess=preprocess)
    val_images = decoded_images([r.path for r in val_records], preprocess.image_size, progress=show, preprocess=preprocess)
    augment = preprocess.train_transform(config.augment_config()) if config.augment else preprocess.eval_transform()

    loss_options: dict[str, Any] = {"rank": info.rank, "world_size": info.world_size, "gather_with_grad": True}
    if config.loss == "soft":
        loss_options["target_scale"] = config.soft_target_temperature
    contrastive = build_loss(config.loss, **loss_options)

    def augment_one(index: int, seed: int) -> torch.Tensor:
        """Augment one image with its own seed, so pixels do not depend on the number of processes."""
        torch.manual_seed(seed)
        return augment(torch.from_numpy(np.array(images[index])).permute(2, 0, 1))
    optimizer = torch.optim.AdamW(param_groups(model, config))
    steps_per_epoch = len(train_records) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, min(config.warmup_steps, total_steps // 5), total_steps)
    )
    start_epoch, start_step, best_score = 0, 0, -float("inf")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step, best_score = state["epoch"], state["step"], state["best_score"]
    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    local = config.batch_size // info.world_size
    mix = {"caption": config.text_mix.caption, "attribute": config.text_mix.attribute, "klass": config.text_mix.klass}

    def save(target: Path, epoch: int, step: int, metrics: dict[str, Any] | None) -> None:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "best_score": best_score,
            "epoch_losses": list(losses) if step else [],
            "epoch_loss_terms": {k: list(v) for k, v in term_losses.items()} if step else {},
        }
        save_checkpoint(target, model, extra={"train_config": config.to_dict(), "train_state": train_state, "metrics": metrics})

    metrics: dict[str, Any] = {}
    losses: list[float] = []
    term_losses: dict[str, list[float]] = {}
    steps_done = 0
    for epoch in range(start_epoch, config.epochs):
        ddp_model.train()
        for module in frozen_modules:
            module.eval()
        order = np.random.default_rng(step_seed(config.seed, epoch)).permutation(len(train_records))
        first = start_step if epoch == start_epoch else 0
        losses: list[float] = list(state["epoch_losses"]) if (state is not None and first) else []
        # Checkpoints saved before loss terms were kept hold none: term means then cover the steps after the resume.
        term_losses = {k: list(v) for k, v in state.get("epoch_loss_terms", {}).items()} if (state is not None and first) else {}
        bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not show)
        tick = time.perf_counter()
        for step in bar:
            global_ids = order[step * config.batch_size : (step + 1) * config.batch_size]
            rng = np.random.default_rng(step_seed(config.seed, epoch, step))
            text_ids = torch.from_numpy(draw_texts(bank, global_ids, mix, rng))
            mine = global_ids[info.rank * local : (info.rank + 1) * local]
            batch = torch.stack([augment_one(i, step_seed(config.seed, epoch, step, info.rank * local + k)) for k, i in enumerate(mine)])
            batch = batch.to(info.device).contiguous(memory_format=torch.channels_last)
            my_text = text_ids[info.rank * local : (info.rank + 1) * local]
            with _autocast(config, info.device):
                if frozen_text:
                    text_input = bank_features[my_text].to(info.device)
                else:
                    text_input = model.text.tokenize([bank.texts[i] for i in my_text.tolist()])
                    text_input = {k: v.to(info.device) for k, v in text_input.items()}
                out = ddp_model(batch, text_input)
            gids = torch.from_numpy(global_ids)
            # The loss as named terms (hemaclip.models.losses.TERMS), each logged; their sum is optimised.
            terms: dict[str, torch.Tensor] = {}
            loss = out["image_features"].new_zeros((), dtype=torch.float32)
            if config.contrastive_weight:
                positive, known = statement_masks(image_class[gids], image_attributes[gids], text_class[text_ids], text_attributes[text_ids])
                terms["contrastive"] = config.contrastive_weight * contrastive(
                    out["image_features"].float(),
                    out["text_features"].float(),
                    out["logit_scale"],
                    positive=positive.to(info.device),
                    known=known.to(info.device),
                )
                loss = loss + terms["contrastive"]
            if config.attribute_head_weight or config.class_head_weight:
                mine_t = torch.from_numpy(mine)
                attr_share = rank_share(image_attributes[mine_t][:, 0], image_attributes[gids][:, 0], info.world_size)
                class_share = rank_share(image_class[mine_t], image_class[gids], info.world_size)
                heads = aux_supervised_loss(
                    out,
                    attribute_labels=image_attributes[mine_t].to(info.device),
                    class_labels=image_class[mine_t].to(info.device),
                    attribute_weight=config.attribute_head_weight * attr_share,
                    class_weight=config.class_head_weight * class_share,
                )
                terms.update(heads)
                head_total = loss.new_zeros(())
                for value in heads.values():
                    head_total = head_total + value
                loss = loss + head_total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(mean_over_ranks(loss.detach(), info))
            for name, value in terms.items():
                term_losses.setdefault(name, []).append(mean_over_ranks(value.detach(), info))
            steps_done += 1
            elapsed = time.perf_counter() - tick
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", img_s=f"{(step - first + 1) * config.batch_size / elapsed:.1f}")
            at_end = step + 1 == steps_per_epoch
            if info.is_main and not at_end and config.save_every_steps and (step + 1) % config.save_every_steps == 0:
                save(paths.last, epoch, step + 1, None)
            if stop_after_steps is not None and steps_done >= stop_after_steps and not at_end:
                if info.is_main:
                    save(paths.last, epoch, step + 1, None)
                barrier(info)
                return {"stopped_at": {"epoch": epoch, "step": step + 1}}
        train_seconds = time.perf_counter() - tick
        barrier(info)
        if info.is_main:
            metrics = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                **{f"train_loss_{name}": float(np.mean(values)) for name, values in term_losses.items() if values},
                "train_images_per_s": (steps_per_epoch - first) * config.batch_size / max(train_seconds, 1e-9),
                "lr": scheduler.get_last_lr()[0],
                **validate(model, val_images, val_records, val_classes, prompts, config.val_dataset, text_cache, info.device),
            }
            score = _select_score(metrics, config.select_metric)
            if score > best_score:
                best_score = score
                save(paths.best, epoch + 1, 0, metrics)
            save(paths.last, epoch + 1, 0, metrics)
            _append_history(paths, metrics)
            _plot_history(paths)
            # One line per epoch even when bars are off (logs, CI); always in the run log.
            headline = ("val_zs_class_macro_f1", "val_zs_attr_macro_f1", "val_head_attr_macro_f1", "val_head_class_macro_f1")
            shown = " ".join(f"{k.removeprefix('val_')}={metrics[k]:.3f}" for k in headline if k in metrics)
            terms = ", ".join(f"{k.removeprefix('train_loss_')} {v:.4f}" for k, v in metrics.items() if k.startswith("train_loss_"))
            logger.log(logging.DEBUG if progress is False else logging.INFO,
                       "epoch %d/%d: loss %.4f (%s), %.1f img/s, %s", epoch + 1, config.epochs, metrics["train_loss"], terms,
                       metrics["train_images_per_s"], shown)
        barrier(info)
    return metrics
