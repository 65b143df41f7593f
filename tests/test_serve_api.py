"""The JSON API with FastAPI's TestClient on a tiny random model and a 20-image index of real PBC cells:
good uploads, every kind of bad upload (clear 4xx, never 5xx), search, and the reference-image route."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hemaclip.data.datasets import load_dataset
from hemaclip.serve.app import ServeSettings, create_app
from hemaclip.tasks.describe import Describer
from hemaclip.tasks.index import CellIndex

LIMIT = 2 * 1024 * 1024


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cells(data_root: Path) -> list:
    """20 real WBCAtt test cells, 4 of each class."""
    test = load_dataset("wbcatt", data_root=data_root).split("test")
    return [r for label in sorted({r.label for r in test}) for r in [x for x in test if x.label == label][:4]]


@pytest.fixture(scope="module")
def client(cells, tmp_path_factory: pytest.TempPathFactory, make_tiny_model) -> TestClient:
    model = make_tiny_model()
    index = CellIndex.build(model, cells, tmp_path_factory.mktemp("serve") / "ref.index", checkpoint_id="tiny", progress=False)
    describer = Describer(model, index=index)
    app = create_app(describer, index, settings=ServeSettings(max_upload_bytes=LIMIT))
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as test_client:
        yield test_client


def _jpeg_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def test_health_and_page(client: TestClient) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["describe"] and health["search"]
    assert health["index"]["count"] == 20 and health["classes"] is None  # every class read
    page = client.get("/")
    assert page.status_code == 200 and 'id="dropzone"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/api/describe", "/api/search", "/api/health", "/api/reference/{row}/image"} <= set(schema["paths"])


def test_a_server_restricted_to_some_classes_reads_and_reports_only_those(cells, make_tiny_model) -> None:
    model = make_tiny_model()
    allowed = list(model.class_names)[:2]
    app = create_app(Describer(model, index=None, classes=allowed), None, settings=ServeSettings(max_upload_bytes=LIMIT))
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as restricted:
        assert restricted.get("/api/health").json()["classes"] == allowed
        for record in cells[::5]:
            response = restricted.post("/api/describe?saliency=false", content=_jpeg_bytes(record.path),
                                       headers={"Content-Type": "image/jpeg", "X-Filename": "cell.jpg"})
            assert response.status_code == 200, response.text
            assert response.json()["label"] in allowed and response.json()["runner_up"] in allowed


def test_good_upload_returns_the_description(client: TestClient, cells) -> None:
    data = _jpeg_bytes(cells[0].path)
    response = client.post("/api/describe", content=data, headers={"Content-Type": "image/jpeg", "X-Filename": "cell.jpg"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "cell.jpg"
    assert body["label"] in {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "erythroblast", "ig", "platelet"}
    assert 0.0 <= body["probability"] <= 1.0
    assert isinstance(body["sentence"], str) and body["sentence"]
    assert isinstance(body["attributes"], dict)
    for attribute in body["attributes"].values():
        assert {"value", "probability", "stated"} <= set(attribute)
    assert body["neighbours"] and all(n["image_url"].startswith("/api/reference/") for n in body["neighbours"])
    assert "path" not in body["neighbours"][0]  # server paths are not handed to the browser
    assert body["saliency_png"].startswith("data:image/png;base64,")  # Grad-CAM overlay
    # The same image as a multipart form field (curl -F file=@cell.jpg).
    form = client.post("/api/describe", files={"file": ("cell.jpg", data, "image/jpeg")})
    assert form.status_code == 200 and form.json()["label"] == body["label"]


def test_bad_uploads_get_clear_4xx(client: TestClient, cells) -> None:
    data = _jpeg_bytes(cells[0].path)
    cases = {
        "not an image": (b"hello, this is text" * 10, "image/jpeg", 415),
        "wrong content type": (data, "text/plain", 415),
        "no content type": (data, "", 415),
        "empty": (b"", "image/png", 415),
        "truncated jpeg": (data[: len(data) // 2], "image/jpeg", 422),
    }
    for name, (body, content_type, status) in cases.items():
        headers = {"Content-Type": content_type} if content_type else {}
        response = client.post("/api/describe", content=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and len(detail) > 10, name
    too_big = client.post("/api/describe", content=b"\0" * (50 * 1024 * 1024), headers={"Content-Type": "image/jpeg"})
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams
        for _ in range(LIMIT // 65536 + 2):
            yield b"\0" * 65536

    streamed = client.post("/api/describe", content=chunks(), headers={"Content-Type": "image/png"})
    assert streamed.status_code == 413
    tiny_png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny_png, format="PNG")
    assert client.post("/api/describe", content=tiny_png.getvalue(), headers={"Content-Type": "image/png"}).status_code == 422
    no_file = client.post("/api/describe", data={"other": "x"}, files={"x": ("a.txt", b"abc", "text/plain")})
    assert no_file.status_code == 400 and "'file'" in no_file.json()["detail"]


def test_uploads_leave_no_files_in_the_temp_folder(client: TestClient, cells, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (720, 720, 3), dtype=np.uint8)).save(big, format="PNG")
    assert big.tell() > 1024 * 1024  # large enough that a multipart parser spools it to disk
    ok = client.post("/api/describe", files={"file": ("big.png", big.getvalue(), "image/png")})
    assert ok.status_code == 200, ok.text
    bad = client.post("/api/describe", files={"file": ("bad.jpg", _jpeg_bytes(cells[1].path)[:500], "image/jpeg")})
    assert bad.status_code == 422
    assert os.listdir(tmp_path) == []


def test_search_and_filters(client: TestClient, cells) -> None:
    response = client.get("/api/search", params={"q": "large cell with coarse red granules", "k": 5})
    assert response.status_code == 200
    hits = response.json()["hits"]
    assert len(hits) == 5 and all(h["image_url"] == f"/api/reference/{h['row']}/image" for h in hits)
    colour = cells[0].attributes["granule_colour"]
    filtered = client.get("/api/search", params={"q": "cell", "k": 50, "where": f"granule_colour={colour}"}).json()["hits"]
    expected = sum(r.attributes["granule_colour"] == colour for r in cells)
    assert len(filtered) == expected and all(h["attributes"]["granule_colour"] == colour for h in filtered)
    assert client.get("/api/search", params={"q": "  "}).status_code == 400
    unknown = client.get("/api/search", params={"q": "cell", "where": "colour=red"})
    assert unknown.status_code == 400 and "unknown filter column" in unknown.json()["detail"]
    assert client.get("/api/search", params={"q": "cell", "where": "nonsense"}).status_code == 400
    assert client.get("/api/search", params={"q": "cell", "k": 0}).status_code == 422


def test_reference_images_only_by_row(client: TestClient, cells) -> None:
    first = client.get("/api/reference/0/image")
    assert first.status_code == 200 and first.content == Path(cells[0].path).read_bytes()
    assert first.headers["content-type"] == "image/jpeg"
    assert client.get("/api/reference/20/image").status_code == 404
    assert client.get("/api/reference/-1/image").status_code == 404
    for attempt in ("/api/reference/..%2F..%2Fetc%2Fpasswd/image", "/api/reference/../../etc/passwd", "/api/reference/%2Fetc%2Fpasswd/image"):
        response = client.get(attempt)
        assert response.status_code in (404, 422), attempt
        assert b"root:" not in response.content
    assert client.get("/static/../../../../etc/passwd").status_code == 404


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=4096),
    content_type=st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "text/plain", "multipart/form-data", "", "image/"]),
    prefix=st.sampled_from([b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00"]),
)
def test_fuzzed_uploads_never_give_5xx(client: TestClient, body: bytes, content_type: str, prefix: bytes) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/api/describe", content=prefix + body, headers=headers)
    assert 400 <= response.status_code < 500, response.text
