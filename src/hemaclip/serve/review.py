"""The review page (`hemaclip serve --review DIR`): a review folder's cells, corrected with the keyboard.

Why it is built this way:

* It needs no model: everything it shows (readings, thumbnails, counts) is in the review store that
  `hemaclip review` wrote, so it starts in a second and uses no CPU while a person reviews.
* Cells are addressed by id only; thumbnails come from the store, never from a path a client names.
* Every correction is committed to the store (its own SQLite transaction) before the answer is sent, so
  what the page has shown as saved survives a crash of the server; the answer carries the new counts.
* The same guard as the describe server (:mod:`hemaclip.serve.security`): requests must name this server
  in their Host header (DNS rebinding) and, with a token (required off loopback), carry it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from hemaclip import __version__
from hemaclip.errors import HemaclipError
from hemaclip.serve.security import LOOPBACK_HOSTS, guard
from hemaclip.tasks.review import REVIEW_STORE, ReviewStore, review_summary

__all__ = ["create_review_app"]

# SQLite's INTEGER range: a larger id can name no cell (and used to overflow into a 500).
MAX_CELL_ID = 2**63 - 1
CellId = Annotated[int, PathParam(ge=0, le=MAX_CELL_ID, description="a cell's id in the review store")]


class CorrectionIn(BaseModel):
    """One correction (or acceptance) of one field of one cell."""

    field: str = Field(..., max_length=64, description="'class' or a WBCAtt attribute name")
    value: str = Field(..., max_length=64)
    reviewer: str = Field(..., max_length=80, description="who made it (shown in the store, never overwritten)")


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


def create_review_app(review_dir: str | Path, *, token: str | None = None, title: str = "hemaclip review",
                      allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS) -> FastAPI:
    """The review page and its API over ``<review_dir>/review.sqlite``: answers only requests whose Host
    header is one of `allowed_hosts` (DNS rebinding) and, with `token`, that carry it."""
    store = ReviewStore(Path(review_dir) / REVIEW_STORE)
    if not store.meta().get("classes"):
        raise HemaclipError(f"{review_dir}: the review store holds no described cells yet")
    app = FastAPI(title=title, version=__version__,
                  description="Review a folder of cells: counts with intervals, a queue, keyboard corrections kept in SQLite.")
    static = resources.files("hemaclip.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    guard(app, allowed_hosts, token)

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
    def image(cell_id: CellId) -> Response:
        data = store.thumbnail(cell_id)
        if data is None:
            raise HTTPException(404, f"no image for cell {cell_id}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/review/cells/{cell_id}/corrections", summary="Correct or accept one field of one cell")
    def correct(cell_id: CellId, body: CorrectionIn) -> dict[str, Any]:
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
