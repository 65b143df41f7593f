"""The `hemaclip` command line. Each command is a thin shell over the library; errors a user can
fix (bad files, options, checkpoints) print one line on stderr and exit with status 1."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hemaclip import __version__
from hemaclip.commands import register_all
from hemaclip.commands.common import CheckpointOption, DataOption, console, logger, parse_set_options
from hemaclip.errors import HemaclipError
from hemaclip.io import check_output_dir
from hemaclip.log import setup_console

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)

app = typer.Typer(
    name="hemaclip",
    help=(
        "Morphology-aware image-text learning for blood-cell images (research software, not for diagnosis).\n\n"
        "Data is read from --data DIR, else $HEMACLIP_DATA, else ../shared/data beside the repository."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect the datasets: counts per split and class, duplicates found.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        console.print(f"hemaclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """hemaclip: teach a model to see blood cells the way a haematologist describes them."""


@data_app.command("summary")
def data_summary(
    data: DataOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the splits made for datasets that ship none.")] = 0,
) -> None:
    """Count files, duplicates, and images per split and class for every dataset found under the data root.

    Example: hemaclip data summary --json
    """
    from hemaclip.data.datasets import BUNDLED_DATASETS, load_dataset
    from hemaclip.data.paths import resolve_data_root

    root = resolve_data_root(data)
    report: dict = {"data_root": str(root), "datasets": {}}
    for name in BUNDLED_DATASETS:
        try:
            report["datasets"][name] = load_dataset(name, data_root=root, seed=seed).summary(root)
        except HemaclipError as exc:
            report["datasets"][name] = {"dataset": name, "absent_or_invalid": str(exc)}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for name, summary in report["datasets"].items():
        if "absent_or_invalid" in summary:
            console.print(f"[yellow]{name}[/]: {summary['absent_or_invalid']}")
            continue
        dup = summary["duplicates"]
        title = f"{name}: {summary['files_found']} files, {summary['records']} after deduplication"
        if dup:
            title += f" ({dup['duplicate_groups']} duplicate groups, {dup['files_dropped']} dropped)"
        title += f"; lab {', '.join(summary['labs'])}"
        if summary.get("groups"):
            groups = summary["groups"]
            title += f"; {groups['count']} groups of near-duplicate crops, {groups['split_across']} split across splits"
        table = Table(title=title, title_justify="left")
        table.add_column("class")
        for split in summary["per_split_class"]:
            table.add_column(split, justify="right")
        for cls in summary["classes"]:
            table.add_row(cls, *(str(summary["per_split_class"][s].get(cls, 0)) for s in summary["per_split_class"]))
        table.add_row("[bold]total", *(f"[bold]{n}" for n in summary["split_sizes"].values()))
        console.print(table)
        if (dup or {}).get("dropped_by_split"):
            by_split = ", ".join(f"{n} from {s}" for s, n in dup["dropped_by_split"].items())
            console.print(f"  dropped byte-identical copies: {by_split} (the copy in the earliest split is kept): {', '.join(dup['dropped'])}")
        for group in (dup or {}).get("cross_label_groups", []):
            console.print(f"  dropped: identical image filed under two classes: {' = '.join(group)}")


@data_app.command("check")
def data_check(
    dataset: Annotated[str, typer.Option(help="wbcatt, pbc, pbc11, all, lisc, zheng1, zheng2, or folder (ImageFolder layout under --data).")] = "folder",
    data: DataOption = None,
    attributes_csv: Annotated[
        Optional[Path], typer.Option(help="For --dataset folder: CSV of the 11 attributes (default ROOT/attributes.csv if present).")
    ] = None,
    keep_going: Annotated[bool, typer.Option(help="List every unreadable image instead of stopping at the first.")] = False,
) -> None:
    """Decode every image of a dataset and stop at the first unreadable one, naming it.

    Use it before training or indexing on a folder from another lab.
    Example: hemaclip data check --dataset folder --data /path/to/cells
    """
    from tqdm import tqdm

    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.preprocess import decode_image
    from hemaclip.errors import DataError

    loaded = load_dataset(dataset, data_root=data if dataset != "folder" else None, folder=data, attributes_csv=attributes_csv)
    bad: list[str] = []
    for record in tqdm(loaded.records, desc=f"decoding {dataset}", unit="img", disable=not sys.stderr.isatty()):
        try:
            decode_image(record.path)
        except DataError as exc:
            if not keep_going:
                raise
            bad.append(str(exc))
    for line in bad:
        logger.warning("bad image: %s", line)
    if bad:
        raise DataError(f"{len(bad)} of {len(loaded.records)} images in dataset '{dataset}' are unreadable (listed above)")
    console.print(f"{dataset}: all {len(loaded.records)} images decode ({len(loaded.classes)} classes)")


@app.command("captions")
def captions(
    dataset: Annotated[str, typer.Option(help="Dataset with attributes: wbcatt (or folder with an attributes CSV).")] = "wbcatt",
    split: Annotated[str, typer.Option(help="train, val or test.")] = "train",
    n: Annotated[int, typer.Option("-n", help="Number of images to sample.", min=1)] = 5,
    per_image: Annotated[int, typer.Option(help="Captions per image.", min=1)] = 3,
    seed: Annotated[int, typer.Option(help="Seed for the image sample and caption phrasing.")] = 0,
    data: DataOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Show sample images with the morphology captions generated from their 11 WBCAtt attributes.

    Every caption states all 11 attribute values; `parse_caption` maps it back exactly.
    Example: hemaclip captions --dataset wbcatt --split train -n 5 --seed 0
    """
    from hemaclip.data.datasets import load_dataset
    from hemaclip.errors import DataError
    from hemaclip.text.captions import caption_variants

    records = [r for r in load_dataset(dataset, data_root=data, seed=seed).split(split) if r.attributes]
    if not records:
        raise DataError(f"dataset '{dataset}' split '{split}' has no images with attributes to caption")
    sample = random.Random(seed).sample(records, min(n, len(records)))
    for record in sample:
        texts = caption_variants(record.attributes, n=per_image, seed=seed)
        if as_json:
            typer.echo(json.dumps({"path": str(record.path), "label": record.label, "captions": texts}))
        else:
            console.print(f"[bold]{record.path}[/] ({record.label})")
            for text in texts:
                console.print(f"  - {text}")


@app.command("train")
def train_command(
    config: Annotated[str, typer.Option(help="Packaged config name (default, tiny) or a JSON/YAML file.")] = "default",
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, metrics.jsonl, curves.png, splits.")] = Path("runs/default"),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where it stopped.")] = False,
    data: DataOption = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config option, e.g. --set epochs=2 (JSON values).")
    ] = None,
) -> None:
    """Train a dual encoder that aligns cell images with morphology sentences.

    Single process: hemaclip train --config default --out runs/mine
    Several processes (DDP): torchrun --nproc_per_node 2 -m hemaclip.cli train --config default --out runs/ddp
    Resume after a stop or kill: hemaclip train --out runs/mine --resume
    """
    from hemaclip.train.config import TrainConfig, load_train_config, saved_train_config

    overrides = parse_set_options(set_)
    check_output_dir(out)
    if resume and (out / "config.json").is_file():
        train_config = TrainConfig.from_dict({**saved_train_config(out / "config.json"), **overrides}, source=str(out / "config.json"))
    else:
        train_config = load_train_config(config, overrides)  # every value checked before anything is written
    from hemaclip.train.trainer import train

    metrics = train(train_config, out, resume=resume, data_root=data)
    console.print_json(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
    console.print(f"checkpoints: {out / 'best.pt'} (best), {out / 'last.pt'} (last); curves: {out / 'curves.png'}")


@app.command("models")
def models_command() -> None:
    """List the packaged model configs (use one with `train --set model=NAME`)."""
    from hemaclip.models import get_model_config, list_models

    table = Table(title="model configs")
    for column in ("name", "image tower", "px", "pretrained image weights", "text tower", "text layers trained"):
        table.add_column(column)
    for name in list_models():
        config = get_model_config(name)
        table.add_row(name, config.image_tower, str(config.image_size), str(config.image_pretrained or "none (random init)"),
                      config.text_tower, str(config.text_trainable_layers))
    console.print(table)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="Folder for the ONNX files.")] = Path("export"),
    checkpoint: CheckpointOption = None,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Export both towers to ONNX (checked against PyTorch).")] = True,
) -> None:
    """Export the image encoder and the text encoder/projection to ONNX for use outside PyTorch.

    Example: hemaclip export --onnx --out export/
    """
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.models.export import export_onnx, verify_onnx

    if not onnx:
        raise HemaclipError("nothing to export: ONNX is the only export format (drop --no-onnx)")
    check_output_dir(out)
    model, _ = load_checkpoint(resolve_checkpoint(checkpoint))
    written = export_onnx(model, out)
    for name, path in written.items():
        console.print(f"{name}: {path}")
    differences = verify_onnx(model, written)
    console.print("largest |onnxruntime - PyTorch| per file: " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
    if max(differences.values()) > 1e-3:
        raise HemaclipError(f"{out}: ONNX outputs differ from PyTorch by up to {max(differences.values()):.1e}")


@app.command("demo")
def demo_command(
    data: DataOption = None,
    checkpoint: CheckpointOption = None,
    n: Annotated[int, typer.Option("-n", help="WBCAtt test cells per class to describe.", min=1)] = 2,
    index_size: Annotated[int, typer.Option(help="WBCAtt test cells in the demo search index.", min=10)] = 300,
    out: Annotated[Path, typer.Option(help="Folder for the HTML/Markdown report and its figures.")] = Path("demo-output"),
    reference: Annotated[
        bool,
        typer.Option(
            "--reference/--no-reference",
            help="Show nearest reference cells: the WBCAtt train split, embedded once into the cache (a few minutes the first time).",
        ),
    ] = True,
) -> None:
    """The main job on the shipped model: data summary, describe real WBCAtt test cells (class, attributes,
    sentence, saliency, nearest reference cells), build a small search index, search it by description,
    and write everything to an HTML report.

    Example: hemaclip demo --out demo-output   (then open demo-output/report.html)
    """
    import time

    from hemaclip_research.demo import demo_data_lines, demo_describe, demo_search, demo_write_report

    started = time.perf_counter()
    console.rule("1. data")
    data_lines = demo_data_lines(data)
    for line in data_lines:
        console.print(line, highlight=False)
    console.rule("2. describe real WBCAtt test cells with the shipped model")
    described = demo_describe(data, checkpoint, n, out, reference=reference)
    console.print(described["table"])
    for line in described["sentences"]:
        console.print(f"  {line}", highlight=False)
    console.rule("3. search cells by description")
    searched = demo_search(data, described["describer"], described["checkpoint"], index_size, out)
    for line in searched["lines"]:
        console.print(line, highlight=False)
    paths = demo_write_report(out, data_lines, described, searched, time.perf_counter() - started)
    console.print(f"report: {paths['html']} (also {paths['markdown'].name}, {paths['metrics'].name}); took {time.perf_counter() - started:.0f} s")
    console.print("Research software: these readings are not a diagnosis.")


@app.command("evaluate")
def evaluate_command(
    out: Annotated[Path, typer.Option(help="Report folder: metrics.json, report.md, report.html, PNGs.")],
    checkpoint: CheckpointOption = None,
    dataset: Annotated[str, typer.Option(help="wbcatt, pbc, pbc11, all, lisc, zheng1, zheng2, or folder (with --data DIR).")] = "wbcatt",
    split: Annotated[str, typer.Option(help="Split to evaluate (temperature is fitted on val, probes trained on train).")] = "test",
    data: DataOption = None,
    class_map: Annotated[
        Optional[Path], typer.Option(help="For --dataset folder: JSON or CSV mapping folder classes to known class names.")
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95 % intervals.", min=100)] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of bootstrap, probes and splits.")] = 0,
    probes: Annotated[bool, typer.Option("--probes/--no-probes", help="Logistic, kNN and MLP probes on frozen embeddings.")] = True,
    nshot: Annotated[bool, typer.Option("--nshot/--no-nshot", help="n-shot probe curves (1 to 200 per class, 3 seeds).")] = True,
    features: Annotated[Optional[Path], typer.Option(help="Evaluate another encoder's features (.npy) instead of a checkpoint.")] = None,
    index_csv: Annotated[Optional[Path], typer.Option(help="Index CSV (path,label,split) of --features.")] = None,
    max_per_class: Annotated[Optional[int], typer.Option(help="Cap images per class and split (quick looks).")] = None,
    stain_norm: Annotated[
        str, typer.Option(help="Stain normalisation before the model: none, macenko or reinhard (shipped PBC reference).")
    ] = "none",
    protocol: Annotated[
        str, typer.Option(help="standard, or unseen-classes: seen and --holdout classes together, the held-out ones read from their description.")
    ] = "standard",
    holdout: Annotated[
        Optional[list[str]], typer.Option(help="For --protocol unseen-classes: a class held out in training (repeat for several).")
    ] = None,
) -> None:
    """Evaluate a model the way the field does, with 95 % bootstrap intervals: zero-shot class and attributes,
    supervised heads, calibration, retrieval both ways, probes and n-shot curves, embedding maps.

    Example: hemaclip evaluate --dataset wbcatt --split test --out reports/default/wbc5-attributes-test
    Out of distribution: hemaclip evaluate --dataset folder --data DIR --class-map map.json --out reports/ood
    Another lab's stain: hemaclip evaluate --dataset all --stain-norm macenko --out reports/all-macenko
    Unseen classes: hemaclip evaluate --protocol unseen-classes --holdout basophil --checkpoint runs/holdout-basophil/best.pt
    --out reports/unseen-classes/basophil
    """
    from hemaclip.data.stain import get_normalizer
    from hemaclip_research.evaluate import run_evaluation

    check_output_dir(out)
    if protocol not in ("standard", "unseen-classes"):
        raise HemaclipError(f"--protocol {protocol}: choose standard or unseen-classes")
    if holdout and protocol != "unseen-classes":
        raise HemaclipError("--holdout is for --protocol unseen-classes")
    if protocol == "unseen-classes":
        from hemaclip_research.unseen_classes import run_unseen_classes

        metrics = run_unseen_classes(checkpoint, dataset, split, holdout or [], out, data_root=data, n_boot=n_boot, seed=seed,
                                     progress=sys.stderr.isatty(), max_per_class=max_per_class)
        g = metrics["gzsl"]
        console.print(f"{metrics['n_images']} images; S {g['acc_seen']['point']:.3f}, U {g['acc_unseen']['point']:.3f}, "
                      f"H {g['h']['point']:.3f} ({'zero-shot' if metrics['zero_shot'] else 'NOT zero-shot: see the report'}); "
                      f"report: {out / 'report.html'}")
        return

    normalizer = get_normalizer(stain_norm)
    metrics = run_evaluation(
        checkpoint,
        dataset,
        split,
        out,
        data_root=data if dataset != "folder" else None,
        folder=data if dataset == "folder" else None,
        class_map=class_map,
        n_boot=n_boot,
        seed=seed,
        probes=probes,
        nshot=nshot,
        features=features,
        index_csv=index_csv,
        progress=sys.stderr.isatty(),
        max_per_class=max_per_class,
        stain_normalizer=normalizer,
    )
    console.print(f"{metrics.get('n_images', '?')} images evaluated in {metrics.get('seconds', 0):.0f} s; report: {out / 'report.html'}")


@app.command("compare")
def compare_command(
    a: Annotated[str, typer.Argument(help="Checkpoint A, or FEATURES.npy:INDEX.csv of another encoder.")],
    b: Annotated[str, typer.Argument(help="Checkpoint B, or FEATURES.npy:INDEX.csv.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.json and the report.")] = Path("reports/compare"),
    dataset: Annotated[str, typer.Option(help="Dataset both are evaluated on.")] = "wbcatt",
    split: Annotated[str, typer.Option(help="Split both are evaluated on.")] = "test",
    data: DataOption = None,
    n_boot: Annotated[int, typer.Option(min=100, help="Paired bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Paired bootstrap test of two models on the same images: difference, 95 % interval and p.

    Example: hemaclip compare runs/a/best.pt runs/b/best.pt --dataset wbcatt --split test
    """
    from hemaclip_research.compare import run_compare

    check_output_dir(out)
    run_compare(a, b, dataset, split, out, data_root=data, n_boot=n_boot, seed=seed, progress=sys.stderr.isatty())
    console.print(f"comparison: {out / 'compare.json'}, {out / 'report.html'}")


register_all(app)


def usage_error_types() -> tuple[type[Exception], ...]:
    """The exception classes that mean "the command line was used wrongly" (unknown command or option,
    missing or invalid value): click's, and the copies typer >= 0.29 raises from its vendored click
    (``typer._click``), which do not derive from click's."""
    import click

    types: list[type[Exception]] = [click.ClickException]
    # typer.BadParameter is its own UsageError's subclass; its ClickException base is the one to catch.
    typer_base = next((cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"), None)
    if typer_base is not None and typer_base not in types:
        types.append(typer_base)
    return tuple(types)


def usage_error_lines(exc: Exception) -> list[str]:
    """click's usage-error text without its blank line: the usage, a help hint, the error (each one line)."""
    ctx = getattr(exc, "ctx", None)
    lines = []
    if ctx is not None:
        lines.append(" ".join(ctx.get_usage().split()))
        if ctx.command.get_help_option(ctx) is not None:
            lines.append(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.")
    lines.append("Error: " + " ".join(exc.format_message().split()))
    return lines


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1; usage errors (unknown
    command or option, missing or bad value) the usage line, a help hint and one error line, exit 2; a
    command's own exit status (e.g. 2 for an incomplete `lvlm run`) is kept; Ctrl+C one line, exit 130."""
    setup_console()
    try:
        # In this mode typer returns exit codes instead of raising them: a command's typer.Exit(2) and
        # Ctrl+C (KeyboardInterrupt, turned into 130) come back here as the return value.
        code = app(standalone_mode=False)
    except HemaclipError as exc:
        logger.error("error: %s", " ".join(str(exc).split("\n")))
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        logger.error("aborted")
        sys.exit(INTERRUPTED)
    except usage_error_types() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        sys.stderr.write("\n".join(usage_error_lines(exc)) + "\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # raised outside a command (e.g. while the app is set up)
        code = INTERRUPTED
    if code == INTERRUPTED:
        logger.error("interrupted (Ctrl+C): the run stopped before it finished")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
