"""Run the LVLM protocols against one OpenAI-compatible endpoint: the sample, the requests, the answers.

A run folder (``runs/lvlm-NAME``) holds:

* ``run.json``: model, endpoint (without credentials or query), sample settings, protocols run;
* ``sample.csv``: the test cells (PBC test split, `per_class` per class, seeded; the same cells as
  the LVLM preset of ``hemaclip evaluate``), with file SHA-1 and WBCAtt attributes where annotated;
* ``fewshot.csv``: the example images of the few-shot protocol (one per class, from the train split);
* ``cache.sqlite``: every answer (:mod:`hemaclip.tasks.lvlm.cache`); a run that was stopped, killed
  or ran out of budget resumes from it without sending an answered request again;
* ``answers/<protocol>.jsonl``: one line per cell, in sample order: its status (``answered``,
  ``failed`` with the error, or ``not_sent`` when the budget ran out) and the raw reply, written
  atomically at the end of each run from the cache;
* ``run.log``.

Images are sent as data URLs of the files' own bytes (no re-encoding), so the SHA-1 in the sample is
the SHA-1 of what the model saw.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import io
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemaclip.cache import file_sha1
from hemaclip.data.attributes import ATTRIBUTE_NAMES, PBC_CLASSES, validate_attributes
from hemaclip.errors import DataError, HemaclipError
from hemaclip.io import atomic_write, write_json
from hemaclip.log import get_logger, run_log
from hemaclip.tasks.lvlm.cache import CACHE_FILE, ResponseCache, request_key
from hemaclip.tasks.lvlm.client import (
    BudgetExhausted,
    ChatClient,
    ClientSettings,
    RequestFailed,
    chat_url,
    redact_url,
)
from hemaclip.tasks.lvlm.protocols import PROMPT_VERSION, PROTOCOLS, parse_answer, prompt_messages

__all__ = [
    "ANSWERS_DIR", "FEWSHOT_CSV", "RUN_JSON", "SAMPLE_CSV", "Cell", "ProtocolSummary", "api_key_from_env",
    "draw_few_shot", "draw_sample", "read_answers", "read_cells", "run_lvlm", "write_cells",
]

log = get_logger(__name__)
RUN_JSON = "run.json"
SAMPLE_CSV = "sample.csv"
FEWSHOT_CSV = "fewshot.csv"
ANSWERS_DIR = "answers"
_CELL_COLUMNS = ("index", "path", "label", "fine_label", "split", "image_sha1", *ATTRIBUTE_NAMES)


@dataclass(frozen=True)
class Cell:
    """One image of the sample (or a few-shot example)."""

    index: int
    path: Path
    rel: str
    label: str
    split: str
    image_sha1: str
    fine_label: str = ""
    attributes: dict[str, str] | None = None


@dataclass
class ProtocolSummary:
    """What one protocol run did: cells, answers from the cache, sent now, failed, not sent, unparseable."""

    protocol: str
    cells: int = 0
    cached: int = 0
    answered_now: int = 0
    failed: int = 0
    not_sent: int = 0
    unparseable: int = 0
    errors: Counter = field(default_factory=Counter)

    @property
    def answered(self) -> int:
        return self.cached + self.answered_now

    @property
    def complete(self) -> bool:
        return self.answered == self.cells


# ------------------------------------------------------------------------------------------------ #
# the sample
# ------------------------------------------------------------------------------------------------ #


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _cells_from_records(records: Sequence[Any], rows: Sequence[int], root: Path) -> list[Cell]:
    return [Cell(index=i, path=Path(records[r].path), rel=_relative(Path(records[r].path), root), label=records[r].label,
                 split=records[r].split, image_sha1=file_sha1(records[r].path), fine_label=records[r].fine_label or "",
                 attributes=records[r].attributes) for i, r in enumerate(rows)]


def draw_sample(data_root: str | Path | None = None, per_class: int = 50, seed: int = 0) -> list[Cell]:
    """`per_class` cells per PBC class from the PBC test split (seeded), in path order within the draw."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.paths import resolve_data_root
    from hemaclip.tasks.probes import benchmark_rows

    root = resolve_data_root(data_root)
    records = load_dataset("pbc", data_root=root).records
    rows = benchmark_rows([str(r.path) for r in records], [r.label for r in records], [r.split for r in records],
                          per_class=per_class, seed=seed, split="test")
    return _cells_from_records(records, [int(r) for r in rows], root)


def draw_few_shot(data_root: str | Path | None = None, seed: int = 0, labels: Sequence[str] = PBC_CLASSES) -> list[Cell]:
    """One example image per class from the PBC *train* split (seeded), in the order of `labels`."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.paths import resolve_data_root
    from hemaclip.tasks.probes import benchmark_rows

    root = resolve_data_root(data_root)
    records = load_dataset("pbc", data_root=root).records
    rows = benchmark_rows([str(r.path) for r in records], [r.label for r in records], [r.split for r in records],
                          per_class=1, seed=seed, split="train")
    by_label = {records[int(r)].label: int(r) for r in rows}
    missing = [label for label in labels if label not in by_label]
    if missing:
        raise DataError(f"no train image of class(es) {', '.join(missing)} for the few-shot examples")
    return _cells_from_records(records, [by_label[label] for label in labels], root)


def write_cells(path: Path, cells: Sequence[Cell]) -> None:
    """Write cells as CSV atomically (paths relative to the data root where they lie under it)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CELL_COLUMNS)
    for c in cells:
        attrs = c.attributes or {}
        writer.writerow([c.index, c.rel, c.label, c.fine_label, c.split, c.image_sha1, *(attrs.get(n, "") for n in ATTRIBUTE_NAMES)])
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def read_cells(path: Path, data_root: str | Path | None = None, check_files: bool = True) -> list[Cell]:
    """Read a sample or few-shot CSV; relative paths are resolved against the data root. With `check_files`,
    every file must exist and still have the SHA-1 recorded (the cells the answers were about)."""
    from hemaclip.data.datasets import read_csv_rows
    from hemaclip.data.paths import resolve_data_root

    rows = read_csv_rows(Path(path), ("path", "label", "image_sha1"))
    if not rows:
        raise DataError(f"{path}: no cells")
    root: Path | None = None
    cells = []
    for line, row in enumerate(rows, start=2):
        rel = row["path"]
        file = Path(rel)
        if not file.is_absolute():
            root = root or resolve_data_root(data_root)
            file = root / rel
        attributes = None
        if all(row.get(n) for n in ATTRIBUTE_NAMES):
            attributes = validate_attributes({n: row[n] for n in ATTRIBUTE_NAMES}, f"{path}:{line}")
        if check_files:
            if not file.is_file():
                raise DataError(f"{path}:{line}: image {file} not found (pass --data to the folder the sample was drawn from)")
            if file_sha1(file) != row["image_sha1"]:
                raise DataError(f"{path}:{line}: {file} has changed since the sample was drawn (SHA-1 differs)")
        index = int(row["index"]) if row.get("index", "").strip() else len(cells)
        cells.append(Cell(index=index, path=file, rel=rel, label=row["label"], split=row.get("split", ""),
                          image_sha1=row["image_sha1"], fine_label=row.get("fine_label", ""), attributes=attributes))
    return cells


def _data_url(path: Path) -> str:
    """The file's own bytes as a data URL (its format sniffed by PIL: a file that is no image is an error)."""
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            mime = Image.MIME.get(image.format or "", "image/jpeg")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ------------------------------------------------------------------------------------------------ #
# requests
# ------------------------------------------------------------------------------------------------ #


@dataclass(frozen=True)
class _Job:
    cell: Cell
    key: str
    keyed_request: dict[str, Any]
    build: Callable[[], dict[str, Any]]


def _jobs(protocol: str, model: str, cells: Sequence[Cell], examples: Sequence[Cell], settings: ClientSettings) -> list[_Job]:
    params = {"temperature": settings.temperature, "max_tokens": settings.max_tokens}
    jobs = []
    for cell in cells:
        keyed_examples = [(e.label, f"sha1:{e.image_sha1}") for e in examples] if protocol == "few-shot" else []
        keyed = {"model": model, "prompt_version": PROMPT_VERSION, **params,
                 "messages": prompt_messages(protocol, f"sha1:{cell.image_sha1}", keyed_examples)}

        def build(cell: Cell = cell) -> dict[str, Any]:
            real_examples = [(e.label, _data_url(e.path)) for e in examples] if protocol == "few-shot" else []
            return {"model": model, **params, "messages": prompt_messages(protocol, _data_url(cell.path), real_examples)}

        jobs.append(_Job(cell, request_key(model, protocol, cell.image_sha1, keyed), keyed, build))
    return jobs


async def _ask(jobs: Sequence[_Job], client: ChatClient, cache: ResponseCache, model: str, protocol: str,
               summary: ProtocolSummary, failures: dict[str, str], progress: bool) -> None:
    """Send every job (bounded by the client); each answer is cached as soon as it arrives."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=protocol, unit="req", disable=not progress)
    step = max(1, len(jobs) // 10)
    done = 0

    async def one(job: _Job) -> None:
        nonlocal done
        try:
            result = await client.complete(job.build())
        except RequestFailed as err:
            summary.failed += 1
            summary.errors[str(err)] += 1
            failures[job.key] = str(err)
        except BudgetExhausted:
            summary.not_sent += 1
        else:
            cache.put(job.key, model=model, protocol=protocol, image_sha1=job.cell.image_sha1,
                      keyed_request=job.keyed_request, response=result.response, content=result.content,
                      attempts=result.attempts, seconds=result.seconds)
            summary.answered_now += 1
        done += 1
        bar.update(1)
        if done % step == 0 or done == len(jobs):
            log.debug("%s: %d of %d requests done", protocol, done, len(jobs))

    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(one(job))
    except BaseExceptionGroup as group_error:  # an EndpointError (or a bug) stops every request
        raise group_error.exceptions[0] from None
    finally:
        bar.close()


def _write_answers(path: Path, protocol: str, jobs: Sequence[_Job], cache: ResponseCache, failures: dict[str, str],
                   summary: ProtocolSummary) -> None:
    lines = []
    for job in jobs:
        hit = cache.get(job.key)
        row: dict[str, Any] = {"index": job.cell.index, "path": job.cell.rel, "label": job.cell.label, "key": job.key}
        if hit is not None:
            response = hit.response
            row.update(status="answered", content=hit.content, attempts=hit.attempts, seconds=round(hit.seconds, 3),
                       response_model=response.get("model"), system_fingerprint=response.get("system_fingerprint"))
            if not parse_answer(protocol, hit.content).parsed:
                summary.unparseable += 1
        elif job.key in failures:
            row.update(status="failed", error=failures[job.key])
        else:
            row.update(status="not_sent")
        lines.append(json.dumps(row, ensure_ascii=False))
    with atomic_write(path) as handle:
        handle.write("\n".join(lines) + "\n")


def read_answers(folder: str | Path, protocol: str) -> list[dict[str, Any]]:
    """The answers file of one protocol of a run folder (one dict per cell, in sample order)."""
    path = Path(folder) / ANSWERS_DIR / f"{protocol}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no answers for protocol '{protocol}' (run `hemaclip lvlm run --protocol {protocol}`)")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as err:
        raise DataError(f"{path}: not a valid answers file ({err})") from None


# ------------------------------------------------------------------------------------------------ #
# the run
# ------------------------------------------------------------------------------------------------ #


def api_key_from_env(variable: str | None) -> str | None:
    """The API key from environment variable `variable` (None: no key). The key itself is never logged."""
    if variable is None:
        return None
    value = os.environ.get(variable, "")
    if not value.strip():
        raise HemaclipError(f"--api-key-env {variable}: that environment variable is not set or empty")
    return value.strip()


def _check_run_json(out: Path, model: str, per_class: int, seed: int) -> dict[str, Any] | None:
    path = out / RUN_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise HemaclipError(f"{path}: not a valid run file ({err})") from None
    if meta.get("model") != model:
        raise HemaclipError(f"{out} holds a run of model '{meta.get('model')}', not '{model}': use another --out")
    if meta.get("sample_drawn", True) and (meta.get("per_class"), meta.get("seed")) != (per_class, seed):
        raise HemaclipError(f"{out} was started with --per-class {meta.get('per_class')} --seed {meta.get('seed')}; "
                            "use the same values or another --out")
    return meta


def run_lvlm(
    out: str | Path,
    endpoint: str,
    model: str,
    protocols: Sequence[str] = ("zero-shot",),
    *,
    api_key_env: str | None = None,
    settings: ClientSettings = ClientSettings(),
    per_class: int = 50,
    seed: int = 0,
    data_root: str | Path | None = None,
    sample_csv: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, ProtocolSummary]:
    """Ask `model` at `endpoint` every protocol on every cell of the sample; resume from the cache.

    Everything a user can get wrong (endpoint, protocol, key variable, a run folder of another model or
    sample) is checked before anything is written or sent.
    """
    out = Path(out)
    wanted = list(dict.fromkeys(protocols))
    unknown = [p for p in wanted if p not in PROTOCOLS]
    if unknown or not wanted:
        raise HemaclipError(f"unknown protocol(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PROTOCOLS)}")
    if not model.strip():
        raise HemaclipError("--model must name the model the endpoint serves")
    chat_url(endpoint)  # a bad URL is one line, before anything is written
    api_key = api_key_from_env(api_key_env)
    if per_class < 1:
        raise HemaclipError(f"--per-class must be >= 1, got {per_class}")
    if sample_csv is not None and not Path(sample_csv).is_file():
        raise HemaclipError(f"--sample {sample_csv}: file not found")
    meta = _check_run_json(out, model, per_class, seed)
    progress = sys.stderr.isatty() if progress is None else progress

    with run_log(out, "lvlm run"):
        sample_path = out / SAMPLE_CSV
        if sample_path.is_file():
            cells = read_cells(sample_path, data_root)
        elif sample_csv is not None:
            cells = read_cells(Path(sample_csv), data_root)
            shutil.copyfile(sample_csv, sample_path)
            beside = Path(sample_csv).with_name(FEWSHOT_CSV)
            if beside.is_file() and not (out / FEWSHOT_CSV).is_file():
                shutil.copyfile(beside, out / FEWSHOT_CSV)
        else:
            cells = draw_sample(data_root, per_class, seed)
            write_cells(sample_path, cells)
        examples: list[Cell] = []
        if "few-shot" in wanted:
            few_path = out / FEWSHOT_CSV
            if few_path.is_file():
                examples = read_cells(few_path, data_root)
            else:
                examples = draw_few_shot(data_root, seed)
                write_cells(few_path, examples)
        done = sorted(set((meta or {}).get("protocols", [])) | set(wanted), key=PROTOCOLS.index)
        write_json(out / RUN_JSON, {
            "model": model, "endpoint": redact_url(endpoint), "protocols": done, "prompt_version": PROMPT_VERSION,
            "per_class": per_class, "seed": seed, "sample_drawn": sample_csv is None and (meta or {}).get("sample_drawn", True),
            "cells": len(cells), "sample_counts": dict(sorted(Counter(c.label for c in cells).items())),
            "settings": {"temperature": settings.temperature, "max_tokens": settings.max_tokens},
        })
        log.info("lvlm run: model %s at %s, %d cells, protocol(s) %s", model, redact_url(endpoint), len(cells), ", ".join(wanted))
        summaries: dict[str, ProtocolSummary] = {}
        with ResponseCache(out / CACHE_FILE) as cache:
            for protocol in wanted:
                jobs = _jobs(protocol, model, cells, examples, settings)
                summary = ProtocolSummary(protocol, cells=len(jobs))
                missing = [j for j in jobs if cache.get(j.key) is None]
                summary.cached = len(jobs) - len(missing)
                failures: dict[str, str] = {}
                if missing:
                    async def ask(missing: list[_Job] = missing, summary: ProtocolSummary = summary,
                                  failures: dict[str, str] = failures) -> int:
                        async with ChatClient(endpoint, api_key, settings) as client:
                            await _ask(missing, client, cache, model, protocol, summary, failures, progress)
                            return client.requests_sent

                    sent = asyncio.run(ask())
                    if settings.max_requests is not None:  # one budget for all protocols of this run
                        settings = dataclasses.replace(settings, max_requests=max(0, settings.max_requests - sent))
                (out / ANSWERS_DIR).mkdir(exist_ok=True)
                _write_answers(out / ANSWERS_DIR / f"{protocol}.jsonl", protocol, jobs, cache, failures, summary)
                summaries[protocol] = summary
                log.info("%s: %d of %d cells answered (%d from the cache, %d now), %d failed, %d not sent (budget), "
                         "%d unparseable", protocol, summary.answered, summary.cells, summary.cached, summary.answered_now,
                         summary.failed, summary.not_sent, summary.unparseable)
                for error, count in summary.errors.most_common(3):
                    log.info("  %d x %s", count, error)
    return summaries
