"""The robustness study (`hemaclip robustness`): class and attribute F1 under image corruptions, against a
stated baseline, as a report.

Scoring lives in `hemaclip.tasks.robustness`; plots and the report are made here, in the studies layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.errors import DataError, HemaclipError
from hemaclip.io import display_path
from hemaclip.log import get_logger, logged_run, progress_level

logger = get_logger(__name__)

METRIC_TITLES = {
    "zs_class": "class macro F1, zero-shot (text prompts)",
    "head_class": "class macro F1, supervised class head",
    "zs_attr": "mean attribute macro F1, zero-shot (text prompts)",
    "head_attr": "mean attribute macro F1, supervised heads",
}


def _matrix(scores: dict[str, dict[str, float]], metric: str, corruptions: list[str], severities: list[int]) -> np.ndarray:
    clean = scores["clean/0"].get(metric, np.nan)
    return np.array([[clean] + [scores[f"{c}/{s}"].get(metric, np.nan) for s in severities] for c in corruptions], dtype=float)


def _example_grid(image: np.ndarray, corruptions: list[str], severities: list[int], seed: int, path: Path) -> Path:
    """One test cell under every corruption and severity (a derived figure, not a data copy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hemaclip.data.corruptions import corrupt
    from hemaclip.io import atomic_write

    fig, axes = plt.subplots(len(corruptions), len(severities) + 1, figsize=(1.3 * (len(severities) + 1) + 1.2, 1.3 * len(corruptions)),
                             squeeze=False)
    for r, name in enumerate(corruptions):
        for c, severity in enumerate([0, *severities]):
            ax = axes[r][c]
            ax.imshow(image if severity == 0 else corrupt(image, name, severity, seed=seed, index=0))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean" if severity == 0 else f"severity {severity}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=60)  # small: it is embedded in report.html
    plt.close(fig)
    return path


def _study_sections(paths: list[Path]) -> tuple[list[Any], dict[str, Any]]:
    """Report sections from result JSONs that carry a `report_section` (title, text, columns, rows)."""
    from hemaclip_research.report import Section, Table

    sections, raw = [], {}
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            spec = payload["report_section"]
            table = Table(list(spec["columns"]), [list(r) for r in spec["rows"]], caption=str(spec.get("caption", "")))
            sections.append(Section(str(spec["title"]), str(spec.get("text", "")) + f"\n\nSource: `{Path(path).name}`.", [table]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a result file with a report_section ({exc.__class__.__name__}: {exc})") from None
        raw[Path(path).name] = {k: v for k, v in payload.items() if k != "report_section"}
    return sections, raw


RESULT_KEYS = ("n_images", "scores", "baseline_scores", "errors", "seconds_scoring")


def _reusable(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The scores of an earlier run with exactly these settings, or None."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if any(saved.get(k) != v for k, v in settings.items()) or any(k not in saved for k in RESULT_KEYS[:4]):
        return None
    return {k: saved[k] for k in RESULT_KEYS if k in saved}


@logged_run("robustness")
def run_robustness_report(
    out: Path,
    checkpoint: Path | None = None,
    dataset: str = "wbcatt",
    split: str = "test",
    data_root: Path | None = None,
    max_per_class: int = 60,
    baseline_train_per_class: int = 200,
    corruptions: tuple[str, ...] | None = None,
    severities: tuple[int, ...] | None = None,
    baseline: bool = True,
    stain_norm: str = "none",
    seed: int = 0,
    studies: list[Path] | None = None,
    progress: bool = False,
    reuse: bool = False,
) -> dict[str, Any]:
    """Run the benchmark and write metrics.json, report.md/html and the heat-maps into `out`.

    `reuse=True` takes the scores from an earlier ``out/metrics.json`` made with the same settings
    (checkpoint hash, data subset, corruptions, severities, seed, baseline, normalisation) instead
    of recomputing them: for re-rendering the report, e.g. with new `studies`.
    """
    from hemaclip.data.corruptions import CORRUPTION_NAMES, SEVERITIES
    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.image_cache import decoded_images
    from hemaclip.data.preprocess import preprocess_for
    from hemaclip.data.stain import get_normalizer
    from hemaclip_research import plots
    from hemaclip_research.report import Section, Table, write_report
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.models.factory import create_model
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.probes import sample_per_class
    from hemaclip.tasks.robustness import BASELINE_DESCRIPTION, MIN_BASELINE_RELATIVE_CE, RobustnessConfig, run_robustness
    from hemaclip.text.prompts import load_prompts

    t0 = time.perf_counter()
    level = progress_level(progress)

    def log(message: str) -> None:
        logger.log(level, message)

    corruptions = corruptions or CORRUPTION_NAMES
    severities = severities or SEVERITIES
    if max_per_class < 1 or baseline_train_per_class < 1:
        raise HemaclipError("--max-per-class and --baseline-train-per-class must be >= 1")
    normalizer = get_normalizer(stain_norm)
    path = resolve_checkpoint(checkpoint)
    model, _meta = load_for_inference(path)
    prompt_set = load_prompts()
    if dataset not in prompt_set.datasets:
        raise DataError(f"no class prompts for dataset '{dataset}' (have: {', '.join(prompt_set.datasets)})")
    ds = load_dataset(dataset, data_root=data_root, seed=0)
    records = ds.split(split)
    if not records:
        raise DataError(f"dataset '{dataset}' has no images in split '{split}'")
    records = sorted(records, key=lambda r: str(r.path))
    rows = sample_per_class([r.label for r in records], max_per_class, seed)
    records = [records[i] for i in sorted(rows)]
    size = int(model.config.image_size)
    log(f"{len(records)} {split} images of {dataset}; decoding at {size}px")
    preprocess = preprocess_for(model)
    images = decoded_images([r.path for r in records], size, progress=progress, preprocess=preprocess)
    classes = [c for c in prompt_set.classes(dataset) if c in {r.label for r in records}]

    baseline_model = baseline_train = None
    if baseline and not reuse:
        train = sorted(ds.split("train"), key=lambda r: str(r.path))
        if not train:
            raise DataError(f"dataset '{dataset}' has no train split for the baseline probe (use --no-baseline)")
        train = [train[i] for i in sorted(sample_per_class([r.label for r in train], baseline_train_per_class, seed))]
        baseline_model = create_model(RobustnessConfig().baseline_model, image_size=size)
        baseline_train = (decoded_images([r.path for r in train], size, progress=progress, preprocess=preprocess), train)
    config = RobustnessConfig(corruptions=tuple(corruptions), severities=tuple(severities), seed=seed, baseline=baseline)
    settings = {"checkpoint_sha1": file_sha1(path), "dataset": dataset, "split": split, "max_per_class": max_per_class,
                "baseline_train_per_class": baseline_train_per_class if baseline else None, "stain_normalization": stain_norm,
                "corruptions": list(corruptions), "severities": list(severities), "seed": seed,
                "baseline": BASELINE_DESCRIPTION if baseline else None}
    result = _reusable(Path(out) / "metrics.json", settings) if reuse else None
    if result is not None:
        log(f"reusing the scores in {Path(out) / 'metrics.json'}")
    else:
        log(f"{len(corruptions)} corruptions x {len(severities)} severities")
        result = run_robustness(model, records, images, prompt_set, dataset, classes, config, baseline_model=baseline_model,
                                baseline_train=baseline_train, stain_normalizer=normalizer, progress=progress)
        result["seconds_scoring"] = round(time.perf_counter() - t0, 1)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    sections: list[Any] = []
    scores, errors = result["scores"], result["errors"]
    cols = ["clean", *[str(s) for s in severities]]
    metrics = [m for m in METRIC_TITLES if m in errors]
    summary_rows = []
    for metric in metrics:
        e = errors[metric]
        summary_rows.append([METRIC_TITLES[metric], e["clean_f1"], e["mean_corrupted_f1"], e.get("baseline_clean_f1"),
                             e.get("mce"), e.get("relative_mce")])
    baseline_text = (f"Baseline: {BASELINE_DESCRIPTION} ({baseline_train_per_class} per class), scored on the same corrupted "
                     "images in this run; class metrics are compared with its class probe, attribute metrics with its "
                     "attribute probes." if baseline else "No baseline was run (--no-baseline): mCE is not available.")
    overview = (
        f"{len(records)} {dataset} {split} images (at most {max_per_class} per class, seed {seed}), corrupted at the model's "
        f"input size ({size} px), {len(corruptions)} corruptions x {len(severities)} severities, each image with its own "
        f"seeded draw. Stain normalisation: {stain_norm}.\n\n{baseline_text}\n\n"
        "CE = sum over severities of (1 - F1). mCE = mean over corruptions of CE(model) / CE(baseline). Relative mCE = "
        "mean over corruptions of [sum of (clean F1 - corrupted F1)] / [the same for the baseline], leaving out "
        f"corruptions on which the baseline loses < {MIN_BASELINE_RELATIVE_CE} in total (a ratio over almost nothing). Below 1: the model degrades less than the baseline.\n\n"
        "These corruptions are synthetic; they are not calibrated against real inter-laboratory variation."
    )
    sections.append(Section("Overview", overview, [Table(
        ["metric", "clean F1", "mean corrupted F1", "baseline clean F1", "mCE", "relative mCE"], summary_rows,
        caption="Summary (F1 scores; mCE and relative mCE against the baseline)")]))
    for metric in metrics:
        fig = plots.plot_robustness_heatmap(
            _matrix(scores, metric, list(corruptions), list(severities)), list(corruptions), cols,
            out / f"heatmap_{metric}.png", title=METRIC_TITLES[metric], vmin=0.0, vmax=1.0,
            row_title="corruption", col_title="severity")
        figures.append(fig.name)
        per = errors[metric]["per_corruption"]
        table_rows = [[c, per[c]["mean_f1"], per[c]["ce"], per[c].get("baseline_ce"), per[c].get("ce_normalised"),
                       per[c]["relative_ce"], per[c].get("baseline_relative_ce"), per[c].get("relative_ce_normalised")]
                      for c in corruptions]
        sections.append(Section(METRIC_TITLES[metric][0].upper() + METRIC_TITLES[metric][1:], "", [Table(
            ["corruption", "mean F1", "CE", "baseline CE", "CE / baseline", "rel. CE", "baseline rel. CE", "rel. CE / baseline"],
            table_rows, caption=f"Per corruption ({METRIC_TITLES[metric]})")], [(fig, f"{METRIC_TITLES[metric]} per corruption and severity")]))
    if result["baseline_scores"]:
        for key, title in (("class", "baseline class probe macro F1"), ("attr", "baseline attribute probes, mean macro F1")):
            if key in result["baseline_scores"]["clean/0"]:
                fig = plots.plot_robustness_heatmap(
                    _matrix(result["baseline_scores"], key, list(corruptions), list(severities)), list(corruptions), cols,
                    out / f"heatmap_baseline_{key}.png", title=title, vmin=0.0, vmax=1.0, row_title="corruption", col_title="severity")
                figures.append(fig.name)
                sections.append(Section(f"Baseline: {title}", BASELINE_DESCRIPTION + ".", [], [(fig, title)]))
    grid = _example_grid(np.asarray(images[0]), list(corruptions), list(severities), seed, out / "corruption_examples.png")
    figures.append(grid.name)
    sections.append(Section("What the corruptions look like", "One test cell under each corruption and severity.", [],
                            [(grid, "corruption x severity examples")]))
    study_sections, study_raw = _study_sections(list(studies or []))
    sections += study_sections

    metrics_out = {
        "checkpoint": display_path(path),
        **settings,
        **result,
        "studies": study_raw,
        "figures": figures,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(out, f"hemaclip robustness: {dataset} / {split}", sections, metrics_out, checkpoint=path)
    return metrics_out
