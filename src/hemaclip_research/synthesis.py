"""Judge synthetic cell images on three axes: fidelity, memorisation and downstream utility.

**Feature space.** Every distance here is measured on the *256-d L2-normalised image embedding*
of a hemaclip encoder (default: the shipped EfficientNet-Lite0 model), i.e. the space its
retrieval and probes use. Real and generated images go through the same path: 64 px uint8 ->
bicubic resize to the encoder's 128 px input -> embedding. Numbers are therefore *not* comparable
with Inception-based FID values from the literature; for scale, each table carries a
real-vs-real baseline (test split against train split) computed the same way.

* **Fidelity**: FID (Fréchet distance of Gaussians fitted to the two feature sets), KID (unbiased
  squared MMD with the cubic polynomial kernel, averaged over random subsets; Bińkowski et al. 2018),
  and precision/recall of the generated distribution by the k-NN manifold method (Kynkäänniemi et
  al. 2019): precision = share of generated samples inside the real manifold (the union of balls
  around real points with radius = distance to their k-th real neighbour), recall = the reverse.
* **Memorisation**: the distance from each generated image to its nearest real *training* image,
  against the same distance from real *test* images (which the GAN never saw). A generator that
  copies its training set has many generated images much closer to a training image than any
  test image is.
* **Utility**: macro F1 on the real test split of a probe trained on frozen embeddings, with one
  class made rare on purpose, for real data only, real + synthetic, synthetic only, random
  oversampling and a class-weighted loss (paired bootstrap tests between them).
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.data.datasets import CellRecord
from hemaclip.errors import HemaclipError
from hemaclip.io import display_path
from hemaclip.log import logged_run
from hemaclip.metrics.generative import PR_K, fid, kid, nearest_real, precision_recall

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = ["evaluate_synthesis", "utility_arms"]

N_RESAMPLES = 2000
EMBED_SIZE = 64  # images are compared at the GAN's resolution; the encoder upsamples to its input
GRID_COLS = 8


# ------------------------------------------------------------------------------------------------
# Utility arms (probes on frozen embeddings)
# ------------------------------------------------------------------------------------------------


def _fit_predict(kind: str, X: np.ndarray, y: np.ndarray, Xte: np.ndarray, weighted: bool, seed: int) -> np.ndarray:
    """Logistic regression (C = 1, as the probes) or the probes' MLP; `weighted` = balanced class weights.

    Features are L2-normalised first, as in `hemaclip.tasks.probes`.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.utils.class_weight import compute_sample_weight

    from hemaclip.tasks.probes import LOGISTIC_C, LOGISTIC_MAX_ITER, MLP_HIDDEN, MLP_MAX_ITER

    X, Xte = X / np.linalg.norm(X, axis=1, keepdims=True), Xte / np.linalg.norm(Xte, axis=1, keepdims=True)
    weights = compute_sample_weight("balanced", y) if weighted else None
    if kind == "logistic":
        clf = LogisticRegression(C=LOGISTIC_C, max_iter=LOGISTIC_MAX_ITER)
    elif kind == "mlp":
        # early stopping on a stratified 10 % of the training rows (as the probes do for large sets)
        clf = MLPClassifier(hidden_layer_sizes=MLP_HIDDEN, max_iter=MLP_MAX_ITER, random_state=seed, early_stopping=True)
    else:
        raise HemaclipError(f"unknown utility classifier '{kind}' (logistic or mlp)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y, sample_weight=weights)
    return clf.predict(Xte)


def _oversample(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices that repeat rows of each class at random until every class has the largest count."""
    target = max(np.bincount(y))
    parts = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        extra = rng.choice(members, target - len(members), replace=True) if target > len(members) else np.empty(0, int)
        parts += [members, extra]
    return np.concatenate(parts)


def utility_arms(
    X_real: np.ndarray,
    y_real: np.ndarray,
    X_synth: np.ndarray,
    y_synth: np.ndarray,
    X_test: np.ndarray,
    n_classes: int,
    seed: int,
    kind: str = "logistic",
    X_full: np.ndarray | None = None,
    y_full: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Test-set predictions of each training recipe (one seed). Synthetic rows are drawn per seed.

    * ``real``: the (reduced) real train set as is;
    * ``real+gan``: every class topped up to the largest class with synthetic images of that class;
    * ``gan-only``: only synthetic images, the largest class count for every class;
    * ``oversample``: real rows repeated at random up to the largest class count;
    * ``class-weighted``: real rows, loss weights inversely proportional to class frequency;
    * ``real-full`` (if `X_full` is given): the unreduced real train set (the ceiling).
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(y_real, minlength=n_classes)
    target = int(counts.max())
    fill = []
    only = []
    for c in range(n_classes):
        pool = np.flatnonzero(y_synth == c)
        need = target - counts[c]
        if need > len(pool) or target > len(pool):
            raise HemaclipError(f"need {max(need, target)} synthetic images of class {c}, have {len(pool)}")
        perm = rng.permutation(pool)
        fill.append(perm[:need])
        only.append(perm[:target])
    fill_idx, only_idx = np.concatenate(fill), np.concatenate(only)
    over = _oversample(y_real, rng)
    preds = {
        "real": _fit_predict(kind, X_real, y_real, X_test, False, seed),
        "real+gan": _fit_predict(kind, np.vstack([X_real, X_synth[fill_idx]]), np.concatenate([y_real, y_synth[fill_idx]]), X_test, False, seed),
        "gan-only": _fit_predict(kind, X_synth[only_idx], y_synth[only_idx], X_test, False, seed),
        "oversample": _fit_predict(kind, X_real[over], y_real[over], X_test, False, seed),
        "class-weighted": _fit_predict(kind, X_real, y_real, X_test, True, seed),
    }
    if X_full is not None and y_full is not None:
        preds["real-full"] = _fit_predict(kind, X_full, y_full, X_test, False, seed)
    return preds


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def _plot_distance_histograms(out: Path, series: Mapping[str, np.ndarray], title: str) -> Path:
    from hemaclip_research.plots import _new_figure, _save

    fig = _new_figure(6.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    values = np.concatenate([np.asarray(v) for v in series.values()])
    bins = np.linspace(0.0, float(values.max()) * 1.02 + 1e-9, 40)
    for name, v in series.items():
        ax.hist(v, bins=bins, density=True, alpha=0.5, label=f"{name} (n={len(v)}, median {np.median(v):.3f})")
    ax.set_xlabel("distance to the nearest real training image (256-d embedding)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out)


def _plot_pairs(out: Path, generated: np.ndarray, real: np.ndarray, distances: np.ndarray, labels: Sequence[str]) -> Path:
    from hemaclip_research.plots import _new_figure, _save

    n = len(generated)
    fig = _new_figure(1.3 * n, 3.0)
    for i in range(n):
        for row, (image, what) in enumerate(((generated[i], "generated"), (real[i], "nearest train"))):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(what, fontsize=8)
            if row == 0:
                ax.set_title(f"{labels[i]}\nd={distances[i]:.3f}", fontsize=7)
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------
# The whole evaluation
# ------------------------------------------------------------------------------------------------


def _embed(model: DualEncoder, images: np.ndarray, progress: bool) -> np.ndarray:
    from hemaclip.models.inference import image_outputs

    return image_outputs(model, np.asarray(images), batch_size=128, progress=progress)["features"].numpy().astype(np.float64)


def _real_set(records: Sequence[CellRecord], classes: Sequence[str], progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from hemaclip.data.image_cache import decoded_images

    images = decoded_images([r.path for r in records], EMBED_SIZE, progress=progress)
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray(images), np.array([index[r.label] for r in records])


def _fidelity(train_f: np.ndarray, y_train: np.ndarray, test_f: np.ndarray, y_test: np.ndarray, gen_f: np.ndarray, y_gen: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """FID/KID/P&R of generated vs train, beside test vs train, overall and per class.

    The generated set is cut to the test split's count per class, so FID's sample-size bias is
    the same for the synthetic and the real-vs-real row.
    """
    matched = np.concatenate([np.flatnonzero(y_gen == c)[: int(np.sum(y_test == c))] for c in range(len(classes))])
    rows: dict[str, Any] = {}
    groups = [("all classes", None)] + [(c, i) for i, c in enumerate(classes)]
    for name, c in groups:
        tr = train_f if c is None else train_f[y_train == c]
        te = test_f if c is None else test_f[y_test == c]
        ge = gen_f[matched] if c is None else gen_f[matched][y_gen[matched] == c]
        rows[name] = {
            "n_train": int(len(tr)),
            "n_compared": int(len(te)),
            "fid_generated": fid(ge, tr),
            "fid_test_baseline": fid(te, tr),
            "kid_generated": kid(ge, tr),
            "kid_test_baseline": kid(te, tr),
            "pr_generated": precision_recall(tr, ge),
            "pr_test_baseline": precision_recall(tr, te),
        }
    return rows


@logged_run("synth evaluate")
def evaluate_synthesis(
    checkpoint: Path,
    out: Path,
    *,
    utility_checkpoint: Path | None = None,
    encoder: Path | None = None,
    data_root: Path | None = None,
    seeds: int = 3,
    command: str = "",
    note: str = "",
    progress: bool = True,
) -> dict[str, Path]:
    """Run all three axes and write ``report.md``, ``report.html``, ``metrics.json`` and figures to `out`."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip_research.report import Section, Table, write_report
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.models.gan import load_generator
    from hemaclip.tasks.synthesis import sample_images
    from hemaclip.train.gan import image_grid, write_png

    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    show = progress and sys.stderr.isatty()
    generator, state = load_generator(checkpoint)
    if state.extra.get("reduce"):
        raise HemaclipError(f"{checkpoint}: this GAN was trained on a reduced train split; pass it as --utility-checkpoint")
    classes = list(state.classes)
    if generator.config.image_size != EMBED_SIZE:
        raise HemaclipError(f"{checkpoint}: evaluation compares images at {EMBED_SIZE} px, this GAN makes {generator.config.image_size} px")
    encoder_path = resolve_checkpoint(encoder)
    model, _ = load_for_inference(encoder_path)
    ds = load_dataset(state.dataset, data_root)
    if list(ds.classes) != classes:
        raise HemaclipError(f"{checkpoint}: GAN classes {classes} differ from dataset '{state.dataset}' classes {list(ds.classes)}")
    train_recs, test_recs = ds.split("train"), ds.split("test")
    train_img, y_train = _real_set(train_recs, classes, progress)
    test_img, y_test = _real_set(test_recs, classes, progress)
    train_f, test_f = _embed(model, train_img, show), _embed(model, test_img, show)

    # ---- fidelity: generated set with the train split's class counts ------------------------
    counts = {c: int(np.sum(y_train == i)) for i, c in enumerate(classes)}
    gen_img, gen_labels = sample_images(generator, classes, counts, seed=1)
    y_gen = np.array([classes.index(c) for c in gen_labels])
    gen_f = _embed(model, gen_img, show)
    fidelity = _fidelity(train_f, y_train, test_f, y_test, gen_f, y_gen, classes)

    figures_grids = []
    for i, c in enumerate(classes):
        real_rows = train_img[y_train == i][:GRID_COLS]
        fake_rows = gen_img[y_gen == i][: 5 * GRID_COLS]
        grid = image_grid(np.concatenate([real_rows, fake_rows]), 6, GRID_COLS)
        figures_grids.append((write_png(out / f"grid_{c}.png", grid), f"{c}: top row real training images (64 px), five rows generated"))

    # ---- memorisation -----------------------------------------------------------------------
    d_gen, nn_gen = nearest_real(gen_f, train_f)
    d_test, _ = nearest_real(test_f, train_f)
    hist = _plot_distance_histograms(out / "memorisation_hist.png", {"generated -> train": d_gen, "real test -> train": d_test}, "Nearest real training image")
    order = np.argsort(d_gen)[:GRID_COLS]
    pairs = _plot_pairs(out / "memorisation_pairs.png", gen_img[order], train_img[nn_gen[order]], d_gen[order], [classes[y_gen[i]] for i in order])
    q01, q05 = np.quantile(d_test, [0.01, 0.05])
    memorisation = {
        "generated_to_train": {"n": int(len(d_gen)), "min": float(d_gen.min()), "median": float(np.median(d_gen)), "mean": float(d_gen.mean())},
        "test_to_train": {"n": int(len(d_test)), "min": float(d_test.min()), "median": float(np.median(d_test)), "mean": float(d_test.mean())},
        "share_generated_below_test_q01": float(np.mean(d_gen < q01)),
        "share_generated_below_test_q05": float(np.mean(d_gen < q05)),
        "test_q01": float(q01),
        "test_q05": float(q05),
        "distinct_nearest_train_images": int(len(np.unique(nn_gen))),
    }

    metrics: dict[str, Any] = {
        "command": command,
        "gan_checkpoint": str(checkpoint),
        "dataset": state.dataset,
        "classes": classes,
        "gan_training": {k: state.extra.get(k) for k in ("step", "total_steps", "status", "train_counts", "parameters")},
        "feature_space": "256-d L2-normalised image embedding of the encoder; 64 px images resized (bicubic) to its 128 px input",
        "encoder": display_path(encoder_path),
        "note": note,
        "fidelity": fidelity,
        "memorisation": memorisation,
    }
    sections = [
        Section(
            "What was evaluated",
            f"GAN checkpoint {checkpoint} (dataset '{state.dataset}', {state.extra.get('step')} of {state.extra.get('total_steps')} "
            f"planned steps, status '{state.extra.get('status')}'; generator {state.extra.get('parameters', {}).get('generator')} "
            f"parameters, discriminator {state.extra.get('parameters', {}).get('discriminator')}).\n\n"
            f"Feature space: the 256-d L2-normalised image embedding of {encoder_path.name}; real and generated images are both "
            f"{EMBED_SIZE} px and resized to the encoder's 128 px input the same way. FID values here are not comparable with "
            "Inception-based FID in the literature; compare them with the real-vs-real row (test split against train split).\n\n"
            f"Command: {command}" + (f"\n\nNote: {note}" if note else ""),
        )
    ]
    fid_rows = []
    for name, row in fidelity.items():
        fid_rows.append([
            name, row["n_train"], row["n_compared"], row["fid_generated"], row["fid_test_baseline"],
            f"{1e3 * row['kid_generated']['mean']:.3f} ± {1e3 * row['kid_generated']['std']:.3f}",
            f"{1e3 * row['kid_test_baseline']['mean']:.3f} ± {1e3 * row['kid_test_baseline']['std']:.3f}",
            row["pr_generated"]["precision"], row["pr_generated"]["recall"],
            row["pr_test_baseline"]["precision"], row["pr_test_baseline"]["recall"],
        ])
    sections.append(
        Section(
            "Fidelity: FID, KID, precision and recall",
            "Each generated set is compared with the real train split, and so is the real test split (the baseline: what two "
            "real samples of the same distribution score). The generated set is cut to the test split's size per class so both "
            "FIDs carry the same sample-size bias. KID: mean ± sd of the unbiased MMD² over 100 subsets. Precision/recall: "
            f"k-NN manifolds with k = {PR_K} (precision = share of generated images inside the real manifold; recall = share of "
            "real images inside the generated manifold).",
            tables=[Table(
                ["Class", "Train", "Compared", "FID gen", "FID test (real)", "KID×10³ gen", "KID×10³ test (real)", "Precision gen", "Recall gen", "Precision test", "Recall test"],
                fid_rows,
                caption="Generated vs real train, beside real test vs real train",
            )],
            figures=figures_grids,
        )
    )
    sections.append(
        Section(
            "Memorisation",
            f"For each of the {len(d_gen)} generated images, the distance to its nearest real training image; for the "
            f"{len(d_test)} real test images, the same distance. Median: generated {memorisation['generated_to_train']['median']:.3f}, "
            f"real test {memorisation['test_to_train']['median']:.3f}. Share of generated images closer to a training image than "
            f"the closest 1 % / 5 % of test images: {memorisation['share_generated_below_test_q01']:.3f} / "
            f"{memorisation['share_generated_below_test_q05']:.3f} (a copying generator would show far more than 0.01 / 0.05). "
            f"The generated images' nearest neighbours are {memorisation['distinct_nearest_train_images']} distinct training images.",
            figures=[(hist, "Distance to the nearest real training image: generated vs real test."),
                     (pairs, "The eight generated images closest to a training image (top) and that training image (bottom).")],
        )
    )

    # ---- utility ----------------------------------------------------------------------------
    if utility_checkpoint is not None:
        utility, util_sections = _utility(
            utility_checkpoint, state.dataset, classes, train_recs, train_f, y_train, test_f, y_test, model, seeds, out, show,
            data_root,
        )
        metrics["utility"] = utility
        sections += util_sections
    metrics["seconds"] = round(time.monotonic() - started, 1)
    metrics["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return write_report(out, f"Synthetic cells ({state.dataset}): fidelity, memorisation, utility", sections, metrics, checkpoint=checkpoint)


ARM_LABELS = {
    "real-full": "real, full train split (ceiling, no reduction)",
    "real": "real, reduced",
    "real+gan": "real + GAN images (each class topped up to the largest)",
    "gan-only": "GAN images only (balanced)",
    "oversample": "real + random oversampling",
    "class-weighted": "real, class-weighted loss",
}
COMPARISONS = (("real+gan", "real"), ("real+gan", "oversample"), ("real+gan", "class-weighted"), ("gan-only", "real"), ("oversample", "real"), ("class-weighted", "real"))


def _utility(
    utility_checkpoint: Path, dataset: str, classes: list[str], train_recs: list[CellRecord], train_f: np.ndarray, y_train: np.ndarray,
    test_f: np.ndarray, y_test: np.ndarray, model: DualEncoder, seeds: int, out: Path, show: bool, data_root: Path | None,
) -> tuple[dict[str, Any], list[Any]]:
    from hemaclip_research.report import Section, Table
    from hemaclip.metrics.classification import class_f1
    from hemaclip.metrics.statistics import bootstrap_macro_f1, paired_bootstrap_macro_f1
    from hemaclip.models.gan import load_generator
    from hemaclip.tasks.synthesis import sample_images
    from hemaclip.train.gan import image_grid, reduce_records, write_png

    generator, ustate = load_generator(utility_checkpoint, dataset=dataset)
    reduce = ustate.extra.get("reduce") or {}
    if not reduce:
        raise HemaclipError(f"{utility_checkpoint}: this GAN was not trained with --reduce; the utility check needs one that was")
    if list(ustate.classes) != classes:
        raise HemaclipError(f"{utility_checkpoint}: classes differ from the fidelity GAN's")
    seed = int(ustate.extra["train_config"].get("seed", 0))
    kept = reduce_records(train_recs, reduce, seed)
    kept_paths = {r.path for r in kept}
    mask = np.array([r.path in kept_paths for r in train_recs])
    X_red, y_red = train_f[mask], y_train[mask]
    counts = np.bincount(y_red, minlength=len(classes))
    per_class = int(counts.max())
    syn_img, syn_labels = sample_images(generator, classes, {c: per_class for c in classes}, seed=2)
    y_syn = np.array([classes.index(c) for c in syn_labels])
    syn_f = _embed(model, syn_img, show)

    rare = [classes.index(c) for c in reduce]
    results: dict[str, Any] = {
        "gan_checkpoint": str(utility_checkpoint),
        "reduce": reduce,
        "train_counts_reduced": {c: int(n) for c, n in zip(classes, counts)},
        "synthetic_per_class": per_class,
        "gan_training": {k: ustate.extra.get(k) for k in ("step", "total_steps", "status", "train_counts")},
        "seeds": int(seeds),
        "classifiers": {},
    }
    # How far are the rare class's synthetic images from the real images of that class the GAN never saw?
    held = ~mask
    rare_rows = {}
    for r in rare:
        held_r = held & (y_train == r)
        seen_r = mask & (y_train == r)
        g = syn_f[y_syn == r][: int(held_r.sum())]
        d_gen, _ = nearest_real(g, train_f[seen_r])
        d_held, _ = nearest_real(train_f[held_r], train_f[seen_r])
        rare_rows[classes[r]] = {
            "gan_train_images": int(seen_r.sum()),
            "held_out_real_images": int(held_r.sum()),
            "fid_generated_vs_held_out": fid(g, train_f[held_r]),
            "fid_seen_vs_held_out": fid(train_f[seen_r], train_f[held_r]) if seen_r.sum() > 2 else None,
            "kid_generated_vs_held_out": kid(g, train_f[held_r]),
            "nn_distance_generated_to_seen_median": float(np.median(d_gen)),
            "nn_distance_held_out_to_seen_median": float(np.median(d_held)),
        }
        grid = image_grid(np.concatenate([np.asarray(syn_img)[y_syn == r][: 4 * GRID_COLS]]), 4, GRID_COLS)
        write_png(out / f"utility_grid_{classes[r]}.png", grid)
    results["rare_class_fidelity"] = rare_rows

    sections = []
    for kind in ("logistic", "mlp"):
        per_seed: dict[str, list[np.ndarray]] = {}
        for s in range(seeds):
            preds = utility_arms(X_red, y_red, syn_f, y_syn, test_f, len(classes), seed=s, kind=kind, X_full=train_f, y_full=y_train)
            for arm, p in preds.items():
                per_seed.setdefault(arm, []).append(p)
        arm_rows = {}
        for arm, plist in per_seed.items():
            f1s = [bootstrap_macro_f1(y_test, p, len(classes), n_resamples=N_RESAMPLES, seed=0) for p in plist]
            rare_f1 = {classes[r]: [float(class_f1(y_test, p, r)) for p in plist] for r in rare}
            arm_rows[arm] = {
                "macro_f1_seed0": f1s[0],
                "macro_f1_per_seed": [f["point"] for f in f1s],
                "macro_f1_mean": float(np.mean([f["point"] for f in f1s])),
                "macro_f1_sd": float(np.std([f["point"] for f in f1s])),
                "rare_class_f1_per_seed": rare_f1,
            }
        tests = {}
        for a, b in COMPARISONS:
            tests[f"{a} vs {b}"] = [
                paired_bootstrap_macro_f1(y_test, per_seed[a][s], per_seed[b][s], len(classes), n_resamples=N_RESAMPLES, seed=0) for s in range(seeds)
            ]
        results["classifiers"][kind] = {"arms": arm_rows, "paired_tests": tests}
        rows = []
        for arm in ("real-full", "real", "real+gan", "gan-only", "oversample", "class-weighted"):
            r = arm_rows[arm]
            rows.append([ARM_LABELS[arm], r["macro_f1_seed0"], f"{r['macro_f1_mean']:.3f} ± {r['macro_f1_sd']:.3f}",
                         *[f"{np.mean(v):.3f}" for v in r["rare_class_f1_per_seed"].values()]])
        test_rows = []
        for name, lst in tests.items():
            test_rows.append([name, lst[0]["difference"], (lst[0]["difference"], lst[0]["low"], lst[0]["high"]), lst[0]["p_value"],
                              f"{sum(t['difference'] > 0 and t['high'] > 0 and t['low'] > 0 for t in lst)}/{len(lst)} up, "
                              f"{sum(t['high'] < 0 for t in lst)}/{len(lst)} down"])
        results["classifiers"][kind]["table"] = rows
        verdict = []
        for baseline in ("real", "oversample", "class-weighted"):
            lst = tests[f"real+gan vs {baseline}"]
            better = sum(t["low"] > 0 for t in lst)
            worse = sum(t["high"] < 0 for t in lst)
            mean_diff = float(np.mean([t["difference"] for t in lst]))
            word = "beat" if better == len(lst) else ("lost to" if worse == len(lst) else "did not clearly differ from")
            verdict.append(f"GAN balancing {word} '{ARM_LABELS[baseline]}' (mean Δ macro F1 {mean_diff:+.3f}; interval above 0 in "
                           f"{better}/{len(lst)} seeds, below 0 in {worse}/{len(lst)}).")
        results["classifiers"][kind]["verdict"] = verdict
        sections.append(Section(
            f"Utility: {kind} classifier on frozen embeddings",
            f"Train split with {', '.join(f'{c} cut to {int(counts[classes.index(c)])} images ({100 * f:.0f} %)' for c, f in reduce.items())}; "
            f"the utility GAN ({utility_checkpoint}) was trained on that reduced split only. Test: the real test split "
            f"({len(y_test)} images). Randomised arms (which synthetic images, which rows repeated, MLP initialisation) were "
            f"repeated over {seeds} seeds; the interval column is seed 0 with its 95 % stratified bootstrap interval.\n\n"
            + "Verdict (paired bootstrap of macro F1, per seed): " + " ".join(verdict),
            tables=[
                Table(["Training data", "Macro F1 (seed 0)", f"Macro F1 mean ± sd ({seeds} seeds)", *[f"F1 {classes[r]} (mean)" for r in rare]], rows,
                      caption=f"{kind}: macro F1 on the real test split"),
                Table(["Comparison", "Δ macro F1 (seed 0)", "Δ with 95 % interval", "p (seed 0)", "significant over seeds (interval excludes 0)"], test_rows,
                      caption=f"{kind}: paired bootstrap tests ({N_RESAMPLES} resamples, stratified)"),
            ],
        ))
    rare_table = Table(
        ["Class", "GAN train images", "Held-out real", "FID gen vs held-out", "FID seen real vs held-out", "KID×10³ gen vs held-out",
         "median NN dist gen→seen", "median NN dist held-out→seen"],
        [[c, v["gan_train_images"], v["held_out_real_images"], v["fid_generated_vs_held_out"], v["fid_seen_vs_held_out"],
          f"{1e3 * v['kid_generated_vs_held_out']['mean']:.3f}", v["nn_distance_generated_to_seen_median"], v["nn_distance_held_out_to_seen_median"]]
         for c, v in rare_rows.items()],
        caption="The rare class: synthetic images against the real images of that class the utility GAN never saw",
    )
    sections.insert(0, Section(
        "Utility GAN: the rare class",
        "The train images removed from the rare class are real images the utility GAN never saw: they measure how well its "
        "samples match the class beyond the few it was shown, and whether samples sit closer to the seen images than unseen "
        "real ones do (a sign of copying).",
        tables=[rare_table],
        figures=[(out / f"utility_grid_{classes[r]}.png", f"Utility GAN samples of '{classes[r]}'") for r in rare],
    ))
    return results, sections
