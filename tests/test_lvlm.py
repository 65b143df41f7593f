"""The LVLM protocols against a scripted OpenAI-compatible server started inside the tests: answer readers,
retries / rate limits / timeouts / budget, resume after kill -9 with no request sent twice, the API key never
written anywhere, scoring against hand-computed values, and the statement parser's validation."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES, PBC_CLASSES
from hemaclip_research.lvlm import (
    UNPARSEABLE,
    Scored,
    classification_block,
    confidence_block,
    faithfulness_block,
    feature_block,
    parser_validation,
    write_lvlm_report,
)
from hemaclip.text.sentences import attribute_sentence, sayable_statements
from hemaclip.tasks.lvlm.cache import CACHE_FILE
from hemaclip.tasks.lvlm.client import ClientSettings
from hemaclip.tasks.lvlm.protocols import FEATURES, parse_answer, parse_certainty, parse_features, parse_label
from hemaclip.tasks.lvlm.runner import Cell, read_answers, run_lvlm, write_cells
from hemaclip.tasks.lvlm.scripted import Behaviour, ScriptedServer

PBC_DIR = "PBC_dataset_normal_DIB"
PARAPHRASES = resources.files("hemaclip") / "configs" / "lvlm" / "paraphrases.yaml"
LVLM_REPORT = Path(__file__).resolve().parents[1] / "reports" / "lvlm" / "metrics.json"  # committed protocol demonstration
FAST = ClientSettings(timeout_s=0.5, backoff_s=0.02, max_backoff_s=0.1, max_retries=2, concurrency=4)
NEUTRO = {"cell_size": "big", "cell_shape": "round", "nucleus_shape": "segmented-multilobed",
          "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
          "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "small",
          "granule_colour": "pink", "granularity": "yes"}
LYMPHO = {**NEUTRO, "cell_size": "small", "nucleus_shape": "unsegmented-round", "nuclear_cytoplasmic_ratio": "high",
          "granule_type": "nil", "granule_colour": "nil", "granularity": "no", "cytoplasm_colour": "blue"}


# ------------------------------------------------------------------------------------------------ #
# readers
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize("text, label", [
    ("Answer: Neutrophil", "neutrophil"),
    ("The nucleus is lobed and the granules are fine.\n**Answer:** Segmented neutrophil", "neutrophil"),
    ("eosinophil", "eosinophil"),
    ("It could be a monocyte, but the granules point to a neutrophil.\nAnswer: Neutrophil", "neutrophil"),
    ("Final answer: Immature granulocyte (myelocyte)", "ig"),
    ("This is a metamyelocyte.", "ig"),
    ("A nucleated red blood cell.", "erythroblast"),
    ("Answer: Thrombocyte", "platelet"),
    ("Cell type: Lymphocytes", "lymphocyte"),
    ("The eosinophilic granules are orange; answer: basophil", "basophil"),  # 'eosinophilic' is no label
    ("It is either a monocyte or a lymphocyte.", None),  # ambiguous without an answer line
    ("I cannot tell from this image.", None),
    ("", None),
])
def test_label_reader(text: str, label: str | None) -> None:
    assert parse_label(text) == label


def test_explain_reader_reads_label_justification_and_certainty() -> None:
    reply = ("Answer: Eosinophil\nJustification: A large cell with a bilobed nucleus and coarse red granules.\n"
             "Certainty: 4")
    answer = parse_answer("explain", reply)
    assert answer.label == "eosinophil" and answer.certainty == 4
    assert answer.justification == "A large cell with a bilobed nucleus and coarse red granules."
    assert parse_certainty("I am fairly sure (4/5).") == 4
    assert parse_certainty("**Certainty:** 5") == 5
    assert parse_certainty("Certainty: high") is None
    assert parse_answer("explain", "It is a lymphocyte because it is small.").justification == "It is a lymphocyte because it is small."


def test_feature_reader_finds_each_of_the_19_features() -> None:
    lines = [f"{name}: {i}" for i, (name, _) in enumerate(FEATURES.values())]
    got = parse_features("Answer: Monocyte\n" + "\n".join(lines))
    assert list(got) == list(FEATURES) and got["technical"] == 18.0
    # other spellings, bullets, percentages; a line naming no feature is ignored
    got = parse_features("- N:C ratio: 30%\n- Nuclear Segmentation = 25.5\n* Platelets, Thrombocytes: 5\nOverall: 100")
    assert got == {"nc_ratio": 30.0, "nuclear_segmentation": 25.5, "platelets": 5.0}


# ------------------------------------------------------------------------------------------------ #
# the client against the scripted server
# ------------------------------------------------------------------------------------------------ #


def _cells(data_root: Path, per_class: int = 1) -> list[Cell]:
    """Real PBC images, without loading the dataset: the first files of each class folder."""
    from hemaclip.cache import file_sha1

    cells = []
    for label in PBC_CLASSES:
        for path in sorted((data_root / PBC_DIR / label).iterdir())[:per_class]:
            cells.append(Cell(index=len(cells), path=path, rel=f"{PBC_DIR}/{label}/{path.name}", label=label, split="test",
                              image_sha1=file_sha1(path)))
    return cells


@pytest.fixture(scope="module")
def sample(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Cell]]:
    cells = _cells(data_root, per_class=1)
    path = tmp_path_factory.mktemp("lvlm-sample") / "sample.csv"
    write_cells(path, cells)
    return path, cells


def test_retries_rate_limits_timeouts_and_failures(sample, data_root: Path, tmp_path: Path) -> None:
    path, cells = sample
    kinds = ["correct", "wrong", "unparseable", "slow", "error500", "always500", "rate_limit", "correct"]
    behaviours = {c.image_sha1: Behaviour(k, answer="monocyte" if k == "wrong" else c.label) for c, k in zip(cells, kinds)}
    with ScriptedServer(behaviours, slow_s=1.5, retry_after_s=1) as server:
        start = time.monotonic()
        summary = run_lvlm(tmp_path / "run", server.url, "scripted", ["zero-shot"], settings=FAST, sample_csv=path,
                           data_root=data_root)["zero-shot"]
        elapsed = time.monotonic() - start
    by_kind = {k: c.image_sha1 for c, k in zip(cells, kinds)}
    received = {k: server.received[(sha, "zero-shot")] for k, sha in by_kind.items()}
    assert received == {"correct": 1, "wrong": 1, "unparseable": 1, "slow": 2, "error500": 2, "always500": 3,
                        "rate_limit": 2}
    times = server.retry_times[(by_kind["rate_limit"], "zero-shot")]
    assert times[1] - times[0] >= 0.95, "Retry-After: 1 was not honoured"
    assert elapsed >= 0.95
    assert (summary.cells, summary.answered, summary.failed, summary.not_sent, summary.unparseable) == (8, 7, 1, 0, 1)
    answers = {a["path"].split("/")[1]: a for a in read_answers(tmp_path / "run", "zero-shot")}
    failed = answers[cells[kinds.index("always500")].label]
    assert failed["status"] == "failed" and "HTTP 500" in failed["error"] and "3 attempts" in failed["error"]
    assert parse_label(answers["eosinophil"]["content"]) == "monocyte"  # the 'wrong' cell


def test_request_budget_stops_sending_and_a_rerun_sends_only_what_is_missing(sample, data_root: Path, tmp_path: Path) -> None:
    path, cells = sample
    behaviours = {c.image_sha1: Behaviour("correct", answer=c.label) for c in cells}
    with ScriptedServer(behaviours) as server:
        settings = ClientSettings(**{**FAST.__dict__, "max_requests": 3, "concurrency": 1})
        first = run_lvlm(tmp_path / "run", server.url, "scripted", ["zero-shot"], settings=settings, sample_csv=path,
                         data_root=data_root)["zero-shot"]
        assert (first.answered, first.not_sent) == (3, 5)
        statuses = [a["status"] for a in read_answers(tmp_path / "run", "zero-shot")]
        assert statuses.count("not_sent") == 5
        second = run_lvlm(tmp_path / "run", server.url, "scripted", ["zero-shot"], settings=FAST, data_root=data_root)["zero-shot"]
        assert (second.cached, second.answered_now, second.complete) == (3, 5, True)
        assert max(server.answered.values()) == 1 and sum(server.received.values()) == 8


def test_bad_input_is_one_line_and_writes_nothing(run_cli, assert_one_line_error, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("lvlm", "run", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                     "--api-key-env", "HEMACLIP_TEST_NO_SUCH_KEY", env={"HEMACLIP_TEST_NO_SUCH_KEY": ""})
    assert_one_line_error(result, "HEMACLIP_TEST_NO_SUCH_KEY")
    result = run_cli("lvlm", "run", "--endpoint", "ftp://example/v1", "--model", "m", "--out", str(out))
    assert_one_line_error(result, "not an http(s) URL")
    result = run_cli("lvlm", "run", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), "--protocol", "two-shot")
    assert_one_line_error(result, "two-shot")
    assert not out.exists()


@pytest.mark.slow
def test_killed_run_resumes_without_resending_and_the_key_never_reaches_disk(sample, data_root: Path, tmp_path: Path) -> None:
    """kill -9 the real CLI mid-run while the server holds every request after the first 3 answers (so nothing
    answered is in flight); the rerun sends only the rest; the API key is in no file of the run folder."""
    path, cells = sample
    key = "sk-test-" + "7f3a9c" * 6
    behaviours = {c.image_sha1: Behaviour("correct", answer=c.label, justification="A large cell with a round nucleus.")
                  for c in cells}
    out = tmp_path / "run"
    args = [sys.executable, "-m", "hemaclip.cli", "lvlm", "run", "--model", "scripted", "--out", str(out),
            "--sample", str(path), "--protocol", "explain", "--api-key-env", "HEMACLIP_TEST_KEY", "--concurrency", "2",
            "--data", str(data_root)]
    env = {**os.environ, "HEMACLIP_TEST_KEY": key}
    with ScriptedServer(behaviours, api_key=key, hold_after=3) as server:
        process = subprocess.Popen([*args, "--endpoint", server.url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        rows = 0
        while time.monotonic() < deadline and process.poll() is None:
            if (out / CACHE_FILE).is_file():
                with sqlite3.connect(f"file:{out / CACHE_FILE}?mode=ro", uri=True) as db:
                    try:
                        rows = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
                    except sqlite3.OperationalError:
                        rows = 0
            if rows >= 3 and sum(server.received.values()) >= 5:  # 3 answered and cached, 2 held in flight
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        server.release()
        held = sum(server.received.values()) - sum(server.answered.values())
        assert rows == 3 and held >= 1
        server.hold_after = None
        result = subprocess.run([*args, "--endpoint", server.url], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert set(server.answered.values()) == {1} and len(server.answered) == len(cells)  # every cell answered exactly once
    assert sum(server.received.values()) == len(cells) + held  # only the held requests (never answered) were sent again
    answers = read_answers(out, "explain")
    assert [a["status"] for a in answers] == ["answered"] * len(cells)
    assert sum(1 for a in answers if a["attempts"] == 1) == len(cells)
    for file in out.rglob("*"):
        if file.is_file():
            assert key.encode() not in file.read_bytes(), f"the API key was written to {file}"
    assert "HEMACLIP_TEST_KEY" in (out / "run.log").read_text()  # the variable's name is logged, its value never


# ------------------------------------------------------------------------------------------------ #
# scoring against hand-computed values
# ------------------------------------------------------------------------------------------------ #


def _cell(i: int, label: str, attributes: dict[str, str] | None = None) -> Cell:
    return Cell(index=i, path=Path(f"/nowhere/{i}.jpg"), rel=f"{i}.jpg", label=label, split="test", image_sha1=f"{i:040d}",
                attributes=attributes)


def test_scoring_matches_hand_computed_values() -> None:
    # 10 cells: 5 neutrophils, 5 lymphocytes. Answers: 4 neutrophils right, 1 neutrophil called lymphocyte;
    # 3 lymphocytes right, 1 unparseable, 1 not answered (failed).
    cells = [_cell(i, "neutrophil", NEUTRO) for i in range(5)] + [_cell(5 + i, "lymphocyte", LYMPHO) for i in range(5)]
    predicted = ["neutrophil"] * 4 + ["lymphocyte"] + ["lymphocyte"] * 3 + [UNPARSEABLE, None]
    certainty = [5, 5, 4, 4, 5, 3, 3, 2, None, None]
    texts = ["A large cell with a multilobed nucleus and fine pink granules."] * 4 + [
        "A small cell with a round nucleus and no granules."] + ["A small cell with a round nucleus."] * 3 + ["?", None]
    scored = Scored("m", "explain", cells, predicted, certainty, texts, failed=1)
    block = classification_block(scored, labels=["lymphocyte", "neutrophil"], n_boot=0)
    # scored: 9 cells (5 neutrophil, 4 lymphocyte). neutrophil: TP 4, FN 1, FP 0 -> F1 = 8/9.
    # lymphocyte: TP 3, FN 1 (unparseable), FP 1 -> P 3/4, R 3/4, F1 = 3/4.
    assert block["n_scored"] == 9 and block["n_unparseable"] == 1 and block["n_failed"] == 1
    assert block["macro_f1"]["point"] == pytest.approx((8 / 9 + 3 / 4) / 2)
    assert block["weighted_f1"]["point"] == pytest.approx((5 * 8 / 9 + 4 * 3 / 4) / 9)
    assert block["accuracy"]["point"] == pytest.approx(7 / 9)
    assert block["answer_counts"] == {"lymphocyte": 4, "neutrophil": 4, UNPARSEABLE: 1}
    assert block["top2_answer_share"] == pytest.approx(8 / 9)
    # folds: neutrophils 0..4 one per fold; lymphocytes (scored: 5,6,7,8) one each in folds 0..3.
    f = block["folds"]["macro_f1"]["folds"]
    # fold 0: n0 right, l5 right -> 1; 1: n1, l6 -> 1; 2: n2, l7 -> 1; 3: n3 right, l8 unparseable -> neutrophil F1 2/3?
    # fold 3: truth {n, l}, pred {n, (unparseable)}: neutrophil F1 1, lymphocyte F1 0 -> 0.5; fold 4: n4 called
    # lymphocyte, truth {n} only: neutrophil F1 0 -> 0.
    assert f == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    assert block["folds"]["macro_f1"]["mean"] == pytest.approx(0.7)
    confidence = confidence_block(scored)
    # readable with certainty: 8 cells; right: 5,5,4,4,3,3,2 (7), wrong: 5 (the neutrophil called lymphocyte).
    assert confidence["n"] == 8 and confidence["mean_when_wrong"] == 5.0
    assert confidence["mean_when_right"] == pytest.approx(26 / 7)
    # AUROC: P(conf right > conf wrong) with ties 1/2: right values vs 5: 0 above, two ties (5, 5) -> 1/7.
    assert confidence["auroc"] == pytest.approx((0 + 0.5 * 2) / 7)
    book = {"neutrophil": NEUTRO, "lymphocyte": LYMPHO}
    faith = faithfulness_block(scored, book, n_boot=0)
    # The neutrophil called lymphocyte says small, round nucleus, no granules (+ type/colour nil): 5 statements,
    # all the lymphocyte textbook's, none the cell's; cell_size, nucleus_shape, granularity, type, colour differ.
    assert faith["textbook_test"]["n_misclassified"] == 1
    assert faith["textbook_test"]["discriminating_match_predicted_textbook"] == 1.0
    assert faith["textbook_test"]["discriminating_match_own_annotation"] == 0.0
    assert faith["n_texts"] == 9 and faith["n_texts_with_statements"] == 8  # "?" states nothing
    # right answers: 4 x 5 statements (size, multilobed, small, pink, yes) all true; 3 x 2 (small, round) true.
    assert faith["annotation"]["n_statements"] == 4 * 5 + 5 + 3 * 2
    assert faith["annotation"]["agreement"]["point"] == pytest.approx((20 + 0 + 6) / 31)


def test_feature_points_per_feature_and_format() -> None:
    cells = [_cell(0, "neutrophil"), _cell(1, "neutrophil"), _cell(2, "monocyte")]
    features = [{"nuclear_shape": 60.0, "granule_type": 40.0}, {"nuclear_shape": 20.0, "chromatin_pattern": 70.0}, {}]
    scored = Scored("m", "features", cells, ["neutrophil", "monocyte", UNPARSEABLE], features=features)
    block = feature_block(scored)
    assert block["n_with_features"] == 2 and block["n_sum_100"] == 1 and block["mean_sum"] == 95.0
    assert block["per_feature"]["nuclear_shape"] == {"mean": 40.0, "sd": pytest.approx(28.2842712), "mean_right": 60.0,
                                                     "mean_wrong": 20.0}


# ------------------------------------------------------------------------------------------------ #
# the statement parser
# ------------------------------------------------------------------------------------------------ #


def test_parser_recovers_hemaclip_sentences_exactly_and_reads_paraphrases() -> None:
    rng = random.Random(0)
    pairs = []
    for _ in range(2000):
        chosen = {n: rng.choice(ATTRIBUTES[n]) for n in ATTRIBUTE_NAMES if rng.random() < 0.6}
        sentence, _ = attribute_sentence(chosen)
        pairs.append((sentence, sayable_statements(chosen)))
    result = parser_validation(pairs)
    assert result["own_sentences"] == {"n": 2000, "exact": 2000}
    para = result["paraphrases"]
    items = yaml.safe_load(PARAPHRASES.read_text(encoding="utf-8"))
    assert para["n"] == len(items) and para["statements_expected"] == sum(len(i.get("expected") or {}) for i in items)
    # It never reads what a person does not: unread statements lower coverage, never agreement.
    assert para["precision"] == 1.0
    assert para["recall"] == pytest.approx(para["statements_read"] / para["statements_expected"])  # every read one is right
    # The grammar reads more, and more correctly, than looking up each WBCAtt value word in the text.
    keyword = _keyword_reader_scores(items)
    assert para["precision"] > keyword["precision"] and para["recall"] > keyword["recall"]
    # No worse than the committed LVLM report, the source of the README's figure.
    committed = json.loads(LVLM_REPORT.read_text())["parser_validation"]["paraphrases"]
    assert para["recall"] >= committed["recall"] and para["exact"] >= committed["exact"]


def _keyword_reader_scores(items: list[dict]) -> dict[str, float]:
    """Precision and recall of a bag-of-words reader: an attribute takes a value when a word of that value's name
    (e.g. 'bilobed', 'coarse', 'blue') occurs in the text."""
    hit = made = expected = 0
    for item in items:
        want = {str(k): str(v) for k, v in (item.get("expected") or {}).items()}
        words = set(re.findall(r"[a-z]+", item["text"].lower()))
        got = {name: value for name in ATTRIBUTE_NAMES for value in ATTRIBUTES[name]
               if words & {w for w in re.split(r"[- ]", value) if len(w) > 2}}
        hit += sum(got.get(k) == v for k, v in want.items())
        made, expected = made + len(got), expected + len(want)
    return {"precision": hit / made, "recall": hit / expected}


# ------------------------------------------------------------------------------------------------ #
# the report
# ------------------------------------------------------------------------------------------------ #


def test_report_labels_a_scripted_run_as_a_demonstration(sample, data_root: Path, tmp_path: Path) -> None:
    path, cells = sample
    behaviours = {c.image_sha1: Behaviour("correct", answer=c.label, certainty=4) for c in cells}
    with ScriptedServer(behaviours) as server:
        run_lvlm(tmp_path / "run", server.url, "scripted", ["zero-shot", "features"], settings=FAST, sample_csv=path,
                 data_root=data_root)
    paths = write_lvlm_report([tmp_path / "run"], tmp_path / "report", data_root=data_root, n_boot=50, hemaclip=False)
    text = paths["markdown"].read_text()
    assert "PROTOCOL DEMONSTRATION" in text.splitlines()[0]
    assert "QUOTED" in text
    metrics = json.loads(paths["metrics"].read_text())
    block = metrics["protocols"]["zero-shot"]["systems"]["scripted (run)"]["classification"]
    assert block["accuracy"]["point"] == 1.0 and block["n_scored"] == 8
    assert metrics["protocols"]["features"]["systems"]["scripted (run)"]["features"]["n_sum_100"] == 8


@pytest.mark.slow
def test_report_command_scores_hemaclip_on_the_same_cells(sample, data_root: Path, tmp_path: Path, run_cli) -> None:
    """`hemaclip lvlm report` (the real CLI) with hemaclip describe on the run's own cells."""
    path, cells = sample
    behaviours = {c.image_sha1: Behaviour("correct", answer="neutrophil", justification="A small cell with no granules.",
                                          certainty=5) for c in cells}
    with ScriptedServer(behaviours) as server:
        run_lvlm(tmp_path / "run", server.url, "scripted", ["explain"], settings=FAST, sample_csv=path, data_root=data_root)
    result = run_cli("lvlm", "report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--n-boot", "50",
                     "--data", str(data_root))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    systems = metrics["protocols"]["explain"]["systems"]
    hem = [name for name in systems if name.startswith("hemaclip describe")]
    assert len(hem) == 1 and systems[hem[0]]["classification"]["n_scored"] == len(cells)
    lvlm = systems["scripted (run)"]["classification"]
    assert lvlm["answer_counts"]["neutrophil"] == len(cells) and lvlm["top2_answer_share"] == 1.0
    assert metrics["parser_validation"]["own_sentences"]["n"] == metrics["parser_validation"]["own_sentences"]["exact"]
    assert len(metrics["hemaclip_confidence"]) == 1 and len(metrics["hemaclip_faithfulness"]) == 1
