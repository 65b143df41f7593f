"""Score LVLM runs (``hemaclip lvlm run``) beside hemaclip's `describe` on the same saved cells, and write
the report (``hemaclip lvlm report``).

For every protocol and every system (each LVLM run; hemaclip on the run's own sample):

* **Classification**: weighted and macro F1 with a 95 % stratified bootstrap interval and, as the audit
  reports them, mean ± sd over 5 stratified folds of the sample; accuracy; the confusion matrix. An answer
  that cannot be read is a wrong prediction of its own, ``(unparseable)``: counted, shown, never dropped.
  Cells without an answer (the request failed or was never sent) are not scored; their count is shown.
* **Answer distribution**: how often each label was answered (the audit found models default to a few).
* **Confidence**: the stated certainty (explain protocol, 1-5) or hemaclip's calibrated probability,
  against correctness: point-biserial correlation and AUROC.
* **Feature importance** (features protocol): mean points per feature, for right and wrong answers.
* **Faithfulness**: each justification (explain protocol) and each hemaclip sentence is read into WBCAtt
  attribute statements by the one statement parser (:func:`hemaclip.text.captions.parse_caption`); parse
  coverage; agreement with the cell's WBCAtt annotation; agreement with the predicted class's textbook
  values; and the textbook test on wrong answers (:mod:`hemaclip_research.faithfulness`, the same test
  the `evaluate` report runs on describe's sentences).
* **Parser validation**: hemaclip's own sentences must be read back exactly; hand-written paraphrases
  (``configs/lvlm/paraphrases.yaml``) give the parser's precision and recall on text it was not written for.

The audit's numbers are QUOTED (Buck et al. 2025), never recomputed: their cells, class set (11 PBC
labels) and image size differ from this sample.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES, PBC_CLASSES
from hemaclip.errors import DataError, HemaclipError
from hemaclip.log import get_logger, run_log
from hemaclip.metrics.calibration import confidence_auroc, confidence_correctness_correlation
from hemaclip.metrics.summary import classification_metrics, fold_scores
from hemaclip_research import faithfulness as fa
from hemaclip_research.report import Section, Table, write_report
from hemaclip.tasks.lvlm.protocols import FEATURES, LABEL_NAMES, PROTOCOLS, SCRIPTED_FINGERPRINT, parse_answer
from hemaclip.tasks.lvlm.runner import RUN_JSON, SAMPLE_CSV, Cell, read_answers, read_cells
from hemaclip.tasks.probes import GPT4O_FEW_SHOT_WEIGHTED_F1, GPT4O_ZERO_SHOT_WEIGHTED_F1
from hemaclip.text.captions import parse_caption

__all__ = [
    "QUOTED", "UNPARSEABLE", "Scored", "classification_block", "confidence_block", "faithfulness_block",
    "feature_block", "parser_validation", "score_answers", "write_lvlm_report",
]

log = get_logger(__name__)
UNPARSEABLE = "(unparseable)"
HEMACLIP = "hemaclip describe"
QUOTED: dict[str, Any] = {
    "source": "Buck M., Dasdelen M. F., Goetze K., Kukuljan I., Marr C., Schaefer J., 'Domain specific models outperform "
              "large vision language models on cytomorphology tasks', medRxiv 2025.05.05.25326989",
    "note": "QUOTED from the publication, not reproduced here: their 50 cells per class, 11 PBC labels and image size "
            "differ from this sample, so the rows are context, not a paired comparison",
    "weighted_f1": {"zero-shot": (GPT4O_ZERO_SHOT_WEIGHTED_F1, 0.02), "few-shot": (GPT4O_FEW_SHOT_WEIGHTED_F1, 0.03)},
    "confidence_correlation": {"GPT-4o": 0.03, "GPT-4o fine-tuned": 0.20},
    "misclassified_explanations_poor": 0.30,
}


# ------------------------------------------------------------------------------------------------ #
# one system's answers
# ------------------------------------------------------------------------------------------------ #


class Scored:
    """The answers of one system to one protocol on a sample, aligned with its cells.

    `predicted[i]` is a label, :data:`UNPARSEABLE`, or None (no answer: failed or not sent);
    `confidence[i]` a number or None; `texts[i]` the justification or sentence to read (None: none);
    `features[i]` the feature points (features protocol)."""

    def __init__(self, name: str, protocol: str, cells: Sequence[Cell], predicted: Sequence[str | None],
                 confidence: Sequence[float | None] | None = None, texts: Sequence[str | None] | None = None,
                 features: Sequence[Mapping[str, float] | None] | None = None, scripted: bool = False,
                 failed: int = 0, not_sent: int = 0) -> None:
        self.name, self.protocol, self.cells = name, protocol, list(cells)
        self.predicted = list(predicted)
        self.confidence = list(confidence) if confidence is not None else None
        self.texts = list(texts) if texts is not None else None
        self.features = list(features) if features is not None else None
        self.scripted, self.failed, self.not_sent = scripted, failed, not_sent

    @property
    def answered(self) -> list[int]:
        return [i for i, p in enumerate(self.predicted) if p is not None]


def score_answers(folder: str | Path, protocol: str, cells: Sequence[Cell]) -> Scored:
    """Read (and parse again, so a better parser needs no new request) the answers of one protocol of a run."""
    rows = read_answers(folder, protocol)
    by_index = {int(r["index"]): r for r in rows}
    predicted: list[str | None] = []
    confidence: list[float | None] = []
    texts: list[str | None] = []
    features: list[Mapping[str, float] | None] = []
    scripted = False
    failed = not_sent = 0
    for cell in cells:
        row = by_index.get(cell.index)
        if row is None or row.get("status") != "answered":
            status = (row or {}).get("status", "not_sent")
            failed += status == "failed"
            not_sent += status != "failed"
            predicted.append(None)
            confidence.append(None)
            texts.append(None)
            features.append(None)
            continue
        scripted = scripted or row.get("system_fingerprint") == SCRIPTED_FINGERPRINT
        answer = parse_answer(protocol, row.get("content"))
        predicted.append(answer.label if answer.label is not None else UNPARSEABLE)
        confidence.append(float(answer.certainty) if answer.certainty is not None else None)
        texts.append(answer.justification if protocol == "explain" else None)
        features.append(dict(answer.features) if answer.features is not None else None)
    meta = _run_meta(folder)
    return Scored(f"{meta.get('model', Path(folder).name)} ({Path(folder).name})", protocol, cells, predicted,
                  confidence if protocol == "explain" else None, texts if protocol == "explain" else None,
                  features if protocol == "features" else None, scripted, failed, not_sent)


def _run_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RUN_JSON
    if not path.is_file():
        raise DataError(f"{folder}: not an LVLM run folder (no {RUN_JSON}; run `hemaclip lvlm run` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: not a valid run file ({err})") from None


# ------------------------------------------------------------------------------------------------ #
# blocks of numbers
# ------------------------------------------------------------------------------------------------ #


def classification_block(scored: Scored, labels: Sequence[str] = PBC_CLASSES, n_boot: int = 2000, seed: int = 0,
                         n_folds: int = 5) -> dict[str, Any] | None:
    """Weighted/macro F1 (bootstrap interval and 5-fold mean ± sd), accuracy, confusion, answer distribution."""
    rows = scored.answered
    if not rows:
        return None
    y_true = [scored.cells[i].label for i in rows]
    y_pred = [str(scored.predicted[i]) for i in rows]
    metrics = classification_metrics(y_true, y_pred, labels, n_boot=n_boot, seed=seed,
                                     cis=("accuracy", "macro_f1", "weighted_f1"))
    counts = Counter(y_pred)
    top2 = sum(c for _, c in counts.most_common(2)) / len(y_pred)
    return {
        "n_cells": len(scored.cells), "n_scored": len(rows), "n_unparseable": counts.get(UNPARSEABLE, 0),
        "n_failed": scored.failed, "n_not_sent": scored.not_sent,
        "weighted_f1": metrics["weighted_f1"], "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"],
        "folds": fold_scores(y_true, y_pred, labels, n_folds) if len(rows) >= n_folds else None,
        "per_class": metrics["per_class"], "confusion_labels": metrics["confusion_labels"],
        "confusion_matrix": metrics["confusion_matrix"],
        "answer_counts": {label: counts.get(label, 0) for label in [*labels, UNPARSEABLE]},
        "top2_answer_share": top2, "distinct_answers": len([k for k in counts if k != UNPARSEABLE]),
    }


def confidence_block(scored: Scored) -> dict[str, Any] | None:
    """Correlation and AUROC of confidence for correctness, on cells with a readable label and a confidence."""
    if scored.confidence is None:
        return None
    rows = [i for i in scored.answered if scored.predicted[i] != UNPARSEABLE and scored.confidence[i] is not None]
    missing = len([i for i in scored.answered if scored.confidence[i] is None])
    if not rows:
        return {"n": 0, "n_without_confidence": missing, "correlation": None, "auroc": None}
    conf = np.array([scored.confidence[i] for i in rows], dtype=np.float64)
    correct = np.array([scored.predicted[i] == scored.cells[i].label for i in rows])

    def finite(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    return {
        "n": len(rows), "n_without_confidence": missing,
        "correlation": finite(confidence_correctness_correlation(conf, correct)),
        "auroc": finite(confidence_auroc(conf, correct)),
        "mean_when_right": float(conf[correct].mean()) if correct.any() else None,
        "mean_when_wrong": float(conf[~correct].mean()) if (~correct).any() else None,
        "accuracy": float(correct.mean()),
    }


def feature_block(scored: Scored) -> dict[str, Any] | None:
    """Mean (and sd) points per feature over answers that give any, overall and for right and wrong labels;
    how many answers spread exactly 100 points (±1)."""
    if scored.features is None:
        return None
    rows = [i for i in scored.answered if scored.features[i]]
    keys = list(FEATURES)
    out: dict[str, Any] = {"n_answers": len(scored.answered), "n_with_features": len(rows)}
    if not rows:
        return out
    points = np.array([[scored.features[i].get(k, 0.0) for k in keys] for i in rows], dtype=np.float64)
    correct = np.array([scored.predicted[i] == scored.cells[i].label for i in rows])
    sums = points.sum(axis=1)
    out.update(
        n_sum_100=int(np.sum(np.abs(sums - 100.0) <= 1.0)), n_all_19=int(sum(len(scored.features[i]) == 19 for i in rows)),
        mean_sum=float(sums.mean()),
        per_feature={k: {"mean": float(points[:, j].mean()), "sd": float(points[:, j].std(ddof=1)) if len(rows) > 1 else None,
                         "mean_right": float(points[correct, j].mean()) if correct.any() else None,
                         "mean_wrong": float(points[~correct, j].mean()) if (~correct).any() else None}
                     for j, k in enumerate(keys)},
    )
    return out


def faithfulness_block(scored: Scored, textbook: Mapping[str, Mapping[str, str]], n_boot: int = 2000,
                       seed: int = 0) -> dict[str, Any] | None:
    """Statements read from each justification/sentence, checked against the cell and the textbook."""
    if scored.texts is None:
        return None
    rows = [i for i in scored.answered if scored.texts[i] is not None]
    statements = [parse_caption(scored.texts[i] or "") for i in rows]
    truth = [scored.cells[i].attributes for i in rows]
    predicted = [scored.predicted[i] if scored.predicted[i] != UNPARSEABLE else None for i in rows]
    true_labels = [scored.cells[i].label for i in rows]
    wrong = [i for i, (p, t) in enumerate(zip(predicted, true_labels)) if p is not None and p != t]
    with_text = [s for i, s in zip(rows, statements) if (scored.texts[i] or "").strip()]
    return {
        "n_texts": len(with_text),
        "n_texts_with_statements": sum(1 for s in with_text if s),
        "statements_per_text": float(np.mean([len(s) for s in with_text])) if with_text else None,
        "per_cell_statements": [{"index": scored.cells[i].index, "statements": s} for i, s in zip(rows, statements)],
        "annotation": fa.statement_agreement(statements, truth, n_boot=n_boot, seed=seed),
        "textbook": fa.textbook_agreement(statements, predicted, textbook),
        "textbook_test": fa.textbook_test(statements, truth, true_labels, predicted, textbook),
        "n_wrong_answers": len(wrong),
        "n_wrong_with_statements": sum(1 for i in wrong if statements[i]),
    }


def parser_validation(hemaclip_pairs: Sequence[tuple[str, Mapping[str, str]]]) -> dict[str, Any]:
    """The statement parser on hemaclip's own sentences (must recover what each sentence was written to say,
    exactly) and on the hand-written paraphrases shipped in ``configs/lvlm/paraphrases.yaml``."""
    import yaml

    own_exact = sum(parse_caption(sentence) == dict(intended) for sentence, intended in hemaclip_pairs)
    text = (resources.files("hemaclip") / "configs" / "lvlm" / "paraphrases.yaml").read_text(encoding="utf-8")
    items = yaml.safe_load(text)
    hit = made = expected = exact = 0
    for item in items:
        want = {str(k): str(v) for k, v in (item.get("expected") or {}).items()}
        got = parse_caption(item["text"])
        hit += sum(got.get(k) == v for k, v in want.items())
        made += len(got)
        expected += len(want)
        exact += got == want
    return {
        "own_sentences": {"n": len(hemaclip_pairs), "exact": own_exact},
        "paraphrases": {"n": len(items), "exact": exact, "statements_expected": expected, "statements_read": made,
                        "precision": hit / made if made else None, "recall": hit / expected if expected else None},
    }


# ------------------------------------------------------------------------------------------------ #
# hemaclip on the same cells
# ------------------------------------------------------------------------------------------------ #


def hemaclip_answers(cells: Sequence[Cell], checkpoint: str | Path | None = None) -> tuple[Scored, list[tuple[str, dict[str, str]]]]:
    """`describe` on the cells: class, calibrated probability and sentence, scored like an LVLM's explain
    answer; plus (sentence, what it was written to say) pairs for the parser validation."""
    from hemaclip.tasks.describe import DEFAULTS, Describer
    from hemaclip.text.sentences import sayable_statements, select_statements

    describer = Describer.from_checkpoint(checkpoint, index=None)
    predicted, confidence, texts, pairs = [], [], [], []
    for cell, d in zip(cells, describer.describe_paths([c.path for c in cells], progress=False)):
        if d.error is not None:
            raise DataError(d.error)
        predicted.append(d.label)
        confidence.append(d.probability)
        texts.append(d.sentence)
        if d.label not in DEFAULTS.classes_without_attributes:
            values = {n: a["value"] for n, a in d.attributes.items()}
            probs = {n: a["probability"] for n, a in d.attributes.items()}
            pairs.append((d.sentence, sayable_statements(select_statements(values, probs, describer.attribute_threshold))))
    name = f"{HEMACLIP} ({'calibrated' if describer.calibrated else 'uncalibrated'})"
    return Scored(name, "explain", cells, predicted, confidence, texts), pairs


def textbook_from_train(data_root: str | Path | None = None) -> dict[str, dict[str, str]]:
    """Each WBC class's modal WBCAtt values on the WBCAtt train split (the `evaluate` textbook)."""
    from hemaclip.data.datasets import load_dataset

    train = [r for r in load_dataset("wbcatt", data_root=data_root).split("train") if r.attributes]
    return fa.textbook_attributes([r.label for r in train], [r.attributes for r in train])


# ------------------------------------------------------------------------------------------------ #
# the report
# ------------------------------------------------------------------------------------------------ #


def _mean_sd(folds: Mapping[str, Any] | None, name: str) -> str | None:
    if not folds:
        return None
    m, sd = folds[name]["mean"], folds[name]["sd"]
    return f"{m:.3f} ± {sd:.3f}" if sd == sd else f"{m:.3f}"


def _class_row(name: str, block: Mapping[str, Any] | None) -> list[Any]:
    if block is None:
        return [name, 0, None, None, None, None, None, None, None]
    not_scored = block["n_failed"] + block["n_not_sent"]
    return [name, f"{block['n_scored']} of {block['n_cells']}" + (f" ({not_scored} unanswered)" if not_scored else ""),
            block["n_unparseable"], block["weighted_f1"], _mean_sd(block["folds"], "weighted_f1"), block["macro_f1"],
            _mean_sd(block["folds"], "macro_f1"), block["accuracy"], block["top2_answer_share"]]


def _figure_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-")[:80]


def write_lvlm_report(
    runs: Sequence[str | Path],
    out: str | Path = "reports/lvlm",
    *,
    checkpoint: str | Path | None = None,
    data_root: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    hemaclip: bool = True,
) -> dict[str, Path]:
    """Score every run folder (every protocol it has answers for) beside hemaclip and write the report."""
    from hemaclip_research import plots

    folders = [Path(r) for r in runs]
    if not folders:
        raise HemaclipError("name at least one run folder (runs/lvlm-*)")
    for folder in folders:
        _run_meta(folder)
    out = Path(out)
    with run_log(out, "lvlm report"):
        figures_dir = out / "figures"
        textbook = textbook_from_train(data_root)
        per_sample: dict[tuple[str, ...], tuple[Scored, list]] = {}
        systems: dict[str, list[Scored]] = {p: [] for p in PROTOCOLS}
        hemaclip_rows: dict[str, Scored] = {}
        run_rows = []
        scripted_any = False
        for folder in folders:
            meta = _run_meta(folder)
            cells = read_cells(folder / SAMPLE_CSV, data_root)
            sample_id = tuple(c.image_sha1 for c in cells)
            if hemaclip and sample_id not in per_sample:
                log.info("hemaclip describe on the %d cells of %s", len(cells), folder)
                per_sample[sample_id] = hemaclip_answers(cells, checkpoint)
            scripted = False
            for protocol in meta.get("protocols", []):
                scored = score_answers(folder, protocol, cells)
                scripted = scripted or scored.scripted
                systems[protocol].append(scored)
                if hemaclip:
                    hemaclip_rows[scored.name] = per_sample[sample_id][0]
            scripted_any = scripted_any or scripted
            run_rows.append([str(folder), meta.get("model"), meta.get("endpoint"), len(cells),
                             ", ".join(meta.get("protocols", [])), "yes" if scripted else "no"])
        hemaclip_scored = [v[0] for v in per_sample.values()]
        metrics: dict[str, Any] = {"quoted": QUOTED, "scripted_server": scripted_any, "runs": [r[0] for r in run_rows],
                                   "protocols": {}}
        sections: list[Section] = []
        if scripted_any:
            sections.append(Section("PROTOCOL DEMONSTRATION, NOT A MODEL RESULT", (
                "At least one run below was answered by hemaclip's scripted test server "
                f"(system fingerprint '{SCRIPTED_FINGERPRINT}'), which answers from a script written in advance and "
                "does not look at the images. Its numbers show that the protocols, the answer readers and the scoring "
                "work end to end; they say nothing about any vision-language model.")))
        sections.append(Section("Runs", (
            "Each run asked one model every cell of its saved sample (PBC test split, the same per-class draw as the "
            "LVLM preset of `hemaclip evaluate`). hemaclip's rows are `hemaclip describe` (the shipped model unless "
            "--checkpoint) on the same saved cells: its class, its calibrated probability as confidence and its "
            "sentence as the justification, read by the same parser."),
            [Table(["Run folder", "Model", "Endpoint", "Cells", "Protocols", "Scripted server"], run_rows)]))

        hem_blocks = {id(h): classification_block(h, n_boot=n_boot, seed=seed) for h in hemaclip_scored}
        hem_figures = {id(h): plots.plot_confusion(hem_blocks[id(h)]["confusion_matrix"], hem_blocks[id(h)]["confusion_labels"],
                                                   figures_dir / f"confusion-{_figure_name(h.name)}-{i}.png", title=h.name)
                       for i, h in enumerate(hemaclip_scored) if hem_blocks[id(h)]}
        shown: set[int] = set()
        for protocol in PROTOCOLS:
            if not systems[protocol]:
                continue
            pm: dict[str, Any] = {"systems": {}}
            rows, dist_rows, figures = [], [], []
            for scored in systems[protocol]:
                block = classification_block(scored, n_boot=n_boot, seed=seed)
                pm["systems"][scored.name] = {"classification": block, "confidence": confidence_block(scored),
                                              "features": feature_block(scored),
                                              "faithfulness": faithfulness_block(scored, textbook, n_boot, seed)}
                rows.append(_class_row(scored.name, block))
                if block:
                    dist_rows.append([scored.name, *block["answer_counts"].values(), block["top2_answer_share"]])
                    figures.append((plots.plot_confusion(block["confusion_matrix"], block["confusion_labels"],
                                                         figures_dir / f"confusion-{protocol}-{_figure_name(scored.name)}.png",
                                                         title=f"{scored.name}, {protocol}"), f"{scored.name}, {protocol}"))
            for s in _distinct_hemaclip({protocol: systems[protocol]}, hemaclip_rows):
                block = hem_blocks[id(s)]
                pm["systems"][s.name] = {"classification": block}
                rows.append(_class_row(s.name + ", same cells", block))
                if block:
                    dist_rows.append([s.name, *block["answer_counts"].values(), block["top2_answer_share"]])
                    if id(s) not in shown:  # hemaclip's answers are the same in every protocol: one figure
                        figures.append((hem_figures[id(s)], s.name))
                        shown.add(id(s))
            if protocol in QUOTED["weighted_f1"]:
                m, sd = QUOTED["weighted_f1"][protocol]
                rows.append([f"GPT-4o {protocol} (QUOTED, Buck et al. 2025)", "50 per class, 11 labels", None, None,
                             f"{m:.2f} ± {sd:.2f}", None, None, None, None])
            metrics["protocols"][protocol] = pm
            tables = [Table(["System", "Cells scored", "Unparseable", "Weighted F1 [95 % CI]", "Weighted F1, 5 folds",
                             "Macro F1 [95 % CI]", "Macro F1, 5 folds", "Accuracy", "Share of the 2 commonest answers"], rows,
                            caption=f"{protocol}: classification on the saved sample"),
                      Table(["System", *[LABEL_NAMES[label] for label in PBC_CLASSES], "Unparseable", "Top-2 share"], dist_rows,
                            caption="Answer distribution (the sample has the same number of cells per class: an even "
                                    "spread would give each label 1/8 and the top two 0.25)")]
            sections.append(Section(f"Protocol: {protocol}", _protocol_text(protocol, n_boot), tables, figures))

        sections += _confidence_section(metrics, systems, hemaclip_rows)
        sections += _feature_section(metrics)
        sections += _faithfulness_section(metrics, systems, hemaclip_rows, textbook, n_boot, seed)
        validation = parser_validation([pair for v in per_sample.values() for pair in v[1]])
        metrics["parser_validation"] = validation
        own, para = validation["own_sentences"], validation["paraphrases"]
        sections.append(Section("Statement parser validation", (
            "The parser that reads justifications is the caption engine's (`hemaclip.text.captions.parse_caption`). "
            "On hemaclip's own sentences of these cells it must recover exactly the statements each sentence was "
            "written to make; on the hand-written paraphrases (LVLM-style wording, `configs/lvlm/paraphrases.yaml`) "
            "precision says how much of what it reads a person reads too, recall how much of what a person reads it "
            "finds. Unread statements lower coverage, not agreement."),
            [Table(["Text", "Items", "Read exactly", "Precision", "Recall"],
                   [["hemaclip describe sentences (these cells)", own["n"], own["exact"], None, None],
                    ["hand-written paraphrases", para["n"], para["exact"], para["precision"], para["recall"]]])]))
        title = "LVLM protocol benchmark" + (" — PROTOCOL DEMONSTRATION (scripted server, not a model)" if scripted_any else "")
        return write_report(out, title, sections, metrics, checkpoint=checkpoint or "hemaclip-default.pt")


def _protocol_text(protocol: str, n_boot: int) -> str:
    what = {
        "zero-shot": "One image and the list of the 8 PBC labels; the model is asked to consider the cell's features first.",
        "few-shot": "One labelled example image per class (from the PBC train split), then the query image.",
        "explain": "Label, free-text justification and a certainty from 1 to 5 (scored below under Confidence and "
                   "Faithfulness).",
        "features": "Label, then 100 points over the 19 morphological features of the audit (see Feature importance).",
    }[protocol]
    return (f"{what} Bootstrap intervals: {n_boot:,} stratified resamples of the scored cells. Folds: the cells of each "
            "class in sample order cut into 5 contiguous chunks, as the audit did; mean ± sample sd over folds. "
            "Unparseable answers count as wrong; unanswered cells (request failed or budget spent) are not scored and "
            "are counted in 'Cells scored'.")


def _distinct_hemaclip(systems: Mapping[str, Sequence[Scored]], hemaclip_rows: Mapping[str, Scored]) -> list[Scored]:
    """hemaclip's answers for the LVLM systems given (one per distinct sample), in order of first use."""
    found = {id(h): h for h in (hemaclip_rows.get(s.name) for p in systems.values() for s in p) if h is not None}
    return list(found.values())


def _confidence_section(metrics: dict[str, Any], systems: Mapping[str, list[Scored]],
                        hemaclip_rows: Mapping[str, Scored]) -> list[Section]:
    rows = []
    for scored in systems.get("explain", []):
        block = confidence_block(scored)
        if block:
            rows.append([f"{scored.name}: stated certainty (1-5)", block["n"], block["correlation"], block["auroc"],
                         block["mean_when_right"], block["mean_when_wrong"]])
    for hem in _distinct_hemaclip(systems, hemaclip_rows):
        block = confidence_block(hem)
        metrics.setdefault("hemaclip_confidence", []).append(block)
        rows.append([f"{hem.name}: calibrated class probability", block["n"], block["correlation"], block["auroc"],
                     block["mean_when_right"], block["mean_when_wrong"]])
    if not rows:
        return []
    for name, value in QUOTED["confidence_correlation"].items():
        rows.append([f"{name} (QUOTED, Buck et al. 2025)", None, value, None, None, None])
    return [Section("Confidence against correctness", (
        "Point-biserial correlation between confidence and being right (0 = confidence says nothing about "
        "correctness) and AUROC of confidence for telling right from wrong answers (0.5 = no better than chance). "
        "Cells with an unreadable label or no stated certainty are left out (counted in the explain answers)."),
        [Table(["Confidence", "Cells", "Correlation", "AUROC", "Mean when right", "Mean when wrong"], rows)])]


def _feature_section(metrics: Mapping[str, Any]) -> list[Section]:
    systems = metrics["protocols"].get("features", {}).get("systems", {})
    blocks = {name: v["features"] for name, v in systems.items() if v.get("features")}
    if not blocks:
        return []
    columns, rows = ["Feature"], []
    for name in blocks:
        columns += [f"{name}: mean", "right", "wrong"]
    for key, (label, _) in FEATURES.items():
        row = [label]
        for block in blocks.values():
            per = (block.get("per_feature") or {}).get(key, {})
            row += [per.get("mean"), per.get("mean_right"), per.get("mean_wrong")]
        rows.append(row)
    compliance = [[name, b["n_answers"], b["n_with_features"], b.get("n_all_19"), b.get("n_sum_100"), b.get("mean_sum")]
                  for name, b in blocks.items()]
    return [Section("Feature importance (features protocol)", (
        "Mean points per feature (a feature not listed in a reply counts 0), over answers that gave any points, and "
        "separately for right and wrong labels. hemaclip has no counterpart: its grounding is the attribute "
        "statements checked under Faithfulness."),
        [Table(["System", "Answers", "With points", "All 19 listed", "Sum 100 ± 1", "Mean sum"], compliance,
               caption="Did the answers follow the format?"),
         Table(columns, rows, caption="Mean points per feature", digits=1)])]


def _faithfulness_section(metrics: dict[str, Any], systems: Mapping[str, list[Scored]], hemaclip_rows: Mapping[str, Scored],
                          textbook: Mapping[str, Mapping[str, str]], n_boot: int, seed: int) -> list[Section]:
    entries: list[tuple[str, dict[str, Any]]] = []
    for scored in systems.get("explain", []):
        block = metrics["protocols"]["explain"]["systems"][scored.name]["faithfulness"]
        entries.append((f"{scored.name}: justifications", block))
    for hem in _distinct_hemaclip(systems, hemaclip_rows):
        block = faithfulness_block(hem, textbook, n_boot, seed)
        metrics.setdefault("hemaclip_faithfulness", []).append(block)
        entries.append((f"{hem.name}: sentences", block))
    if not entries:
        return []
    rows, test_rows = [], []
    for name, b in entries:
        ann, book, tt = b["annotation"], b["textbook"], b["textbook_test"]
        rows.append([name, b["n_texts"], b["n_texts_with_statements"], b["statements_per_text"], ann["n_images"],
                     ann["coverage"], ann["agreement"], book["match_predicted_textbook"]])
        test_rows.append([name, b["n_wrong_answers"], tt["n_misclassified"], tt["n_statements"],
                          tt["n_discriminating_statements"], tt["discriminating_match_predicted_textbook"],
                          tt["discriminating_match_own_annotation"]])
    test_rows.append([f"GPT-4o (QUOTED, Buck et al. 2025): an expert rated {QUOTED['misclassified_explanations_poor']:.0%} of "
                      "explanations of misclassified cells poor or misleading (a different, manual measure)",
                      None, None, None, None, None, None])
    return [Section("Faithfulness of the words", (
        "Each justification (explain protocol) and each hemaclip sentence is read into WBCAtt attribute statements. "
        "'Read' counts texts from which at least one statement was read (parse coverage); coverage is statements / "
        "(11 × annotated cells). Agreement with the annotation uses the 5 WBCAtt classes' annotated cells only (the "
        "PBC erythroblasts, immature granulocytes and platelets have no WBCAtt attributes); its interval is a "
        "bootstrap over cells. 'Match predicted class's textbook' is the share of statements equal to the predicted "
        "class's modal WBCAtt-train value: words that could have been written without looking."),
        [Table(["Texts", "Answers", "Read (≥ 1 statement)", "Statements per text", "Annotated cells", "Coverage",
                "Agreement with the cell's annotation", "Match predicted class's textbook"], rows),
         Table(["Texts", "Wrong answers", "Wrong, annotated, textbook class", "Statements", "Discriminating statements",
                "… side with the textbook", "… side with the cell"], test_rows,
               caption="Textbook test on wrong answers (the test `hemaclip evaluate` runs on describe): where the "
                       "predicted class's textbook value and the cell's annotation differ, which one do the words follow?")])]
