"""`hemaclip synth train|sample|evaluate`: class-conditional GAN synthesis for class balancing.

Training lives in `hemaclip.train.gan`, sampling in `hemaclip.tasks.synthesis`; the three-axis
evaluation (fidelity, memorisation, downstream utility) and its report in `hemaclip_research.synthesis`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hemaclip.commands.common import DataOption, console, parse_set_options

synth_app = typer.Typer(help="Class-conditional GAN synthesis (class balancing), judged for fidelity, memorisation and utility.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(synth_app, name="synth")


@synth_app.command("train")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Run folder (last.pt, metrics.jsonl, samples/epoch_NNN.png).")],
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset whose train split the GAN learns.")] = "all",
    config: Annotated[str, typer.Option("--config", help="Packaged GAN config name or JSON path.")] = "default",
    size: Annotated[Optional[int], typer.Option("--size", help="Image size: 32, 64 or 128 (default: the config's, 64).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs (default: the config's).")] = None,
    reduce: Annotated[Optional[list[str]], typer.Option("--reduce", help="CLASS=FRACTION: keep only this share of a class's train images (harsher imbalance on purpose).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="Wall-clock budget; stops cleanly with a checkpoint (continue with --resume).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config option, KEY=VALUE (model.g_channels=32).")] = None,
    device: Annotated[str, typer.Option("--device", help="torch device.")] = "cpu",
    data: DataOption = None,
) -> None:
    """Train a class-conditional GAN (spectral-norm projection D, hinge loss, DiffAugment) on a train split.

    Example: hemaclip synth train --dataset all --out runs/gan-all --size 64 --minutes 7

    Example: hemaclip synth train --dataset all --out runs/gan-all-benign10 --reduce benign=0.1
    """
    import json

    from hemaclip.io import write_json
    from hemaclip.train.gan import load_gan_config, parse_reduce, train_gan

    overrides = parse_set_options(set_)
    if size is not None:
        overrides["model.image_size"] = size
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = load_gan_config(config, overrides)
    result = train_gan(
        dataset, out, cfg, data_root=data, reduce=parse_reduce(reduce), resume=resume, device=device, max_minutes=minutes
    )
    run_file = Path(out) / "run.json"
    calls = json.loads(run_file.read_text()).get("calls", []) if (resume and run_file.is_file()) else []
    calls.append({"command": "hemaclip " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "step_after": result.step, "seconds": round(result.seconds, 1)})
    write_json(
        run_file,
        {"step": result.step, "total_steps": result.total_steps, "epochs_done": result.epoch, "finished": result.finished,
         "seconds_total": round(sum(c["seconds"] for c in calls), 1), "calls": calls},
    )
    state = "finished" if result.finished else "stopped (resume with --resume)"
    console.print(f"GAN {state} at step {result.step}/{result.total_steps} ({result.epoch:.2f} epochs, {result.seconds:.0f} s); checkpoint {Path(out) / 'last.pt'}")


@synth_app.command("sample")
def sample_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="GAN checkpoint (last.pt of `synth train`).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <class>/<class>_NNNNN.png and index.csv.")],
    per_class: Annotated[int, typer.Option("--per-class", help="Images per class.")] = 100,
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="Only these classes (repeat the option).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Refuse the checkpoint unless it was trained on this dataset.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed.")] = 0,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw generator instead of its EMA copy.")] = False,
) -> None:
    """Write class-conditional samples as PNGs (one folder per class) plus an index CSV.

    Example: hemaclip synth sample --checkpoint runs/gan-all/last.pt --out synth/ --per-class 200 --classes benign
    """
    from hemaclip.models.gan import load_generator
    from hemaclip.tasks.synthesis import sample_counts, sample_images, write_sample_folder

    generator, state = load_generator(checkpoint, dataset=dataset, use_ema=not no_ema)
    counts = sample_counts(state.classes, per_class, classes)
    images, labels = sample_images(generator, state.classes, counts, seed=seed)
    index = write_sample_folder(out, images, labels)
    console.print(f"{len(labels)} images ({', '.join(f'{c}: {n}' for c, n in counts.items())}) written under {out}; index {index}")


@synth_app.command("evaluate")
def evaluate_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="GAN trained on the full train split (fidelity, memorisation).")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (report.md, report.html, metrics.json, figures).")],
    utility_checkpoint: Annotated[Optional[Path], typer.Option("--utility-checkpoint", help="GAN trained with --reduce (downstream utility under harsher imbalance).")] = None,
    encoder: Annotated[Optional[Path], typer.Option("--encoder", help="hemaclip model whose image embedding measures distances. Default: the shipped model.", show_default=False)] = None,
    note: Annotated[str, typer.Option("--note", help="Free text shown under 'What was evaluated' (e.g. how the GANs were trained).")] = "",
    seeds: Annotated[int, typer.Option("--seeds", help="Repeats of the randomised utility arms (oversampling draw, synthetic draw).")] = 3,
    data: DataOption = None,
) -> None:
    """Fidelity (FID/KID, precision/recall), memorisation and downstream utility of a GAN, as a report.

    Example: hemaclip synth evaluate --checkpoint runs/gan-all/last.pt --utility-checkpoint runs/gan-all-benign10/last.pt --out reports/synthesis
    """
    from hemaclip_research.synthesis import evaluate_synthesis

    command = "hemaclip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = evaluate_synthesis(
        checkpoint, out, utility_checkpoint=utility_checkpoint, encoder=encoder, data_root=data, seeds=seeds, command=command, note=note
    )
    console.print(f"report: {paths['markdown']} and {paths['html']}; metrics: {paths['metrics']}")
