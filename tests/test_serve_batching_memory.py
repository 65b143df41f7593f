"""Issue 28 items 13-14: the describe batcher's wait (it waits for uploads still decoding, only while they are,
and never past its bound) and memory handed back after large uploads."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from hemaclip.data.preprocess import Preprocess
from hemaclip.serve import app as serve_app
from hemaclip.serve.workers import DescribeBatcher, PixelBudget, release_memory
from test_serve_hardening import _Picky

VIEW = np.zeros((8, 8, 3), np.uint8)


# The recording fake describer of the hardening tests (it records each batch's names; no name here is "bad").
_Recorder = _Picky


def _run(batcher: DescribeBatcher, plan: list[tuple[str, float, bool]]) -> dict[str, float]:
    """Each (name, decode seconds, decodes) goes on the way, 'decodes' for that long, then is queued (or, when
    it fails to decode, leaves without being queued); returns when each queued one was answered."""
    answered: dict[str, float] = {}
    started = time.monotonic()

    async def one(name: str, seconds: float, decodes: bool) -> None:
        async with batcher.on_the_way():
            await asyncio.sleep(seconds)
            future = batcher.submit([VIEW], name, [8, 8], False) if decodes else None
        if future is not None:
            assert (await asyncio.wrap_future(future))["source"] == name
            answered[name] = time.monotonic() - started

    async def main() -> None:
        await asyncio.gather(*(one(*item) for item in plan))

    asyncio.run(main())
    return answered


def test_a_batch_takes_the_uploads_that_finish_decoding_within_its_wait() -> None:
    describer = _Recorder()
    batcher = DescribeBatcher(describer, lock=threading.Lock(), saliency=None, max_batch=8, max_wait_s=2.0)
    _run(batcher, [("a", 0.0, True), ("b", 0.1, True), ("c", 0.2, True)])
    assert describer.calls == [["a", "b", "c"]]
    assert batcher.batches[-1] == 3


def test_a_batch_stops_waiting_when_the_last_upload_on_the_way_fails_to_decode() -> None:
    describer = _Recorder()
    batcher = DescribeBatcher(describer, lock=threading.Lock(), saliency=None, max_batch=8, max_wait_s=3.0)
    answered = _run(batcher, [("a", 0.0, True), ("broken", 0.1, False)])
    assert describer.calls == [["a"]]
    assert answered["a"] < 1.5  # not the 3 s bound: nothing was on the way any more after 0.1 s


def test_a_batch_never_waits_past_its_bound_and_a_full_batch_goes_at_once() -> None:
    describer = _Recorder()
    batcher = DescribeBatcher(describer, lock=threading.Lock(), saliency=None, max_batch=2, max_wait_s=0.2)
    answered = _run(batcher, [("a", 0.0, True), ("slow", 1.5, True)])
    assert describer.calls == [["a"], ["slow"]]
    assert answered["a"] < 1.0
    full = _Recorder()
    pair = DescribeBatcher(full, lock=threading.Lock(), saliency=None, max_batch=2, max_wait_s=3.0)
    answered = _run(pair, [("a", 0.0, True), ("b", 0.0, True), ("c", 0.1, True), ("late", 2.0, True)])
    assert full.calls[0] == ["a", "b"] and answered["a"] < 1.0  # full: no wait for the uploads still on the way


def test_release_memory_trims_on_glibc() -> None:
    import platform

    assert release_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


class _Cutter:
    def views(self, image: Image.Image) -> list:
        return [image.size]


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 150, 160)).save(out, format="PNG")
    return out.getvalue()


def test_memory_is_handed_back_after_a_large_upload_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(serve_app, "release_memory", lambda: calls.append(1) or True)
    budget = PixelBudget(serve_app.MAX_UPLOAD_PIXELS)
    views, size = serve_app._cut_upload(_Cutter(), _png(360, 363), "cell.png", serve_app.MAX_UPLOAD_PIXELS, budget)
    assert size == [360, 363] and not calls
    views, size = serve_app._cut_upload(_Cutter(), _png(2000, 1500), "field.png", serve_app.MAX_UPLOAD_PIXELS, budget)
    assert size == [2000, 1500] and len(calls) == 1 and budget.in_use == 0
    with pytest.raises(serve_app.UploadError):  # a large body that is no image: memory handed back all the same
        serve_app._cut_upload(_Cutter(), b"\xff\xd8\xff" + bytes(5 * 2**20), "noise.jpg", serve_app.MAX_UPLOAD_PIXELS, budget)
    assert len(calls) == 2 and budget.in_use == 0


def test_whole_image_views_are_unchanged_without_the_full_size_copy() -> None:
    """locate=whole no longer converts the picture to a full-size array for its size; the view is the same."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (363, 360, 3), dtype=np.uint8)
    preprocess = Preprocess(image_size=128)
    from_image, from_array = preprocess.views(Image.fromarray(array)), preprocess.views(array)
    expected = np.asarray(Image.fromarray(array).resize((128, 128), Image.Resampling.BICUBIC))
    for views in (from_image, from_array):
        assert len(views) == 1 and views[0].box == (0, 0, 360, 363) and views[0].found
        np.testing.assert_array_equal(views[0].array, expected)


@pytest.mark.slow
def test_the_installed_serve_command_answers_describe_requests(tiny_checkpoint, data_root, tmp_path) -> None:
    """`hemaclip serve` itself (the entry point, not create_app): it once failed at start (NameError: uvicorn)
    and no test ran it."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    from hemaclip.cache import file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.tasks.index import CellIndex

    cells = load_dataset("wbcatt", data_root=data_root).split("test")[:6]
    model, _ = load_checkpoint(tiny_checkpoint)
    CellIndex.build(model, cells, tmp_path / "ref.index", checkpoint_id=file_sha1(tiny_checkpoint), progress=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = Path(sys.executable).parent / "hemaclip"
    server = subprocess.Popen([str(entry), "serve", "--checkpoint", str(tiny_checkpoint), "--index", str(tmp_path / "ref.index"),
                               "--no-saliency", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            time.sleep(0.3)
        answer = httpx.post(f"http://127.0.0.1:{port}/api/describe?saliency=false", content=Path(cells[0].path).read_bytes(),
                            headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["cells"], answer.text[:300]
    finally:
        server.terminate()
        server.wait(timeout=30)
