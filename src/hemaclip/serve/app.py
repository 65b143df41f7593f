"""The hemaclip web app: one static page and a small JSON API over a Describer and a CellIndex.

Why it is built this way:

* `create_app` takes already-loaded objects (describer, index, model), so tests run it on a tiny
  random model and a 20-image index, and the `serve` command decides what to load.
* Uploads are read into memory with a hard byte limit (checked on Content-Length and again while
  the body streams), decoded fully with PIL (the content decides, not the header or file name), and
  never written to a named file. Every failure is a 4xx JSON ``{"detail": "..."}`` a person can act on:
  415 not an image / wrong content type, 413 too large (bytes, or pixels: ``max_upload_pixels``, 12
  megapixels by default, judged from the image header before decoding), 422 corrupt or truncated.
* Decoding runs in a few worker threads of its own, which also cut the picture into the model's small
  views and drop it, within a budget of pixels being decoded at once (one full-size picture), and describe requests
  are answered in micro-batches by one model call (:mod:`hemaclip.serve.workers`).
* Only requests whose Host header names this server are answered (``allowed_hosts``: the loopback names
  by default), so a web page cannot reach a loopback server through DNS rebinding; with a token, only
  requests that carry it (:mod:`hemaclip.serve.security`). No CORS headers are sent: browsers let only
  pages of this server's own origin read its answers.
* Uploads in progress are bounded by upload slots, not by the server's connection limit, and a body must
  arrive within ``body_timeout_s``: slow clients cannot starve ``/api/health`` or the page.
* Reference images are served by index row only (`/api/reference/{row}/image`): the path comes from
  the index's own table, so no request can name a file.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect
from PIL import Image

from hemaclip import __version__
from hemaclip.data.preprocess import ImageDecodeError, decode_image
from hemaclip.errors import HemaclipError
from hemaclip.log import get_logger
from hemaclip.serve.security import LOOPBACK_HOSTS, allowed_hosts_for, guard
from hemaclip.serve.workers import (
    DEFAULT_BATCH_WAIT_S,
    LARGE_UPLOAD_BYTES,
    LARGE_UPLOAD_PIXELS,
    DecodePool,
    DescribeBatcher,
    PixelBudget,
    UploadError,
    UploadSlots,
    release_memory,
)

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.index import CellIndex

__all__ = ["LOOPBACK_HOSTS", "MAX_UPLOAD_PIXELS", "ServeSettings", "UploadError", "allowed_hosts_for", "create_app", "decode_upload", "parse_where_param",
           "server_config"]

IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
# Raw image bodies may say so, or be generic bytes; forms (curl -F) are read the same way.
RAW_TYPES = ("image/", "application/octet-stream")
FORM_TYPE = "multipart/form-data"
DISCLAIMER = "Research software: these readings are not a diagnosis."
logger = get_logger(__name__)

# 12 megapixels: a 4000x3000 camera field (the full frame of a 12-MP microscope or phone camera) passes,
# 640x480 to 5-MP microscope cameras pass easily, and a cell image is about 0.13 (PBC: 360x363). Decoded,
# 12 MP is 36 MB of RGB (up to about 200 MB while PIL converts an RGBA PNG); 64 MP, the old limit, was
# 192 MB and eight of them took the server from 1.1 to 4.8 GB.
MAX_UPLOAD_PIXELS = 12_000_000


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the API (the first ones configurable from `hemaclip serve`).

    `max_upload_pixels`: largest image accepted (413 beyond, from the header, before decoding);
    `decode_workers`: uploads decoded at once (each in a worker thread), within a budget of
    `max_upload_pixels` pixels being decoded at once;
    `batch_size` / `batch_wait_ms`: micro-batching of describe requests (the wait lasts only while uploads
    are decoding); `allowed_hosts`: Host header
    names answered (others get 400), "*" for any; `max_uploads`: describe requests in progress at once
    (more get 503 before their body is read: bounds upload memory, while /api/health and the page keep
    answering); `body_timeout_s`: time for an upload's whole body to arrive (408 after).
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_k: int = 100
    default_k: int = 12
    saliency: bool = True
    max_upload_pixels: int = MAX_UPLOAD_PIXELS
    decode_workers: int = 2
    batch_size: int = 32
    batch_wait_ms: float = 1000 * DEFAULT_BATCH_WAIT_S
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_uploads: int = 64
    body_timeout_s: float = 30.0


# Connections the server holds per upload slot: requests that are not uploads keep room beside them.
CONNECTIONS_PER_UPLOAD = 4

# HTTP status of each way an upload can fail to decode (hemaclip.data.preprocess.ImageDecodeError.kind).
DECODE_STATUS = {"empty": 415, "not_image": 415, "format": 415, "too_large": 413, "corrupt": 422, "too_small": 422}


def decode_upload(data: bytes, name: str = "upload", max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """Decode image bytes fully into RGB through the one decoder (the content decides the type), or
    raise UploadError: 415 not an image or not an accepted format, 413 more than `max_pixels` (judged
    from the header, before decoding), 422 corrupt, truncated or too small."""
    try:
        return decode_image(bytes(data), name, formats=IMAGE_FORMATS, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        detail = str(exc)
        if exc.kind == "too_large":
            detail += (f"; this server takes up to {max_pixels / 1e6:g} megapixels, enough for a "
                       f"{_example_field(max_pixels)} camera field (a cell image is about 0.13)")
        raise UploadError(DECODE_STATUS.get(exc.kind, 422), detail) from None


def _example_field(pixels: int) -> str:
    """A 4:3 frame of about `pixels` pixels, e.g. '4000x3000', for messages."""
    side = int((pixels / 12) ** 0.5)
    return f"{4 * side}x{3 * side}"


def _cut_upload(describer: Describer, data: bytes, name: str, max_pixels: int, budget: PixelBudget) -> tuple[list[Any], list[int]]:
    """Decode an upload and cut it into the views the model reads (in a decode worker), within the pixel
    budget; returns the views and the picture's [width, height]. The full picture is dropped here, so
    only the small views wait for the model."""
    pixels = _header_pixels(data, max_pixels)
    with budget.claim(pixels):
        try:
            image = decode_upload(data, name, max_pixels)
            size = [int(image.width), int(image.height)]
            try:
                views = describer.views(image)
            except (HemaclipError, OSError, ValueError) as exc:
                raise UploadError(422, f"{name}: cannot be read as a cell picture ({str(exc).splitlines()[0][:200]})") from None
            del image
            return views, size
        finally:  # inside the budget: the next large decode starts once this one's memory is back
            if pixels >= LARGE_UPLOAD_PIXELS or len(data) >= LARGE_UPLOAD_BYTES:
                release_memory()


def _header_pixels(data: bytes, max_pixels: int) -> int:
    """Pixels an upload says it has (its header only; 0 when it has none a decoder reads, or more than
    `max_pixels`: the decoder refuses those without decoding them)."""
    import io

    try:  # no warnings.catch_warnings here: it changes process-wide filters, and decodes run in threads
        with Image.open(io.BytesIO(data)) as probe:
            pixels = int(probe.size[0]) * int(probe.size[1])
    except Exception:  # noqa: BLE001 - not an image, a bomb or a broken header: decode_upload says which
        return 0
    return pixels if pixels <= max_pixels else 0


def parse_where_param(items: list[str] | None) -> dict[str, str]:
    """`where=granule_colour=red&where=label=eosinophil` (or one comma-separated item) -> dict."""
    where: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            column, sep, value = part.partition("=")
            if not sep or not column.strip() or not value.strip():
                raise HTTPException(400, f"where '{part}': expected COLUMN=VALUE, e.g. granule_colour=red")
            where[column.strip()] = value.strip()
    return where


async def _read_limited(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes, and with 408 when it
    has not all arrived within `timeout_s` seconds (a slow or stalled client would hold its connection, and an
    upload slot, for as long as it likes). A client that goes away mid-upload is logged in one line."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise UploadError(413, f"upload of {int(declared)} bytes is larger than the limit of {limit} bytes")
        except ValueError:
            raise UploadError(400, "invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise UploadError(413, f"upload is larger than the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise UploadError(408, f"the upload did not arrive within {timeout_s:g} s ({size} bytes received)") from None
    except ClientDisconnect:
        client = request.client.host if request.client else "a client"
        logger.warning("%s went away mid-upload (%d bytes received)", client, size)
        raise UploadError(400, "client disconnected mid-upload") from None  # the answer goes nowhere
    return b"".join(chunks)


async def _upload_bytes(request: Request, settings: ServeSettings) -> tuple[bytes, str]:
    """Image bytes and a display name from a raw image body or a multipart form field 'file'."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (content_type.startswith(RAW_TYPES) or content_type == FORM_TYPE):
        shown = content_type or "none"
        raise UploadError(415, f"content type '{shown}' is not accepted: send the image bytes as image/* or a multipart form field 'file'")
    # A form carries a little overhead beyond the file itself.
    body = await _read_limited(request, settings.max_upload_bytes + (64 * 1024 if content_type == FORM_TYPE else 0),
                              settings.body_timeout_s)
    if content_type != FORM_TYPE:
        from urllib.parse import unquote

        return body, unquote(request.headers.get("x-filename", "upload"))[:200]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive=receive)
    try:
        form = await replay.form(max_files=1, max_fields=8, max_part_size=settings.max_upload_bytes)
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException for bad forms
        raise UploadError(400, f"malformed multipart form ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        item = form.get("file")
        if item is None or isinstance(item, str):
            raise UploadError(400, "multipart form needs a file field named 'file'")
        data = await item.read()
        if len(data) > settings.max_upload_bytes:
            raise UploadError(413, f"upload is larger than the limit of {settings.max_upload_bytes} bytes")
        return data, str(item.filename or "upload")[:200]
    finally:
        await form.close()


def _saliency_functions() -> tuple[Any, Any] | None:
    try:
        from hemaclip.tasks.saliency import overlay_png, saliency_map
    except ImportError:
        return None
    return saliency_map, overlay_png


def _with_image_urls(hits: list[dict[str, Any]], row_for_path: Any) -> list[dict[str, Any]]:
    """Hits for the browser: paths stay server-side facts, images are fetched by index row
    (`row_for_path`: the index's lookup, or None without an index)."""
    out = []
    for hit in hits:
        item = {k: v for k, v in hit.items() if k != "path"}
        row = hit.get("row")
        if row is None and row_for_path is not None and hit.get("path"):
            row = row_for_path(str(hit["path"]))
        item["row"] = None if row is None else int(row)
        item["name"] = str(hit.get("path", "")).replace("\\", "/").rsplit("/", 1)[-1]
        item["image_url"] = None if row is None else f"/api/reference/{int(row)}/image"
        out.append(item)
    return out


def create_app(
    describer: Describer | None = None,
    index: CellIndex | None = None,
    *,
    model: DualEncoder | None = None,
    settings: ServeSettings = ServeSettings(),
    title: str = "hemaclip",
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app. `describer` (hemaclip.tasks.describe.Describer) answers /api/describe; `index`
    (CellIndex) answers /api/search and, if given, is also where the describer finds neighbours;
    `model` embeds text queries (default: the describer's model). Any of them may be None: the
    endpoints that need it answer 503 with a message. With `token`, every request must carry it
    (:func:`hemaclip.serve.security.guard`)."""
    if index is None and describer is not None:
        index = getattr(describer, "index", None)
    elif index is not None and describer is not None:
        describer.index = index  # neighbours and search share rows, so thumbnails resolve the same way
    if model is None and describer is not None:
        model = describer.model
    if model is not None and index is not None:
        index.check_model(model)
    saliency = _saliency_functions() if settings.saliency else None
    model_lock = threading.Lock()  # one forward pass at a time: the CPU is the bottleneck anyway
    decoder = DecodePool(settings.decode_workers)
    budget = PixelBudget(settings.max_upload_pixels)  # one full-size picture decoding at a time
    row_for_path = index.row_for_path if index is not None else None
    uploads = UploadSlots(settings.max_uploads)
    batcher = None
    if describer is not None:
        batcher = DescribeBatcher(describer, lock=model_lock, saliency=saliency, max_batch=settings.batch_size,
                                  max_wait_s=settings.batch_wait_ms / 1000)

    app = FastAPI(
        title=title,
        version=__version__,
        description=(
            "Describe blood-cell images (class, 11 morphological attributes, a grounded sentence, saliency, "
            "nearest reference cells) and search cells by description. " + DISCLAIMER
        ),
    )
    app.state.describe_batcher = batcher  # its batch sizes, for tests and the load benchmark
    # Only requests for this server's own names (no DNS rebinding) and, with a token, carrying it.
    guard(app, settings.allowed_hosts, token)
    static = resources.files("hemaclip.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(HemaclipError)
    async def _user_error(_: Request, exc: HemaclipError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/health", summary="What the server has loaded")
    async def health() -> dict[str, Any]:  # on the event loop: answers while uploads decode and batches run
        config = getattr(model, "config", None)
        return {
            "status": "ok",
            "version": __version__,
            "describe": describer is not None,
            "search": index is not None and model is not None,
            "saliency": saliency is not None and describer is not None,
            "calibrated": bool(getattr(describer, "calibrated", False)),
            # The classes the read-out is restricted to (serve --classes); null: every class of the model.
            "classes": getattr(describer, "allowed_classes", None),
            "model": {"image_tower": getattr(config, "image_tower", None), "image_size": getattr(config, "image_size", None)}
            if config is not None
            else None,
            "index": {"count": len(index), "kind": index.kind, "dim": index.dim} if index is not None else None,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_upload_pixels": settings.max_upload_pixels,
            "describe_batches": _batch_stats(batcher),
            "filter_columns": _filter_columns(index),
            "disclaimer": DISCLAIMER,
        }

    @app.post(
        "/api/describe",
        summary="Describe one cell image",
        description=(
            "Send the image bytes as the body (Content-Type image/jpeg, image/png, ...) or as a multipart form "
            "field 'file'. Returns the class with calibrated probability, the 11 attributes, a sentence that states "
            "only confident attributes, the nearest reference cells and a saliency overlay (PNG data URL). "
            "Errors: 413 too large (bytes, or more pixels than max_upload_pixels in /api/health), 415 not an image / "
            "wrong content type, 422 corrupt or truncated image."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
                    },
                },
            }
        },
    )
    async def describe(request: Request, saliency_map: bool = Query(True, alias="saliency")) -> JSONResponse:
        if describer is None:
            raise HTTPException(503, "this server was started without a model to describe cells")
        with uploads.take():
            data, name = await _upload_bytes(request, settings)

            def cut_and_queue() -> Any:  # in the decode thread: the batch gets the views as soon as they are cut
                views, size = _cut_upload(describer, data, name, settings.max_upload_pixels, budget)
                return batcher.submit(views, name, size, saliency_map)

            async with batcher.on_the_way():
                answer = await decoder.run(cut_and_queue)
            del data
        result = await asyncio.wrap_future(answer)
        for reading in [result, *result.get("cells", [])]:  # every cell's neighbours get browser-ready links
            reading["neighbours"] = _with_image_urls(list(reading.get("neighbours") or []), row_for_path)
        result["disclaimer"] = DISCLAIMER
        return JSONResponse(result)  # plain JSON types already: FastAPI's encoder pass cost about 1 ms a request

    @app.get("/api/search", summary="Find cells by description")
    def search(
        q: str = Query(..., description="What to look for, e.g. 'large cell with coarse red granules'."),
        k: int = Query(settings.default_k, ge=1, le=settings.max_k, description="Number of hits."),
        where: list[str] | None = Query(None, description="COLUMN=VALUE filters (repeat, or comma-separate)."),
    ) -> dict[str, Any]:
        if index is None or model is None:
            raise HTTPException(503, "this server was started without an index to search")
        if not q.strip():
            raise HTTPException(400, "empty query: describe the cells to find")
        filters = parse_where_param(where)
        from hemaclip.models.inference import embed_texts

        if filters:
            index.matching_rows(filters)  # unknown column/value -> 400 before any model work
        with model_lock:
            vectors = embed_texts(model, [q])
        hits = index.search(vectors, k=k, where=filters or None)[0]
        return {"query": q, "k": k, "where": filters, "hits": _with_image_urls(hits, row_for_path)}

    @app.get("/api/reference/{row}/image", summary="Image of one indexed cell (by row number only)")
    def reference_image(row: int) -> FileResponse:
        if index is None:
            raise HTTPException(503, "this server was started without an index")
        if row < 0 or row >= len(index):
            raise HTTPException(404, f"no row {row} in the index ({len(index)} rows)")
        path = index.image_path(row)
        if not path.is_file():
            raise HTTPException(404, f"image of row {row} is no longer on disk")
        media = {".png": "image/png", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}
        return FileResponse(path, media_type=media.get(path.suffix.lower(), "image/jpeg"), headers={"Cache-Control": "max-age=3600"})

    return app


def server_config(app: FastAPI, host: str, port: int, settings: ServeSettings) -> Any:
    """The uvicorn configuration `hemaclip serve` runs `app` with. Uploads are bounded by the app's upload
    slots (``settings.max_uploads``); the connection limit, a last resort, leaves room beside them
    (CONNECTIONS_PER_UPLOAD per slot) for keep-alive connections, the page, /api/health and search."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", limit_concurrency=CONNECTIONS_PER_UPLOAD * settings.max_uploads)


def _batch_stats(batcher: DescribeBatcher | None) -> dict[str, Any] | None:
    """Sizes of the recent describe batches (the last 1,000): how well concurrent requests are batched."""
    if batcher is None:
        return None
    sizes = list(batcher.batches)
    return {"recent": len(sizes), "mean_size": round(sum(sizes) / len(sizes), 2) if sizes else None,
            "largest": max(sizes, default=None), "max_batch": batcher.max_batch}


def _filter_columns(index: CellIndex) -> dict[str, list[str]]:
    if index is None:
        return {}
    from hemaclip.tasks.index import FILTER_COLUMNS

    out = {}
    for column in FILTER_COLUMNS:
        values = sorted(index.column_values(column))
        if values and column != "split":
            out[column] = values
    return out
