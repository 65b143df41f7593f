"""Is model A better than model B on the same images? Paired bootstrap comparisons -> compare.json + report.

:func:`run_compare` scores two systems on the *same* images of one dataset split and tests each
difference with a paired, class-stratified percentile bootstrap
(:func:`hemaclip.metrics.statistics.paired_bootstrap_macro_f1` / ``paired_bootstrap_test``): both
systems are re-scored on the same resampled images, so image difficulty cancels out. For each
comparison it reports A's and B's macro F1, the difference A - B with its 95 % interval and a
two-sided p-value (identical predictions give difference 0 and p = 1).

A system is a checkpoint path (None = the shipped default) or another encoder's features given as
``"features.npy:index.csv"`` (see :func:`hemaclip.tasks.features.load_external_features`).
Comparisons made when both systems support them:

* ``zero_shot_class_macro_f1``: zero-shot prompt-ensemble classification (checkpoints only);
* ``head_class_macro_f1``: the supervised class head mapped onto the dataset's classes;
* ``zero_shot_attribute_mean_macro_f1`` / ``head_attribute_mean_macro_f1``: the mean over the 11
  WBCAtt attributes of the per-attribute macro F1 (images with attributes only);
* ``logistic_probe_macro_f1``: the logistic probe fitted on the train split (with `probes`).

Images are paired by resolved file path; only images both systems have are used. Macro F1 is
hemaclip's one macro F1 (:data:`hemaclip.metrics.classification.MACRO_F1_CONVENTION`) over the
task's label set: the prompt classes, the attribute's values, or the probes' classes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import hemaclip
from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.errors import DataError, HemaclipError
from hemaclip.io import write_json
from hemaclip.log import get_logger, logged_run, progress_level
from hemaclip.metrics.classification import encode_labels, macro_f1_codes
from hemaclip.metrics.statistics import paired_bootstrap_macro_f1, paired_bootstrap_test
from hemaclip_research.evaluate import (
    argmax_labels,
    cap_feature_set,
    check_split,
    head_class_predictions,
    prompt_vocabularies,
    relabel,
    resolve_class_map,
    split_records,
)
from hemaclip_research.report import Section, Table, write_report

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder
    from hemaclip.tasks.features import FeatureSet

__all__ = ["parse_system", "run_compare"]

logger = get_logger(__name__)

_FEATURE_SUFFIXES = (".npy", ".h5", ".hdf5")


@dataclass
class System:
    """One side of a comparison: a checkpoint or external features plus their index CSV."""

    spec: str
    kind: str  # "checkpoint" | "features"
    path: Path | None
    index_csv: Path | None = None


def parse_system(spec: str | Path | None) -> System:
    """A checkpoint path (None = shipped default) or ``"features.npy:index.csv"``."""
    if spec is None:
        return System("default checkpoint", "checkpoint", None)
    text = str(spec)
    if not Path(text).is_file() and ":" in text:
        left, right = text.rsplit(":", 1)
        if left.lower().endswith(_FEATURE_SUFFIXES):
            return System(text, "features", Path(left), Path(right))
    if text.lower().endswith(_FEATURE_SUFFIXES):
        raise HemaclipError(f"{text}: external features need their index CSV, as 'features.npy:index.csv'")
    return System(text, "checkpoint", Path(text))


@dataclass
class _Scored:
    """What one system produced on the evaluated images (rows aligned by path)."""

    name: str
    sha1: str
    keys: list[str]  # resolved paths of the eval rows
    eval_features: FeatureSet
    train_features: FeatureSet | None
    model: DualEncoder | None = None


def _key(p: str) -> str:
    return str(Path(p).resolve())


def _paired_macro(y: Sequence[str], a: Sequence[str], b: Sequence[str], labels: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    # Labels sorted: the order comparisons have always averaged classes in (the same numbers to the last bit).
    res = paired_bootstrap_macro_f1(list(y), list(a), list(b), sorted(labels), n_resamples=n_boot, seed=seed)
    res["n"] = int(len(y))
    return res


def _paired_attribute_mean(
    strata: Sequence[str],
    truth: Mapping[str, Sequence[str]],
    pred_a: Mapping[str, Sequence[str]],
    pred_b: Mapping[str, Sequence[str]],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Paired bootstrap of the mean over attributes of macro F1, resampling images stratified by class."""
    names = [n for n in ATTRIBUTE_NAMES if n in truth and n in pred_a and n in pred_b]
    cols_t, cols_a, cols_b, sizes = [], [], [], []
    for name in names:
        t, pa, n = encode_labels(truth[name], pred_a[name], sorted(ATTRIBUTES[name]))
        _, pb, _ = encode_labels(truth[name], pred_b[name], sorted(ATTRIBUTES[name]))
        cols_t.append(t)
        cols_a.append(pa)
        cols_b.append(pb)
        sizes.append(n)
    k = len(names)
    t_arr = np.array(cols_t, dtype=np.int64).T
    pack_a = np.concatenate([t_arr, np.array(cols_a, dtype=np.int64).T], axis=1)
    pack_b = np.concatenate([t_arr, np.array(cols_b, dtype=np.int64).T], axis=1)

    def metric(_strata: np.ndarray, packed: np.ndarray) -> float:
        return float(np.mean([macro_f1_codes(packed[:, j], packed[:, k + j], sizes[j]) for j in range(k)]))

    index = {c: i for i, c in enumerate(sorted(set(strata)))}
    y = np.array([index[v] for v in strata])
    res = paired_bootstrap_test(metric, y, pack_a, pack_b, n_resamples=n_boot, seed=seed)
    res["n"] = int(len(y))
    res["attributes"] = names
    return res


def _score_checkpoint(system: System, records: Mapping[str, Sequence[Any]], cache: dict[str, Any], batch_size: int,
                      device: str, progress: bool) -> _Scored:
    from hemaclip_research.evaluate import load_model_features
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.cache import file_sha1

    path = resolve_checkpoint(system.path)
    sha1 = file_sha1(path)
    if sha1 not in cache:
        model, _, _, sets = load_model_features(path, records, batch_size=batch_size, device=device, progress=progress)
        cache[sha1] = (model, sets)
    model, sets = cache[sha1]
    return _Scored(str(path), sha1, [_key(p) for p in sets["eval"].paths], sets["eval"], sets.get("train"), model)


def _score_features(system: System, split: str, max_per_class: int | None, seed: int) -> _Scored:
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.features import load_external_features

    fs = load_external_features(system.path, system.index_csv)
    eval_features = cap_feature_set(fs.by_split(split), max_per_class, seed)
    train_features = None if split in ("train", "all") else cap_feature_set(fs.by_split("train"), max_per_class, seed)
    return _Scored(system.spec, file_sha1(system.path), [_key(p) for p in eval_features.paths], eval_features, train_features)


def _align(a: _Scored, b: _Scored) -> None:
    """Restrict both systems to the images they share, in A's order."""
    pos_b = {k: i for i, k in enumerate(b.keys)}
    common = [i for i, k in enumerate(a.keys) if k in pos_b]
    if not common:
        raise DataError("the two systems share no evaluated image (images are paired by file path)")
    if len(common) != len(a.keys) or len(common) != len(b.keys):
        a.eval_features = a.eval_features.subset(np.array(common, dtype=np.int64))
        b.eval_features = b.eval_features.subset(np.array([pos_b[a.keys[i]] for i in common], dtype=np.int64))
        a.keys = [a.keys[i] for i in common]
        b.keys = list(a.keys)


@logged_run("compare")
def run_compare(
    a: Path | str | None,
    b: Path | str | None,
    dataset: str,
    split: str,
    out: Path,
    data_root: Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    *,
    folder: Path | None = None,
    max_per_class: int | None = None,
    probes: bool = True,
    prompts: Path | None = None,
    split_dir: Path | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Paired bootstrap comparison of systems `a` and `b` on `split` of `dataset`; writes into `out`.

    `a`/`b`: checkpoint paths (None = shipped default) or ``"features.npy:index.csv"``. Writes
    ``compare.json``, ``report.md`` and ``report.html`` and returns the compare dict: ``a``, ``b``
    (names and SHA-1), ``dataset``, ``split``, ``n_images``, ``comparisons`` ({name: {difference,
    low, high, p_value, metric_a, metric_b, n, ...}}), ``skipped`` ({name: reason}), ``n_boot``,
    ``seed``, ``seconds``. `max_per_class` caps images per class per split (quick runs, tests).
    For a folder dataset class names map onto prompt classes by identity.
    """
    t0 = time.perf_counter()
    check_split(split)
    if int(n_boot) < 1:
        raise HemaclipError(f"n_boot must be >= 1 for a paired test, got {n_boot}")
    level = progress_level(progress)

    def log(message: str) -> None:
        logger.log(level, "[%6.1fs] %s", time.perf_counter() - t0, message)

    sys_a, sys_b = parse_system(a), parse_system(b)
    needs_data = "checkpoint" in (sys_a.kind, sys_b.kind)
    prompt_set = prompt_dataset = prompt_classes = mapping = None
    records: dict[str, list[Any]] = {}
    if needs_data:
        from hemaclip.data.datasets import load_dataset
        from hemaclip.text.prompts import load_prompts

        log(f"loading dataset {dataset}")
        ds = load_dataset(dataset, data_root=data_root, split_dir=split_dir, seed=0, folder=folder)
        records["eval"] = split_records(ds, split, max_per_class, seed)
        if not records["eval"]:
            raise DataError(f"dataset '{dataset}' has no images in split '{split}'")
        if probes and split not in ("train", "all"):
            records["train"] = split_records(ds, "train", max_per_class, seed)
        prompt_set = load_prompts(prompts)
        vocab = prompt_vocabularies(prompt_set)
        if dataset == "folder":
            mapping = resolve_class_map(None, list(ds.classes), vocab)
            prompt_dataset, prompt_classes = mapping.prompt_dataset, list(mapping.targets)
        else:
            if dataset not in vocab:
                raise DataError(f"{prompt_set.source}: no prompts for dataset '{dataset}'")
            prompt_dataset, prompt_classes = dataset, list(vocab[dataset])
    cache: dict[str, Any] = {}
    scored = []
    for system in (sys_a, sys_b):
        log(f"scoring {system.spec}")
        if system.kind == "checkpoint":
            scored.append(_score_checkpoint(system, records, cache, batch_size, device, progress))
        else:
            scored.append(_score_features(system, split, max_per_class, seed))
    sa, sb = scored
    _align(sa, sb)
    n_images = len(sa.keys)

    comparisons: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    both_models = sa.model is not None and sb.model is not None
    labels = list(sa.eval_features.labels)

    if both_models:
        from hemaclip.models.text_cache import PooledTextCache
        from hemaclip.tasks.zero_shot import ZeroShotSetting, zero_shot_attributes, zero_shot_classes

        m = mapping.mapping if mapping is not None else None
        zs = []
        zsa = []
        for s in (sa, sb):
            cache_t = PooledTextCache(s.model.text)
            fs_zs = relabel(s.eval_features, m)
            res = zero_shot_classes(ZeroShotSetting(s.model, prompt_set, prompt_dataset, prompt_classes, cache_t), fs_zs)
            zs.append((res, fs_zs))
            if any(x is not None for x in s.eval_features.attributes):
                zsa.append(zero_shot_attributes(s.model, s.eval_features, prompt_set, text_cache=cache_t))
        (ra, fa), (rb, fb) = zs
        if len(ra["y_true"]) == 0:
            skipped["zero_shot_class_macro_f1"] = "no evaluated image has a prompt class"
        else:
            log("zero-shot classes")
            pa = argmax_labels(ra["logits"], ra["class_names"])
            pb = argmax_labels(rb["logits"], rb["class_names"])
            comparisons["zero_shot_class_macro_f1"] = _paired_macro(ra["y_true"], pa, pb, ra["class_names"], n_boot, seed)
            rows = np.asarray(ra["indices"])
            ha, why_a = head_class_predictions(fa, rows, ra["class_names"])
            hb, why_b = head_class_predictions(fb, rows, rb["class_names"])
            if ha is not None and hb is not None:
                comparisons["head_class_macro_f1"] = _paired_macro(ra["y_true"], ha, hb, ra["class_names"], n_boot, seed)
            else:
                skipped["head_class_macro_f1"] = f"A: {why_a or 'ok'}; B: {why_b or 'ok'}"
        if len(zsa) == 2:
            log("zero-shot attributes")
            annotated = list(next(iter(zsa[0].values()))["indices"])
            strata = [labels[i] for i in annotated]
            truth = {n: part["y_true"] for n, part in zsa[0].items()}
            pred_a = {n: argmax_labels(p["logits"], p["values"]) for n, p in zsa[0].items()}
            pred_b = {n: argmax_labels(p["logits"], p["values"]) for n, p in zsa[1].items()}
            if annotated:
                comparisons["zero_shot_attribute_mean_macro_f1"] = _paired_attribute_mean(
                    strata, truth, pred_a, pred_b, n_boot, seed)
                heads_a, heads_b = sa.eval_features.attribute_logits, sb.eval_features.attribute_logits
                if heads_a and heads_b:
                    idx = np.array(annotated, dtype=np.int64)
                    ha_pred, hb_pred = {}, {}
                    for name in ATTRIBUTE_NAMES:
                        va = (sa.eval_features.meta.get("attributes") or {}).get(name)
                        vb = (sb.eval_features.meta.get("attributes") or {}).get(name)
                        if name in heads_a and name in heads_b and va and vb:
                            ha_pred[name] = argmax_labels(heads_a[name][idx], list(va))
                            hb_pred[name] = argmax_labels(heads_b[name][idx], list(vb))
                    if ha_pred:
                        comparisons["head_attribute_mean_macro_f1"] = _paired_attribute_mean(
                            strata, {k: truth[k] for k in ha_pred}, ha_pred, hb_pred, n_boot, seed)
                else:
                    skipped["head_attribute_mean_macro_f1"] = "a system has no attribute heads"
        else:
            skipped["zero_shot_attribute_mean_macro_f1"] = "the evaluated images have no attribute annotations"
    else:
        skipped["zero_shot_class_macro_f1"] = "needs two checkpoints (external features have no text tower)"

    if probes:
        if sa.train_features is None or sb.train_features is None or not len(sa.train_features) or not len(sb.train_features):
            skipped["logistic_probe_macro_f1"] = "no train split to fit the probe on"
        else:
            from hemaclip.tasks.probes import run_probes

            log("logistic probes")
            pa = run_probes(sa.train_features, sa.eval_features, kinds=("logistic",), seed=seed)["logistic"]
            pb = run_probes(sb.train_features, sb.eval_features, kinds=("logistic",), seed=seed)["logistic"]
            probe_labels = sorted(set(pa["classes"]) | set(pb["classes"]))
            comparisons["logistic_probe_macro_f1"] = _paired_macro(pa["y_true"], pa["y_pred"], pb["y_pred"], probe_labels, n_boot, seed)
            comparisons["logistic_probe_macro_f1"]["n_train"] = [int(pa["n_train"]), int(pb["n_train"])]

    result = {
        "hemaclip_version": hemaclip.__version__,
        "a": {"name": sa.name, "sha1": sa.sha1, "kind": sys_a.kind},
        "b": {"name": sb.name, "sha1": sb.sha1, "kind": sys_b.kind},
        "checkpoint": f"A: {Path(sa.name).name} vs B: {Path(sb.name).name}",
        "dataset": dataset,
        "split": split,
        "n_images": int(n_images),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "max_per_class": max_per_class,
        "comparisons": comparisons,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if mapping is not None:
        result["unmapped_classes"] = sorted(mapping.unmapped)
    _write(Path(out), result)
    log("done")
    return result


def _write(out: Path, result: Mapping[str, Any]) -> None:
    rows = [
        [name.replace("_", " "), c["n"], c["metric_a"], c["metric_b"], (c["difference"], c["low"], c["high"]), c["p_value"]]
        for name, c in result["comparisons"].items()
    ]
    table = Table(["Comparison", "Images", "A", "B", "A − B [95 % CI]", "p"], rows,
                  caption=f"Paired bootstrap, {result['n_boot']} resamples stratified by class, seed {result['seed']}")
    overview = Table(["", "Value"], [
        ["A", f"{result['a']['name']} ({result['a']['kind']}, SHA-1 {result['a']['sha1'][:12]})"],
        ["B", f"{result['b']['name']} ({result['b']['kind']}, SHA-1 {result['b']['sha1'][:12]})"],
        ["Dataset / split", f"{result['dataset']} / {result['split']}"],
        ["Images (paired)", result["n_images"]],
    ])
    text = ("Both systems are scored on the same images; each bootstrap resample re-scores both on the same resampled "
            "images. p is two-sided (centred bootstrap); a small p and an interval excluding 0 indicate a difference "
            "beyond the resampling noise of this test set.")
    sections = [Section("Comparison", text, [overview, table])]
    if result["skipped"]:
        sections.append(Section("Not compared", "\n\n".join(f"{k}: {v}" for k, v in result["skipped"].items())))
    paths = write_report(out, f"hemaclip comparison: {result['dataset']} / {result['split']}", sections, result,
                         checkpoint=result["checkpoint"])
    # The comparison's numbers go to compare.json (write_report names its JSON metrics.json).
    write_json(out / "compare.json", _load_json(paths["metrics"]))
    paths["metrics"].unlink()


def _load_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))

