"""`hemaclip serve`: the web page and JSON API on this machine (loopback by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hemaclip.commands.common import CheckpointOption, DataOption, console, logger
from hemaclip.errors import HemaclipError


def serve_command(
    host: Annotated[str, typer.Option(help="Address to bind. The default serves this machine only; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    checkpoint: CheckpointOption = None,
    index: Annotated[
        Optional[Path], typer.Option("--index", help="Index to search and to take neighbours from (default: WBCAtt train, built once).")
    ] = None,
    data: DataOption = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload in MB.", min=0.01)] = 10.0,
    stain_norm: Annotated[str, typer.Option("--stain-norm", help="Stain normalisation of uploads: none, macenko or reinhard.")] = "none",
    classes: Annotated[Optional[str], typer.Option("--classes", help="Comma-separated classes the uploads can show (e.g. the five "
                                                   "white-cell classes of a white-cell-only export): the class read-out is "
                                                   "renormalised over them (default: every class of the model).")] = None,
    saliency: Annotated[bool, typer.Option("--saliency/--no-saliency", help="Compute a Grad-CAM overlay for each upload.")] = True,
    max_megapixels: Annotated[
        float, typer.Option(help="Largest accepted image in megapixels (12: a 4000x3000 camera field; a cell image is about 0.13).", min=0.01)
    ] = 12.0,
    allow_host: Annotated[
        Optional[list[str]], typer.Option("--allow-host", help="Another name this server is reached by (Host header); repeatable.")
    ] = None,
    max_connections: Annotated[int, typer.Option(help="Uploads in progress at once; more get 503 (bounds upload memory). "
                                                 "The server keeps room for more connections than this, so the page and "
                                                 "/api/health answer while uploads wait.", min=1)] = 64,
    body_timeout: Annotated[float, typer.Option("--body-timeout", help="Seconds an upload's body may take to arrive "
                                                "(408 after): slow clients cannot hold upload slots.", min=0.1, max=3600)] = 30.0,
    review: Annotated[Optional[Path], typer.Option("--review", help="Serve the review page of a folder written by `hemaclip review` "
                                                   "(keyboard corrections saved in its review.sqlite); no model is loaded.")] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="HEMACLIP_TOKEN", help="Every request must carry it "
                                                 "(Authorization: Bearer TOKEN, or ?token=TOKEN in the page's address); "
                                                 "required when --host is not loopback.", show_default=False)] = None,
    lab: Annotated[Optional[str], typer.Option("--lab", help="Read uploads through this lab's fitted read-out (profiles with "
                                               "the 'model' tower only; `hemaclip lab add/fit`).", show_default=False)] = None,
    labs: Annotated[Optional[Path], typer.Option("--labs", help="Folder of lab profiles.", show_default=False)] = None,
) -> None:
    """Serve the hemaclip page (upload a cell image, search by description) and its JSON API (/docs).

    Example: hemaclip serve --port 8000   then open http://127.0.0.1:8000
    """
    from hemaclip.serve.security import allowed_hosts_for, check_exposure

    check_exposure(host, token)  # before loading anything: off loopback, a token is required
    hosts = allowed_hosts_for(host, tuple(allow_host or ()))
    if review is not None:
        _serve_review(review, host, port, token, hosts)
        return
    import uvicorn

    from hemaclip.data.stain import get_normalizer
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.serve.app import ServeSettings, create_app, server_config
    from hemaclip.tasks.describe import Describer
    from hemaclip.cache import file_sha1
    from hemaclip.tasks.index import CellIndex

    path = resolve_checkpoint(checkpoint)
    profile = None
    if lab is not None:
        from hemaclip.tasks.lab import open_for_model

        profile = open_for_model(lab, labs, checkpoint)
        profile.head()
        if list(profile.meta["towers"]) != ["model"]:
            raise HemaclipError(f"lab '{lab}' reads DINOv2 features from files; the server reads uploads with 'model'-tower profiles only")
    loaded_index = CellIndex.load(index) if index is not None else None
    logger.info("loading the model%s", " and building the reference index (first run only)" if index is None else "")
    from hemaclip.tasks.lab import checkpoint_for

    path = Path(checkpoint_for(profile, path))  # a fine-tuned lab reads (and indexes) with its own model
    describer = Describer.from_checkpoint(path, index=loaded_index, data_root=data, stain_normalizer=get_normalizer(stain_norm), progress=True,
                                          classes=classes)
    if loaded_index is None:
        describer.build_reference_index()
    if profile is not None:
        from hemaclip.tasks.lab import lab_reader

        describer.use_lab(lab_reader(profile, describer), profile.name)
    search_index = describer.index
    if search_index is not None and search_index.checkpoint_id != file_sha1(path):
        raise HemaclipError(f"{index}: built by another checkpoint than {path}; pass the matching --checkpoint or rebuild the index")
    pixels = int(max_megapixels * 1e6)
    settings = ServeSettings(max_upload_bytes=int(max_upload_mb * 1024 * 1024), saliency=saliency, max_upload_pixels=pixels,
                             allowed_hosts=hosts, max_uploads=max_connections, body_timeout_s=body_timeout)
    app = create_app(describer, search_index, settings=settings, token=token)
    logger.info("answering requests for host names: %s", ", ".join(settings.allowed_hosts))
    address = f"http://{host}:{port}/" + ("?token=..." if token else "")
    console.print(f"hemaclip at {address}  (API docs: http://{host}:{port}/docs; stop with Ctrl+C)")
    uvicorn.Server(server_config(app, host, port, settings)).run()


def _serve_review(folder: Path, host: str, port: int, token: str | None, hosts: tuple[str, ...]) -> None:
    """The review page (no model): the same Host and token guard as the describe server."""
    import uvicorn

    from hemaclip.serve.review import create_review_app

    app = create_review_app(folder, token=token, allowed_hosts=hosts)
    address = f"http://{host}:{port}/" + ("?token=..." if token else "")
    console.print(f"hemaclip review of {folder} at {address}  (stop with Ctrl+C; every correction is saved as it is made)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    """Add the top-level `serve` command."""
    app.command("serve")(serve_command)
