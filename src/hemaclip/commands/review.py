"""`hemaclip review`: a folder of cells as a lab reviews a slide (differential, queue, galleries), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hemaclip.commands.common import CheckpointOption, DataOption, console, logger
from hemaclip.errors import HemaclipError
from hemaclip.io import check_output_dir
from hemaclip.tasks.adapter import ADAPTER_FILE
from hemaclip.tasks.review import DEFAULTS, ReviewSettings


def review(
    folder: Annotated[list[Path], typer.Argument(help="Image files or folders (walked recursively): crops, an export, fields.")],
    out: Annotated[Path, typer.Option("--out", help="Review folder: review.sqlite, review.json, cells.csv, report.html.")],
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images decoded and run per batch.")] = DEFAULTS.batch_size,
    learn_from: Annotated[Optional[Path], typer.Option("--learn-from", help="A review folder whose corrections teach the "
                                                       "class read-out (an adapter on the frozen embeddings, saved as "
                                                       "OUT/adapter.npz) before this folder is read.", show_default=False)] = None,
    lab: Annotated[Optional[str], typer.Option("--lab", help="Read classes through this lab's fitted read-out (`hemaclip lab "
                                               "add/fit`); a review folder keeps one lab throughout.", show_default=False)] = None,
    labs: Annotated[Optional[Path], typer.Option("--labs", help="Folder of lab profiles.", show_default=False)] = None,
) -> None:
    """Review a folder of cells at once: the differential count with 95 % Wilson intervals, the cells sorted for
    review (unfamiliar first, then lowest confidence), galleries per class and the attributes per class, in a
    self-contained report.html and review.json. Running it again resumes (only new files are described) and
    rewrites the reports with the corrections made in `hemaclip serve --review OUT`. Not a diagnosis.

    Example: hemaclip review ../shared/data/lisc/neutrophil --out review/lisc-neutrophils
    """
    from hemaclip.cache import file_sha1
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.describe import Describer, iter_image_paths
    from hemaclip.tasks.review import REVIEW_STORE, check_review_store, review_folder, write_review_reports

    check_output_dir(out)
    for item in folder:  # before loading the model: a mistyped path is one line, not a run
        if not item.exists():
            raise HemaclipError(f"{item}: no such file or folder")
    if (out / REVIEW_STORE).exists():  # a damaged store is refused before the model loads, and left as it is
        check_review_store(out / REVIEW_STORE)
    if next(iter_image_paths(folder), None) is None:
        raise HemaclipError(f"no image files found in {', '.join(str(p) for p in folder)}")
    path = resolve_checkpoint(checkpoint)
    model_sha1 = file_sha1(path)
    adapter = adapter_id = None
    profile = None
    if lab is not None and learn_from is not None:
        raise HemaclipError("--lab and --learn-from are two read-outs; choose one")
    if lab is not None:
        from hemaclip.tasks.lab import open_for_model

        profile = open_for_model(lab, labs, checkpoint)
        adapter_id = f"lab:{profile.name}@{file_sha1(profile.root / 'head.npz')}" if (profile.root / "head.npz").is_file() else None
        profile.head()
    if learn_from is not None:
        adapter, adapter_id = _adapter_from(learn_from, model_sha1)
    from hemaclip.tasks.lab import checkpoint_for

    describer = Describer.from_checkpoint(checkpoint_for(profile, path), index=None, data_root=data)
    if profile is not None:
        from hemaclip.tasks.lab import lab_reader

        describer.use_lab(lab_reader(profile, describer), profile.name)
    if not describer.calibrated:
        logger.warning("warning: probabilities are uncalibrated (T = 1): %s", describer.uncalibrated_reason)
    store = review_folder(describer, model_sha1, folder, out, settings=ReviewSettings(batch_size=batch_size),
                          adapter=adapter, adapter_id=adapter_id)
    try:
        if adapter is not None:
            adapter.save(out / ADAPTER_FILE)
        summary = write_review_reports(store, out)
    finally:
        store.close()
    changes = summary["changes"] or {}
    if changes.get("changed") or changes.get("removed"):
        console.print(f"since the last run: {changes['changed']} file(s) changed, {changes['removed']} removed; their "
                      f"{changes['cells']} earlier cell(s) are no longer counted (corrections of unchanged files are kept)")
    for item in summary["errors"]:
        logger.warning("warning: %s", item["error"])
    if summary["warning"]:
        logger.warning("%s", summary["warning"])
    console.print(f"{summary['cells']} cells ({summary['white_cells']} in the differential), {summary['reviewed']} reviewed")
    for name, row in summary["differential"].items():
        if row["count"]:
            console.print(f"  {name:<12} {row['count']:>5}  {row['share']:6.1%}  [{row['low']:.1%}, {row['high']:.1%}]")
    console.print(f"written to {out}/report.html, review.json, cells.csv; review it with: hemaclip serve --review {out}")
    if summary["errors"]:
        raise HemaclipError(f"{len(summary['errors'])} file(s) could not be described (see the warnings above)")


def _adapter_from(folder: Path, model_sha1: str) -> tuple[Any, str]:
    """The adapter taught by the corrections of review `folder` (made with the same model) and its id."""
    from hemaclip.tasks.adapter import fit_adapter_from_store
    from hemaclip.tasks.review import REVIEW_STORE, ReviewStore

    source = ReviewStore(folder / REVIEW_STORE)
    if source.meta().get("model_sha1") != model_sha1:
        raise HemaclipError(f"--learn-from {folder}: that review was made with another model")
    adapter = fit_adapter_from_store(source)
    last = source.corrections()[-1]["id"]
    source.close()
    logger.info("adapter taught by %d reviewed cells of %s (L2 %g)", adapter.n_cells, folder, adapter.l2)
    return adapter, f"{folder.resolve()}@correction-{last}"


def review_export(
    review_dir: Annotated[Path, typer.Argument(help="A review folder (from `hemaclip review`).")],
    to: Annotated[Path, typer.Option("--to", help="New folder for the export (must not exist).")],
) -> None:
    """Export the reviewed white cells as a `folder` dataset (DEST/<class>/cell-ID.png and attributes.csv with a
    split column: 70/10/20 by source file), to train or evaluate on: --dataset folder --data DEST.

    Example: hemaclip review-export review/slide-12 --to reviewed/slide-12
    """
    from hemaclip.tasks.review import REVIEW_STORE, ReviewStore, export_reviewed

    store = ReviewStore(review_dir / REVIEW_STORE)
    try:
        counts = export_reviewed(store, to)
    finally:
        store.close()
    console.print(f"{sum(counts.values())} reviewed cells written to {to} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")


def register(app: typer.Typer) -> None:
    app.command("review")(review)
    app.command("review-export")(review_export)
