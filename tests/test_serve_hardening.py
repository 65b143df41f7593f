"""The server under hostile input and load (issue 15): a wrong Host header (DNS rebinding), pixel bombs
refused from their header with a message that states the limit, decoding off the event loop, and
concurrent describe requests answered in batches, each with its own result."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hemaclip.data.datasets import load_dataset
from hemaclip.serve import app as serve_app
from hemaclip.serve.app import LOOPBACK_HOSTS, MAX_UPLOAD_PIXELS, ServeSettings, allowed_hosts_for, create_app
from hemaclip.serve.workers import DescribeBatcher, UploadError
from hemaclip.tasks.describe import Describer
from hemaclip.tasks.index import CellIndex

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cells(data_root: Path) -> list:
    test = load_dataset("wbcatt", data_root=data_root).split("test")
    return [r for label in sorted({r.label for r in test}) for r in [x for x in test if x.label == label][:2]]


@pytest.fixture(scope="module")
def describer(cells, tmp_path_factory: pytest.TempPathFactory, make_tiny_model) -> Describer:
    model = make_tiny_model()
    index = CellIndex.build(model, cells, tmp_path_factory.mktemp("serve") / "ref.index", checkpoint_id="tiny", progress=False)
    return Describer(model, index=index)


@pytest.fixture(scope="module")
def app(describer):
    return create_app(describer, describer.index, settings=ServeSettings(saliency=False))


def pixel_bomb(side: int = 7999) -> bytes:
    """A one-colour PNG of side x side pixels: about 200 KB on the wire, 192 MB decoded (the issue's upload)."""
    out = io.BytesIO()
    Image.new("L", (side, side), 200).save(out, format="PNG", optimize=False)
    return out.getvalue()


async def _gather(app, requests: list[tuple[str, str, bytes | None]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
        async def one(method: str, url: str, body: bytes | None) -> httpx.Response:
            if method == "GET":
                return await client.get(url)
            return await client.post(url, content=body, headers={"Content-Type": "image/png" if body and body[:4] == b"\x89PNG" else "image/jpeg"})

        return await asyncio.gather(*(one(*r) for r in requests))


def test_wrong_host_header_is_refused_and_no_cors_is_granted(app) -> None:
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "attacker.test:80"):
            refused = client.get("/api/health", headers={"Host": host})
            assert refused.status_code == 400, host
            assert "status" not in refused.text  # nothing of the API leaks to the rebinding page
        upload = client.post("/api/describe", content=b"x", headers={"Host": "evil.example", "Content-Type": "image/png"})
        assert upload.status_code == 400
        cross = client.get("/api/health", headers={"Origin": "http://evil.example"})
        assert cross.status_code == 200 and not any(k.lower().startswith("access-control-") for k in cross.headers)


def test_allowed_hosts_are_the_bound_names() -> None:
    assert set(LOOPBACK_HOSTS) <= set(allowed_hosts_for("127.0.0.1"))
    assert "myhost.lan" in allowed_hosts_for("127.0.0.1", ("MyHost.lan",))
    assert "[::1]" in allowed_hosts_for("::1") and "192.168.1.5" in allowed_hosts_for("192.168.1.5")
    import socket

    every = allowed_hosts_for("0.0.0.0")
    assert socket.gethostname().lower() in every and "0.0.0.0" not in every and "*" not in every


def test_pixel_bombs_are_refused_from_the_header_while_health_answers(app, cells) -> None:
    bomb = pixel_bomb()
    assert len(bomb) < 400_000 and 7999 * 7999 < 64_000_000  # passed the old 64-megapixel limit
    started = time.perf_counter()
    answers = asyncio.run(_gather(app, [("POST", "/api/describe", bomb)] * 8 + [("GET", "/api/health", None)]))
    elapsed = time.perf_counter() - started
    for answer in answers[:8]:
        assert answer.status_code == 413
        detail = answer.json()["detail"]
        assert "7999x7999" in detail and f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixels" in detail and "camera field" in detail
    assert answers[8].json()["max_upload_pixels"] == MAX_UPLOAD_PIXELS
    assert elapsed < 10  # eight full decodes of 64 MP would take far longer; the header is enough


def test_decoding_runs_off_the_event_loop(app, cells, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow decode (one second) does not hold up /api/health (it took 1.2 s behind one large PNG)."""
    real = serve_app.decode_upload
    decoding = threading.Event()

    def slow_decode(*args, **kwargs):
        decoding.set()
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_app, "decode_upload", slow_decode)
    jpeg = Path(cells[0].path).read_bytes()

    async def run() -> tuple[float, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            upload = asyncio.create_task(client.post("/api/describe", content=jpeg, headers={"Content-Type": "image/jpeg"}))
            while not decoding.is_set():
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            health = await client.get("/api/health")
            took = time.perf_counter() - started
            return took, health.status_code, (await upload).status_code

    took, health_status, upload_status = asyncio.run(run())
    assert health_status == 200 and upload_status == 200
    assert took < 0.5, took


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(app, cells) -> None:
    bodies = [Path(r.path).read_bytes() for r in cells]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        alone = [client.post("/api/describe", content=b, headers={"Content-Type": "image/jpeg"}).json() for b in bodies]
    batcher = app.state.describe_batcher
    before = len(batcher.batches)
    together = asyncio.run(_gather(app, [("POST", "/api/describe", b) for b in bodies]))
    assert all(r.status_code == 200 for r in together)
    assert max(batcher.batches[before:]) > 1, batcher.batches[before:]  # one model call answered several requests
    for single, batched in zip(alone, (r.json() for r in together)):
        assert batched["label"] == single["label"]
        assert batched["probability"] == pytest.approx(single["probability"], abs=2e-3)
        assert [n["row"] for n in batched["neighbours"]] == [n["row"] for n in single["neighbours"]]
        assert batched["cells"][0]["box"] == single["cells"][0]["box"] and batched["image_size"] == single["image_size"]


class _Picky:
    """A describer that fails on any batch holding a picture named 'bad' (and on that picture alone)."""

    model = None

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def describe_pictures(self, pictures, names):
        self.calls.append(list(names))
        if "bad" in names:
            raise RuntimeError("broken picture")

        class Reading:
            error = None
            cell = 0

            def __init__(self, name: str) -> None:
                self.name = name

            def to_dict(self) -> dict:
                return {"source": self.name}

        return [[Reading(n)] for n in names]


def test_one_bad_picture_fails_only_its_own_request() -> None:
    describer = _Picky()
    batcher = DescribeBatcher(describer, lock=threading.Lock(), saliency=None, max_batch=8, max_wait_s=0.2)
    view = np.zeros((8, 8, 3), np.uint8)

    async def run() -> list:
        async with batcher.on_the_way():  # keeps the first batch open until all three are queued
            tasks = [asyncio.create_task(batcher.describe([view], name, [8, 8], False)) for name in ("a", "bad", "c")]
            await asyncio.sleep(0.05)
        return await asyncio.gather(*tasks, return_exceptions=True)

    a, bad, c = asyncio.run(run())
    assert a["source"] == "a" and c["source"] == "c"
    assert isinstance(bad, UploadError) and bad.status == 422 and "broken picture" in bad.detail
    assert describer.calls[0] == ["a", "bad", "c"]  # tried together first


def test_pixel_budget_lets_one_full_size_decode_run_at_a_time() -> None:
    from hemaclip.serve.workers import PixelBudget

    budget = PixelBudget(100)
    peak, lock = [0], threading.Lock()

    def work(pixels: int) -> None:
        with budget.claim(pixels):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.05)

    threads = [threading.Thread(target=work, args=(p,)) for p in (100, 100, 30, 30, 30, 500)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] <= 100 and budget.in_use == 0  # a claim over the budget waits for all of it


# -- issue 28: the token, slow uploads, disconnects (a real uvicorn server on 127.0.0.1) ------------------------

TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_TIMEOUT_S = 2.0
UPLOAD_SLOTS = 16


def test_a_token_is_enforced_on_the_describe_server(describer) -> None:
    guarded = create_app(describer, describer.index, settings=ServeSettings(saliency=False), token=TOKEN)
    with TestClient(guarded, base_url="http://127.0.0.1") as client:
        assert client.get("/api/health").status_code == 401
        assert client.get("/api/health", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert client.get("/api/search", params={"q": "a cell", "token": "wrong"}).status_code == 401
        assert client.post("/api/describe", content=b"x", headers={"Content-Type": "image/png"}).status_code == 401
        assert client.get("/").status_code == 401
        assert client.get("/api/health", headers=AUTH).json()["status"] == "ok"
        assert client.get("/api/search", params={"q": "a cell", "token": TOKEN}).status_code == 200
        assert client.get("/static/app.js").status_code == 200  # the page's own script: no data, no token
        assert client.get("/api/health", headers={**AUTH, "Host": "evil.example"}).status_code == 400


@pytest.fixture()
def loopback(describer):
    """The describe server with a token, few upload slots and a short body time-out, on a free 127.0.0.1 port
    (uvicorn in a thread, configured as `hemaclip serve` configures it); yields (url, app). Stopped after."""
    import socket

    import uvicorn

    from hemaclip.serve.app import server_config

    settings = ServeSettings(saliency=False, max_uploads=UPLOAD_SLOTS, body_timeout_s=BODY_TIMEOUT_S)
    guarded = create_app(describer, describer.index, settings=settings, token=TOKEN)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(server_config(guarded, "127.0.0.1", port, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(15)


def _slow_upload(port: int, declared: int = 100_000):
    """A socket that sent the headers of a `declared`-byte upload and 10 bytes of it, then nothing."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 20)
    sock.sendall((f"POST /api/describe HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: image/png\r\nContent-Length: {declared}\r\n\r\n").encode() + b"\x89PNG\r\n\x1a\n\0\0")
    return sock


def test_slow_uploads_time_out_and_health_answers_throughout(loopback, cells) -> None:
    url, port = loopback
    slow = [_slow_upload(port) for _ in range(20)]  # more than the upload slots
    try:
        started, waits = time.monotonic(), []
        with httpx.Client(base_url=url, headers=AUTH, timeout=5) as client:
            while time.monotonic() - started < BODY_TIMEOUT_S + 1:
                t = time.monotonic()
                assert client.get("/api/health").status_code == 200
                waits.append(time.monotonic() - t)
                time.sleep(0.2)
        assert max(waits) < 2.0, waits
        statuses = []
        for sock in slow:  # every slow upload is answered: 503 beyond the slots at once, 408 after the time-out
            statuses.append(int(sock.recv(4096).split(b" ", 2)[1]))
        assert sorted(set(statuses)) == [408, 503] and statuses.count(408) == UPLOAD_SLOTS, statuses
    finally:
        for sock in slow:
            sock.close()
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:  # the slots are free again
        upload = client.post("/api/describe?saliency=false", content=Path(cells[0].path).read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert upload.status_code == 200 and upload.json()["label"]


def test_a_client_gone_mid_upload_is_one_line_not_a_traceback(loopback, caplog: pytest.LogCaptureFixture) -> None:
    url, port = loopback
    caplog.set_level("INFO")
    for _ in range(3):
        _slow_upload(port).close()
    deadline = time.monotonic() + 10
    while sum("mid-upload" in r.getMessage() for r in caplog.records) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = [r for r in caplog.records if "mid-upload" in r.getMessage()]
    assert len(gone) == 3 and all("\n" not in r.getMessage() for r in gone)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage() or "Exception in ASGI" in r.getMessage()]
    assert httpx.get(f"{url}/api/health", headers=AUTH, timeout=10).status_code == 200


def test_serve_off_loopback_without_a_token_is_refused_before_loading(run_cli, assert_one_line_error, tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "8765", "--checkpoint", str(tmp_path / "none.pt"), timeout=120)
    assert_one_line_error(result, "give --token")
    short = run_cli("serve", "--host", "0.0.0.0", "--token", "short", "--port", "8765", timeout=120)
    assert_one_line_error(short, "at least 16 characters")
    assert time.monotonic() - started < 120
