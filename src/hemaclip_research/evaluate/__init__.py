"""Evaluate one checkpoint (or another encoder's features) on one dataset split, into a report folder.

:func:`run_evaluation` is the whole protocol behind ``hemaclip evaluate``. It writes
``metrics.json``, ``report.md``, ``report.html`` and PNG figures into `out` (via
:func:`hemaclip_research.report.write_report`) and returns the metrics dictionary. Parts:

* **Zero-shot classes** (prompt ensembles of the prompt set's classes for the dataset; the model's
  own class vocabulary plays no role): accuracy, balanced accuracy, macro and weighted F1, each
  with a 95 % stratified percentile bootstrap interval; per-class precision/recall/F1; confusion
  matrices (counts and row-normalised).
* **Zero-shot attributes** (when the images carry the 11 WBCAtt attributes): macro F1 with an
  interval per attribute, the WBC-CLIP table and the mean over the 11.
* Both zero-shot parts read the images twice where the prompt file has held-out wording: through the
  **trained wording** (the file's training part; ``zero_shot``) and through the **unseen wording** (its
  held-out part, which no training sentence contains; ``zero_shot_unseen_wording``), side by side.
* **Supervised heads** (checkpoints trained with auxiliary heads): the class head, mapped by
  class name onto the evaluated classes when all of them are in the model's vocabulary (else
  reported as not applicable), and the attribute heads, with the same metrics.
* **Calibration** of the zero-shot class probabilities: a temperature fitted on the **val**
  split (never on the evaluated split), ECE (15 bins) before/after, reliability diagrams,
  AUROC and point-biserial correlation of the top probability with correctness, selective
  accuracy at coverage 0.5 ... 1.0.
* **Faithfulness** of the sentences ``hemaclip describe`` writes (when the images carry attributes):
  statement agreement with the annotation and coverage, beside the two WBCAtt annotators' agreement,
  a threshold sweep, and the textbook test on misclassified cells (:mod:`hemaclip_research.faithfulness`).
* **Retrieval**, both directions, where any relevant item counts: text->image and image->text by
  class and by attribute value, image->image by class and by the full attribute profile;
  Hit@k, Precision@k, MRR@k and Recall@k for k = 1, 3, 5, 10; a retrieval grid figure.
* **Probes** on frozen features (logistic, kNN-1, kNN-20, MLP; train split -> evaluated split),
  **n-shot curves** (1 ... 200 images per class, 3 seeds, mean and range) and the LVLM benchmark
  preset (50 evaluated images per class, weighted F1 next to the GPT-4o numbers QUOTED from the
  published benchmark, not reproduced here).
* **Out of distribution**: ``dataset="folder"`` with a `class_map` that maps the folder's class
  names onto prompt-set class names; folder classes without a usable mapping are listed in
  ``unmapped_classes`` (metrics and report), never silently dropped.
* **Embedding map** of up to 3,000 evaluated image embeddings plus the class prompt embeddings,
  coloured by class, and one coloured by an attribute (default ``nucleus_shape``).

With ``features`` + ``index_csv`` (an external encoder such as DinoBloom or UNI) only the probe,
n-shot, LVLM-probe, image->image retrieval and embedding-map parts apply; the report says so.

Each part is a function of explicit inputs (:class:`EvalInputs`, built once, and the readings it
needs from earlier parts) that returns its metrics and report sections (:class:`Part`);
:func:`run_evaluation` builds the inputs, calls the parts in report order and writes the report.

Metric conventions. Macro F1 is hemaclip's one macro F1 (:data:`hemaclip.metrics.classification.MACRO_F1_CONVENTION`):
the mean per-class F1 over the task's labels that occur in the ground truth, a prediction outside the
label set being an error; training-time validation reports the same number. Weighted F1 weights by
support; the confusion matrices always show the full label list. Bootstrap intervals resample images with
replacement within each true class (``n_boot`` resamples, ``numpy`` seed `seed`); ``n_boot=0``
gives point estimates only.

Speed options for tests and quick looks: ``max_per_class`` keeps at most that many images per
class *in every split used* (train, val and the evaluated split; drawn with `seed` after sorting
by path), and ``nshot_shots`` / ``nshot_seeds`` shrink the n-shot grid.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hemaclip
from hemaclip.errors import DataError, HemaclipError
from hemaclip.io import display_path
from hemaclip.log import get_logger, logged_run, progress_level
from hemaclip.metrics.summary import classification_metrics
from hemaclip_research.anchors import ANCHORS, anchors_section
from hemaclip_research.evaluate.calibration import calibration_part
from hemaclip_research.evaluate.classes import (
    ZeroShotReading,
    has_unseen_wording,
    head_class_predictions,
    head_class_reading,
    heads_part,
    zero_shot_attribute_part,
    zero_shot_class_part,
    zero_shot_reading,
)
from hemaclip_research.evaluate.classmap import ClassMapping, load_class_map, resolve_class_map
from hemaclip_research.evaluate.embedding import embedding_part
from hemaclip_research.evaluate.faithfulness import faithfulness_part
from hemaclip_research.evaluate.inputs import (
    DEFAULT_MAP_ATTRIBUTE,
    MIN_IMAGES_PER_CLASS,
    NSHOT_SEEDS,
    NSHOT_SHOTS,
    EvalInputs,
    Figures,
    Part,
    argmax_labels,
    cap_feature_set,
    check_classes,
    cap_per_class,
    check_split,
    load_model_features,
    prompt_vocabularies,
    relabel,
    split_records,
)
from hemaclip_research.evaluate.probes import attribute_probe_part, fit_probes, lvlm_part, nshot_part, probe_part
from hemaclip_research.evaluate.retrieval import RETRIEVAL_KS, retrieval_part
from hemaclip_research.report import Section, Table, write_report

if TYPE_CHECKING:
    from hemaclip.data.stain import Normalizer

__all__ = [
    "DEFAULT_MAP_ATTRIBUTE",
    "MIN_IMAGES_PER_CLASS",
    "NSHOT_SEEDS",
    "NSHOT_SHOTS",
    "RETRIEVAL_KS",
    "ClassMapping",
    "EvalInputs",
    "Part",
    "argmax_labels",
    "cap_feature_set",
    "cap_per_class",
    "check_split",
    "classification_metrics",
    "head_class_predictions",
    "load_class_map",
    "load_model_features",
    "prompt_vocabularies",
    "relabel",
    "resolve_class_map",
    "run_evaluation",
    "split_records",
]

logger = get_logger(__name__)


@logged_run("evaluate")
def run_evaluation(
    checkpoint: Path | None,
    dataset: str,
    split: str = "test",
    out: Path | None = None,
    data_root: Path | None = None,
    folder: Path | None = None,
    class_map: Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    probes: bool = True,
    nshot: bool = True,
    features: Path | None = None,
    index_csv: Path | None = None,
    progress: bool = False,
    *,
    max_per_class: int | None = None,
    nshot_shots: Sequence[int] = NSHOT_SHOTS,
    nshot_seeds: Sequence[int] = NSHOT_SEEDS,
    prompts: Path | None = None,
    split_dir: Path | None = None,
    embed_method: str = "auto",
    map_attribute: str | None = DEFAULT_MAP_ATTRIBUTE,
    batch_size: int = 128,
    device: str = "cpu",
    stain_normalizer: Normalizer | None = None,
) -> dict[str, Any]:
    """Evaluate `checkpoint` (None = the shipped default) on `split` of `dataset`; write the report into `out`.

    See the module docstring for what is measured. `out` is required (it is a positional
    parameter with a default only so the documented argument order works). Keyword-only options:
    `max_per_class` (at most that many images per class in every split used: a fast subset for
    tests and quick looks), `nshot_shots` / `nshot_seeds` (the n-shot grid), `prompts` (a prompt
    file; default the packaged one), `split_dir` (where dataset splits made here are saved),
    `embed_method` ("auto", "tsne", "pca", "umap"), `map_attribute` (colour of the second
    embedding map; None for none), `batch_size`, `device`, `stain_normalizer` (a callable from
    :func:`hemaclip.data.stain.get_normalizer`, applied to the images of every split used). With `features` + `index_csv` the
    external encoder's features are evaluated instead of a checkpoint (give no checkpoint then).
    Returns the metrics dict also written to ``out/metrics.json``. Raises a one-line
    HemaclipError / DataError for an unknown split, a dataset without images in the split, an
    empty selection or a bad class map.
    """
    t0 = time.perf_counter()
    if out is None:
        raise HemaclipError("run_evaluation needs an output folder (out)")
    check_split(split)
    if int(n_boot) < 0:
        raise HemaclipError(f"n_boot must be >= 0, got {n_boot}")
    if max_per_class is not None and int(max_per_class) < 1:
        raise HemaclipError(f"max_per_class must be >= 1, got {max_per_class}")
    if (features is None) != (index_csv is None):
        raise HemaclipError("external features need both a features file and its index CSV")
    if features is not None and checkpoint is not None:
        raise HemaclipError("give either a checkpoint or external features (features + index_csv), not both")
    if class_map is not None and dataset != "folder":
        raise HemaclipError(f"a class map applies to dataset 'folder' only, not '{dataset}'")
    out = Path(out)
    level = progress_level(progress)

    def log(message: str) -> None:
        logger.log(level, "[%6.1fs] %s", time.perf_counter() - t0, message)

    external = features is not None
    if external and stain_normalizer is not None:
        raise HemaclipError("stain normalisation needs images; it does not apply to external features")
    settings = dict(out=out, dataset=dataset, split=split, n_boot=int(n_boot), seed=int(seed), data_root=data_root,
                    nshot_shots=tuple(int(s) for s in nshot_shots), nshot_seeds=tuple(int(s) for s in nshot_seeds),
                    embed_method=embed_method, map_attribute=map_attribute)
    header: dict[str, Any] = {
        "hemaclip_version": hemaclip.__version__,
        "dataset": dataset,
        "split": split,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "max_per_class": max_per_class,
        "mode": "external_features" if external else "checkpoint",
        "stain_normalization": getattr(stain_normalizer, "name", None) or "none",
    }
    notes: list[str] = []
    mapping: ClassMapping | None = None
    if external:
        inputs, more = _external_inputs(features, index_csv, split, max_per_class, seed, settings, header, log)
        notes += more
    else:
        inputs, mapping = _checkpoint_inputs(checkpoint, dataset, split, data_root, folder, class_map, probes, nshot, progress,
                                             max_per_class, prompts, split_dir, batch_size, device, stain_normalizer, settings,
                                             header, log)
    for warning in header.get("warnings", []):  # also in metrics.json and the report's overview
        logger.warning("%s", warning)
        notes.append(warning)
    unmapped = sorted(mapping.unmapped) if mapping is not None else []
    metrics: dict[str, Any] = dict(header)
    metrics["n_images"] = int(len(inputs.eval_features))
    metrics["unmapped_classes"] = unmapped
    metrics["data"] = {
        "eval_images_per_class": dict(sorted(Counter(inputs.eval_features.labels).items())),
        "n_train": int(len(inputs.train_features)) if inputs.train_features is not None else 0,
        "n_val": int(len(inputs.val_zero_shot_features)) if inputs.val_zero_shot_features is not None else 0,
    }
    if mapping is not None:
        excluded = Counter(label for label in inputs.eval_features.labels if label in mapping.unmapped)
        metrics["ood"] = {
            "class_map": str(class_map) if class_map is not None else None,
            "prompt_dataset": mapping.prompt_dataset,
            "mapping": mapping.mapping,
            "unmapped_classes": unmapped,
            "unmapped_reasons": mapping.unmapped,
            "unmapped_images": dict(sorted(excluded.items())),
            "zero_shot_classes": list(mapping.targets),
        }

    figures = Figures(out)
    parts: list[Part] = []
    zs: ZeroShotReading | None = None
    if not external:
        log("zero-shot classes")
        zs = zero_shot_reading(inputs)
        unseen = zero_shot_reading(inputs, "heldout") if has_unseen_wording(inputs, inputs.prompt_dataset) else None
        parts.append(zero_shot_class_part(inputs, zs, figures, unseen))
        log("zero-shot attributes")
        parts.append(zero_shot_attribute_part(inputs, figures))
        log("supervised heads")
        head_pred, head_reason = head_class_reading(inputs, zs)
        heads = heads_part(inputs, zs, head_pred, head_reason, figures)
        parts.append(heads)
        log("calibration")
        parts.append(calibration_part(inputs, zs, figures))
        log("faithfulness")
        class_pred = head_pred if head_pred is not None else zs.pred  # what describe would read
        parts.append(faithfulness_part(inputs, zs, class_pred, heads.metrics["heads"].get("attribute_mean_macro_f1")))
    log("retrieval")
    parts.append(retrieval_part(inputs, figures))
    probe_runs = None
    if probes:
        log("probes")
        probe_runs = fit_probes(inputs)
        parts.append(probe_part(inputs, probe_runs))
    if nshot:
        log("n-shot curves")
        zs_macro = parts[0].metrics["zero_shot"]["classes"]["macro_f1"]["point"] if zs is not None else None
        parts.append(nshot_part(inputs, zs_macro, figures))
        log("attribute probes")
        parts.append(attribute_probe_part(inputs, figures))
    if probes or not external:
        log("LVLM benchmark preset")
        probe_pred = {kind: r["y_pred"] for kind, r in probe_runs.items()} if probe_runs else None
        parts.append(lvlm_part(inputs, zs, probe_pred))
    log("embedding map")
    parts.append(embedding_part(inputs, figures))

    sections: list[Section] = []
    for part in parts:
        for key, value in part.metrics.items():
            if isinstance(value, dict) and isinstance(metrics.get(key), dict):
                metrics[key].update(value)
            else:
                metrics[key] = value
        sections += part.sections
        notes += part.notes
    sections.append(anchors_section(metrics))
    metrics["anchors"] = [dataclasses.asdict(a) for a in ANCHORS]
    metrics["notes"] = notes
    metrics["figures"] = figures.names
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    log("writing report")
    write_report(out, f"hemaclip evaluation: {dataset} / {split}", [overview_section(metrics, mapping, notes), *sections], metrics,
                 checkpoint=metrics.get("checkpoint"))
    log("done")
    return metrics


def _external_inputs(features: Path, index_csv: Path, split: str, max_per_class: int | None, seed: int, settings: dict[str, Any],
                     header: dict[str, Any], log: Callable[[str], None]) -> tuple[EvalInputs, list[str]]:
    """Inputs for another encoder's features (no text tower); adds the encoder to `header`."""
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.features import load_external_features

    log("loading external features")
    fs_all = load_external_features(features, index_csv)
    header["checkpoint"] = f"external:{Path(features).name}"
    header["checkpoint_sha1"] = file_sha1(features)
    header["features"] = str(features)
    header["index_csv"] = str(index_csv)
    eval_features = cap_feature_set(fs_all.by_split(split), max_per_class, seed)
    if len(eval_features) == 0:
        raise DataError(f"{index_csv}: no rows in split '{split}'")
    header["warnings"] = check_classes(eval_features.labels, f"split '{split}' of {index_csv}")
    train_features = None
    if split not in ("train", "all"):
        train_features = cap_feature_set(fs_all.by_split("train"), max_per_class, seed)
    train_missing = "the evaluated split contains the train split." if split in ("train", "all") else "no train rows."
    note = ("External encoder: no text tower, so zero-shot, attribute, head, calibration and image-text "
            "retrieval parts do not apply; only probes, n-shot curves, the LVLM probe rows, image→image "
            "retrieval and the embedding map are reported.")
    return EvalInputs(eval_features=eval_features, eval_zero_shot_features=eval_features, train_features=train_features,
                      train_missing=train_missing, **settings), [note]


def _checkpoint_inputs(checkpoint: Path | None, dataset: str, split: str, data_root: Path | None, folder: Path | None,
                       class_map: Path | None, probes: bool, nshot: bool, progress: bool, max_per_class: int | None,
                       prompts: Path | None, split_dir: Path | None, batch_size: int, device: str, stain_normalizer: Normalizer | None,
                       settings: dict[str, Any], header: dict[str, Any], log: Callable[[str], None]) -> tuple[EvalInputs, ClassMapping | None]:
    """Inputs for a checkpoint: the dataset's splits, their features, the prompts (and a class map for a
    folder); adds the checkpoint to `header`."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.models.text_cache import PooledTextCache
    from hemaclip.text.prompts import load_prompts

    seed = settings["seed"]
    log(f"loading dataset {dataset}")
    ds = load_dataset(dataset, data_root=data_root, split_dir=split_dir, seed=0, folder=folder)
    prompt_set = load_prompts(prompts)
    vocabularies = prompt_vocabularies(prompt_set)
    mapping: ClassMapping | None = None
    if dataset == "folder":
        rows, hint = (load_class_map(class_map) if class_map is not None else (None, None))
        mapping = resolve_class_map(rows, list(ds.classes), vocabularies, hint,
                                    source=str(class_map) if class_map is not None else "identity")
        prompt_dataset, prompt_classes = mapping.prompt_dataset, list(mapping.targets)
    else:
        if dataset not in vocabularies:
            raise DataError(f"{prompt_set.source}: no prompts for dataset '{dataset}'")
        prompt_dataset, prompt_classes = dataset, list(vocabularies[dataset])
    eval_records = split_records(ds, split, max_per_class, seed)
    if not eval_records:
        raise DataError(f"dataset '{dataset}' has no images in split '{split}'")
    what = f"split '{split}' of folder {folder}" if dataset == "folder" else f"split '{split}' of dataset '{dataset}'"
    header["warnings"] = check_classes([r.label for r in eval_records], what, prompt_classes)
    needed = {"eval": eval_records}
    if split not in ("val", "all"):
        needed["val"] = split_records(ds, "val", max_per_class, seed)
    if (probes or nshot) and split not in ("train", "all"):
        needed["train"] = split_records(ds, "train", max_per_class, seed)
    train_missing = ("the evaluated split contains the train split." if split in ("train", "all")
                     else "the dataset has no train images.")
    log(f"features for {', '.join(f'{k} ({len(v)})' for k, v in needed.items())}")
    model, path, sha1, sets = load_model_features(checkpoint, needed, batch_size=batch_size, device=device,
                                                  progress=progress, stain_normalizer=stain_normalizer)
    header["checkpoint"] = display_path(path)
    header["checkpoint_sha1"] = sha1
    m = mapping.mapping if mapping is not None else None
    inputs = EvalInputs(eval_features=sets["eval"], eval_zero_shot_features=relabel(sets["eval"], m), train_features=sets.get("train"),
                        val_zero_shot_features=relabel(sets.get("val"), m), train_missing=train_missing, model=model,
                        text_cache=PooledTextCache(model.text), prompt_set=prompt_set, prompt_dataset=prompt_dataset,
                        prompt_classes=tuple(prompt_classes), **settings)
    return inputs, mapping


def overview_section(metrics: Mapping[str, Any], mapping: ClassMapping | None, notes: Sequence[str]) -> Section:
    """The report's first section: what was evaluated, on what, with which settings, and the notes."""
    m = metrics
    rows = [
        ["Dataset", m["dataset"]], ["Split", m["split"]], ["Images evaluated", m["n_images"]],
        ["Train images (probes)", m["data"]["n_train"]], ["Val images (temperature)", m["data"]["n_val"]],
        ["Encoder", m.get("checkpoint")], ["SHA-1", m.get("checkpoint_sha1")],
        ["Bootstrap resamples", m["n_boot"]], ["Seed", m["seed"]],
    ]
    if m.get("max_per_class") is not None:
        rows.append(["Images per class capped at", m["max_per_class"]])
    text = []
    if mapping is not None:
        pairs = ", ".join(f"{k} → {v}" for k, v in mapping.mapping.items())
        text.append(f"Out-of-distribution folder, zero-shot over '{mapping.prompt_dataset}' prompt classes; class map: {pairs}.")
        if mapping.unmapped:
            text.append("Unmapped folder classes (left out of zero-shot, calibration and text retrieval; still used by "
                        "probes and image→image retrieval under their folder names): "
                        + "; ".join(f"{k} ({v})" for k, v in mapping.unmapped.items()) + ".")
    text += list(notes)
    return Section("Overview", "\n\n".join(text), [Table(["", "Value"], rows)])
