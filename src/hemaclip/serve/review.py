"""The review page (`hemaclip serve --review DIR`): a review folder's cells, corrected with the keyboard.

Why it is built this way:

* It needs no model: everything it shows (readings, thumbnails, counts) is in the review store that
  `hemaclip review` wrote, so it starts in a second and uses no CPU while a person reviews.
* Cells are addressed by id only; thumbnails come from the store, never from a path a client names.
* Every correction is committed to the store (its own SQLite transaction) before the answer is sent, so
  what the page has shown as saved survives a crash of the server; the answer carries the new counts.
* With a token (required off loopback), every request must carry it: ``Authorization: Bearer TOKEN``
  or ``?token=TOKEN`` (for the page itself and its images); compared in constant time.
"""

from __future__ import annotations

import secrets
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from hemaclip import __version__
from hemaclip.errors import HemaclipError
from hemaclip.tasks.review import REVIEW_STORE, ReviewStore, review_summary

__all__ = ["LOOPBACK_HOSTS", "create_review_app", "require_token"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class CorrectionIn(BaseModel):
    """One correction (or acceptance) of one field of one cell."""

    field: str = Field(..., max_length=64, description="'class' or a WBCAtt attribute name")
    value: str = Field(..., max_length=64)
    reviewer: str = Field(..., max_length=80, description="who made it (shown in the store, never overwritten)")


def require_token(app: FastAPI, token: str) -> None:
    """Refuse (401) every request that does not carry `token` as a Bearer header or a `token` query parameter."""
    expected = token.encode()

    @app.middleware("http")
    async def _check(request: Request, call_next: Any) -> Response:
        given = request.query_params.get("token", "")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        if not secrets.compare_digest(given.encode(), expected):
            return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        return await call_next(request)


def _light(summary: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any]:
    """What the page needs: counts, queue order and each cell's readings, without server paths."""
    by_id = {c["id"]: c for c in cells}
    out_cells = []
    for q in summary["queue"]:
        c = by_id[q["id"]]
        out_cells.append({
            "id": c["id"], "name": Path(c["source"]).name + (f" #{c['cell']}" if c["cell"] else ""),
            "model_label": c["label"], "probability": c["probability"], "runner_up": c["runner_up"],
            "unfamiliar": c["unfamiliar"], "unfamiliarity": c["unfamiliarity"], "reason": q["reason"], "reviewed": c["reviewed"],
            "current": c["current"], "model": {n: a["value"] for n, a in c["attributes"].items()},
            "attribute_probability": {n: a["probability"] for n, a in c["attributes"].items()},
            "image_url": f"/api/review/cells/{c['id']}/image",
        })
    keep = ("cells", "white_cells", "reviewed", "corrected", "differential", "interval", "outside_differential", "unfamiliar",
            "warning", "calibrated", "classes", "attribute_values", "model_sha1")
    return {**{k: summary[k] for k in keep}, "queue": out_cells}


def _counts(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("cells", "white_cells", "reviewed", "corrected", "differential", "interval", "outside_differential")
    return {k: summary[k] for k in keep}


def create_review_app(review_dir: str | Path, *, token: str | None = None, title: str = "hemaclip review") -> FastAPI:
    """The review page and its API over ``<review_dir>/review.sqlite``."""
    store = ReviewStore(Path(review_dir) / REVIEW_STORE)
    if not store.meta().get("classes"):
        raise HemaclipError(f"{review_dir}: the review store holds no described cells yet")
    app = FastAPI(title=title, version=__version__,
                  description="Review a folder of cells: counts with intervals, a queue, keyboard corrections kept in SQLite.")
    static = resources.files("hemaclip.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    if token:
        require_token(app, token)

    @app.exception_handler(HemaclipError)
    async def _user_error(_: Request, exc: HemaclipError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((static / "review.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    @app.get("/api/health", summary="What the server has loaded")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "review": True, "describe": False, "search": False}

    @app.get("/api/review", summary="The review: counts with intervals, the queue and each cell's current values")
    def review() -> dict[str, Any]:
        cells = store.cells()
        return _light(review_summary(store, cells=cells), cells)

    @app.get("/api/review/cells/{cell_id}/image", summary="Thumbnail of one cell (by id only)")
    def image(cell_id: int) -> Response:
        data = store.thumbnail(cell_id)
        if data is None:
            raise HTTPException(404, f"no image for cell {cell_id}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/review/cells/{cell_id}/corrections", summary="Correct or accept one field of one cell")
    def correct(cell_id: int, body: CorrectionIn) -> dict[str, Any]:
        if not store.has_cell(cell_id):
            raise HTTPException(404, f"no cell {cell_id} in this review")
        made = store.correct(cell_id, body.field, body.value, body.reviewer)
        cells = store.cells()
        current = next(c["current"] for c in cells if c["id"] == cell_id)
        return {"correction": made, "current": current, "counts": _counts(review_summary(store, cells=cells))}

    @app.get("/api/review/corrections", summary="Every correction, oldest first (append-only)")
    def corrections() -> list[dict[str, Any]]:
        return store.corrections()

    return app
