"""`hemaclip index build|info` and `hemaclip search`: embed a cell collection once, then find cells by
description or by example image, optionally restricted by class, split or attribute values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hemaclip.commands.common import CheckpointOption, DataOption, console, logger
from hemaclip.errors import HemaclipError
from hemaclip.io import check_output_dir

index_app = typer.Typer(help="Build and inspect searchable indexes of cell images (FAISS + SQLite metadata).", no_args_is_help=True)

StainOption = Annotated[
    str, typer.Option("--stain-norm", help="Stain normalisation before the model: none, macenko or reinhard.")
]


def parse_where(items: list[str] | None) -> dict[str, str]:
    """`["granule_colour=red", "label=eosinophil"]` -> a dict; a malformed item is a one-line error."""
    where: dict[str, str] = {}
    for item in items or []:
        column, sep, value = item.partition("=")
        if not sep or not column.strip() or not value.strip():
            raise HemaclipError(f"--where {item}: expected COLUMN=VALUE, e.g. --where granule_colour=red")
        where[column.strip()] = value.strip()
    return where


@index_app.command("build")
def index_build(
    out: Annotated[Path, typer.Option("--out", help="Index folder to create (or to finish, after a stop).")],
    dataset: Annotated[
        Optional[str], typer.Option(help="Dataset to index: wbcatt, pbc, pbc11 or all (with --data as its root).")
    ] = None,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "all",
    attributes_csv: Annotated[
        Optional[Path], typer.Option(help="With --data DIR and no --dataset: CSV of the 11 attributes (default DIR/attributes.csv).")
    ] = None,
    checkpoint: CheckpointOption = None,
    kind: Annotated[str, typer.Option(help="auto (flat below 50,000 images, else ivf), flat, ivf or hnsw.")] = "auto",
    shard_size: Annotated[int, typer.Option(help="Images per saved shard of embeddings (the unit of resume).", min=1)] = 2048,
    batch_size: Annotated[int, typer.Option(help="Images per model forward pass.", min=1)] = 64,
    stain_norm: StainOption = "none",
) -> None:
    """Embed a collection of cell images into a searchable index (resumable: rerun after a stop or kill).

    A folder of your own images (label = parent folder name): hemaclip index build --data cells/ --out cells.index
    A packaged dataset: hemaclip index build --dataset wbcatt --split test --out wbc-test.index
    """
    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.stain import get_normalizer
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.index import INDEX_KINDS, CellIndex

    if kind not in INDEX_KINDS:
        raise HemaclipError(f"--kind must be one of {', '.join(INDEX_KINDS)}, not '{kind}'")
    check_output_dir(out)
    if dataset is None and data is None:
        raise HemaclipError("say what to index: --data DIR (a folder of images) or --dataset NAME")
    if dataset is None or dataset == "folder":
        loaded = load_dataset("folder", folder=data, attributes_csv=attributes_csv)
        source = f"folder {data}"
    else:
        loaded = load_dataset(dataset, data_root=data)
        source = f"dataset {dataset}"
    records = loaded.split(split)
    normalizer = get_normalizer(stain_norm)
    path = resolve_checkpoint(checkpoint)
    model, _ = load_for_inference(path)
    index = CellIndex.build(
        model,
        records,
        out,
        checkpoint_id=file_sha1(path),
        kind=kind,
        shard_size=shard_size,
        progress=True,
        stain_normalizer=normalizer,
        batch_size=batch_size,
        source=f"{source}, split {split}",
        checkpoint_path=path,
    )
    counts = index.build_counts
    console.print(
        f"{out}: {len(index)} images, {index.dim}-d, {index.kind} index "
        f"({counts.get('computed', 0)} shards embedded, {counts.get('reused', 0)} reused from an earlier run)"
    )


@index_app.command("info")
def index_info(
    index: Annotated[Path, typer.Argument(help="Index folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what an index holds: size, kind, the checkpoint that built it, counts per class and split.

    Example: hemaclip index info wbc-test.index
    """
    from hemaclip.tasks.index import CellIndex

    summary = CellIndex.load(index).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{index}", title_justify="left", show_header=False)
    for key in ("count", "embed_dim", "kind", "nprobe", "ef_search", "checkpoint_id", "checkpoint_path", "stain_norm", "source", "hemaclip_version", "created", "with_attributes"):
        if key in summary and summary[key] not in ("", None):
            table.add_row(key, str(summary[key]))
    table.add_row("per class", ", ".join(f"{k} {v}" for k, v in summary["per_label"].items()))
    table.add_row("per split", ", ".join(f"{k} {v}" for k, v in summary["per_split"].items()))
    console.print(table)


def search_command(
    query: Annotated[Optional[str], typer.Argument(help="What to look for, in words.", show_default=False)] = None,
    index: Annotated[Path, typer.Option("--index", help="Index folder made by 'hemaclip index build'.")] = Path("cells.index"),
    image: Annotated[Optional[Path], typer.Option("--image", help="Find cells that look like this image instead.")] = None,
    k: Annotated[int, typer.Option("-k", help="Number of hits.", min=1)] = 10,
    where: Annotated[
        Optional[list[str]], typer.Option("--where", help="Keep rows whose COLUMN equals VALUE (repeatable): label, split, fine_label or an attribute.")
    ] = None,
    checkpoint: CheckpointOption = None,
    stain_norm: Annotated[
        Optional[str], typer.Option("--stain-norm", help="For --image: none, macenko or reinhard (default: what the index used).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per query.")] = False,
) -> None:
    """Search an index by description or by example image; hits show path, class, score and attributes.

    Example: hemaclip search "large cell with a segmented nucleus and coarse red granules" --index wbc-test.index -k 10
    Filtered: hemaclip search "round nucleus" --index wbc-test.index --where granule_colour=nil --where cell_size=small
    By image: hemaclip search --image my_cell.jpg --index wbc-test.index
    """
    from hemaclip.data.stain import get_normalizer
    from hemaclip.models.inference import embed_texts
    from hemaclip.data.preprocess import preprocess_for
    from hemaclip.tasks.index import CellIndex, embed_images, index_model

    if (query is None or not query.strip()) and image is None:
        raise HemaclipError("empty query: give a description in words or --image FILE")
    if query is not None and query.strip() and image is not None:
        raise HemaclipError("give either a text query or --image, not both")
    filters = parse_where(where)
    cell_index = CellIndex.load(index)
    if filters:
        cell_index.matching_rows(filters)  # unknown columns/values fail here, before the model loads
    model, path = index_model(cell_index, checkpoint)
    from hemaclip.cache import file_sha1

    if checkpoint is not None and file_sha1(path) != cell_index.checkpoint_id:
        logger.warning("note: %s did not build %s; scores compare two different models' embeddings", path, index)
    if image is not None:
        name = stain_norm if stain_norm is not None else str(cell_index.meta.get("stain_norm_name", "none"))
        vectors = embed_images(model, preprocess_for(model).load(image)[None], stain_normalizer=get_normalizer(name))
        label = str(image)
    else:
        vectors = embed_texts(model, [query or ""])
        label = query or ""
    hits = cell_index.search(vectors, k=k, where=filters or None)[0]
    if as_json:
        typer.echo(json.dumps({"query": label, "index": str(index), "where": filters, "hits": hits}))
        return
    table = Table(title=f"{len(hits)} hits for {label!r} in {index}" + (f" where {filters}" if filters else ""), title_justify="left")
    for column in ("#", "score", "class", "image", "attributes"):
        table.add_column(column)
    for rank, hit in enumerate(hits, start=1):
        attributes = ", ".join(f"{k}={v}" for k, v in hit["attributes"].items()) or "-"
        table.add_row(str(rank), f"{hit['score']:.3f}", str(hit["label"]), str(hit["path"]), attributes)
    console.print(table)
    if len(hits) < k:
        logger.info("note: only %d rows match", len(hits))


def register(app: typer.Typer) -> None:
    """Add `index build|info` and the top-level `search` command."""
    app.add_typer(index_app, name="index")
    app.command("search")(search_command)

