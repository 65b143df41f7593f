"""Training and embedding throughput (images/s) of every packaged model config, at 128 px on this machine.

Each figure stands beside a baseline measured in the same process: the same image tower trained as a
plain classifier (cross-entropy, no text side, no heads), so the ratio shows what the dual encoder's
extra work costs, whatever the machine's absolute speed. Writes bench/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.machine import machine_info

from hemaclip.io import write_json
from hemaclip.models import create_model, list_models
from hemaclip.models.losses import aux_supervised_loss, build_loss


def _timed(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def measure(name: str, size: int, batch: int, repeats: int, device: torch.device) -> dict:
    model = create_model(name, image_size=size, image_pretrained=None).to(device).to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    pooled = torch.randn(batch, model.text.width, device=device)
    labels = torch.randint(0, 2, (batch, len(model.attributes)), device=device)
    classes = torch.randint(0, len(model.class_names), (batch,), device=device)
    loss_fn = build_loss("multipos")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def dual_step() -> None:
        out = model(images, pooled)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], positive=torch.eye(batch, dtype=torch.bool, device=device))
        loss = loss + sum(aux_supervised_loss(out, attribute_labels=labels, class_labels=classes).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    baseline_head = torch.nn.Linear(model.visual.num_features, 8).to(device)
    baseline_opt = torch.optim.AdamW([*model.visual.trunk.parameters(), *baseline_head.parameters()], lr=1e-4)

    def baseline_step() -> None:
        loss = F.cross_entropy(baseline_head(model.visual.trunk(images)), classes)
        baseline_opt.zero_grad(set_to_none=True)
        loss.backward()
        baseline_opt.step()

    @torch.no_grad()
    def embed_step() -> None:
        model.eval()
        model.encode_image(images)

    dual = _timed(dual_step, 1, repeats)
    base = _timed(baseline_step, 1, repeats)
    embed = _timed(embed_step, 1, repeats)
    return {
        "config": name,
        "image_size": size,
        "batch": batch,
        "train_images_per_s": round(batch / dual, 1),
        "baseline_classifier_train_images_per_s": round(batch / base, 1),
        "train_ratio_vs_baseline": round(base / dual, 3),
        "embed_images_per_s": round(batch / embed, 1),
        "parameters_million": round(sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text.")) / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in list_models():
        rows.append(measure(name, args.size, args.batch, args.repeats, torch.device(args.device)))
        print(rows[-1], flush=True)
    write_json(
        args.out,
        {
            "what": "images/s, train step (dual encoder + heads, frozen cached text) and embedding, vs a plain classifier of the same tower",
            "date": date.today().isoformat(),
            "device": args.device,
            "results": rows,
            "machine": machine_info(),
        },
    )


if __name__ == "__main__":
    main()
