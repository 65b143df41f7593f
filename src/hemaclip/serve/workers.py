"""How the server spends CPU and memory on uploads: bounded decoding and batched model calls.

Why it is built this way:

* **Decoding off the event loop, a few at a time.** Decoding a camera field takes tens to hundreds of
  milliseconds; on the event loop it stalled every other request (``/api/health`` took 1.2 s behind one
  large PNG). :class:`DecodePool` runs decodes in ``decode_workers`` threads of its own; the rest wait
  in the event loop holding only their upload bytes (no thread, no decoded pixels).
* **Decoded pixels live only inside a decode worker.** A worker decodes an upload, cuts it into the small
  views the model reads (:meth:`hemaclip.tasks.describe.Describer.views`: cell finding, resize) and drops
  the full picture before returning, and :class:`PixelBudget` bounds the pixels being decoded at once
  (judged from each image's header), so the memory of decoding stays that of one full-size picture
  however many requests arrive (eight 64-megapixel PNGs took the server from 1.1 to 4.8 GB when every
  request held its decoded picture).
* **Micro-batching.** One model call on 32 images costs far less than 32 calls on one. :class:`DescribeBatcher`
  collects concurrent describe requests in one worker thread, up to ``max_batch`` pictures, waiting at most
  ``max_wait_s`` for requests already on their way (uploaded, still decoding; none are waited for when
  nothing else is in flight, so a lone request pays no delay), runs one ``Describer.describe_pictures``
  call and answers each request with its own cells. When the batch call fails, each picture is described
  alone, so one bad picture fails only its own request. The wait is adaptive: it lasts only while uploads
  are decoding (a lone request pays nothing) and ends when the batch is full; 5 ms was shorter than the
  decoding of the next half of 32 concurrent uploads, so batches averaged 16 at concurrency 32.
* **Freed memory goes back after large uploads.** glibc keeps what decode threads free in per-thread
  arenas; after camera fields and near-limit bodies the server's resident memory stayed hundreds of MB
  above where it was, and the next field landed on top (2.08 and 2.16 GB peaks on a server that had
  answered 200 requests). :func:`release_memory` (``malloc_trim``) hands it back after each large upload.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import platform
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from hemaclip.errors import HemaclipError

if TYPE_CHECKING:
    from hemaclip.tasks.describe import Describer

__all__ = ["DEFAULT_BATCH_WAIT_S", "LARGE_UPLOAD_BYTES", "LARGE_UPLOAD_PIXELS", "DecodePool", "DescribeBatcher", "PixelBudget",
           "UploadError", "UploadSlots", "release_memory"]

IDLE_EXIT_S = 2.0  # the batch thread ends after this long without work and starts again on the next request
# Longest a batch waits for uploads still decoding: about the time 2 decode threads take to decode and cut
# 16 cell images (360x363 JPEG), so at concurrency 32 one batch can take the requests of both halves.
DEFAULT_BATCH_WAIT_S = 0.025
WAIT_STEP_S = 0.002  # how often a waiting batch checks whether uploads are still on the way
# Uploads after which freed memory is handed back to the OS (release_memory): a 2-megapixel picture is about
# 6 MB of RGB (several times that while decoding); a cell image is about 0.13 megapixels and 20 kB.
LARGE_UPLOAD_PIXELS = 2_000_000
LARGE_UPLOAD_BYTES = 4 * 1024 * 1024
T = TypeVar("T")


class UploadError(Exception):
    """An upload the API refuses, with the HTTP status that says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class UploadSlots:
    """At most `slots` uploads in progress (reading, decoding, waiting for the model); one more is refused
    at once (503) before its body is read. Used on the event loop only, so a plain counter is enough.

    Why not the server's connection limit: that counts every connection, so uploads held open by slow
    clients also refused /api/health and the page (63 slow uploads made every request answer 503)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise HemaclipError(f"upload slots must be >= 1, got {slots}")
        self.slots = int(slots)
        self.in_use = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.in_use >= self.slots:
            raise UploadError(503, f"the server is busy with {self.in_use} uploads; try again shortly")
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library is not glibc (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Hand memory freed inside the C heap back to the OS (every arena, glibc only); True when it did. Python
    and PIL free a decoded picture's buffers at once, but glibc keeps them mapped in the thread's arena."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class DecodePool:
    """At most `workers` decodes at once, each in a thread of this pool (threads start on first use)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise HemaclipError(f"decode workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hemaclip-decode")

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in a decode thread; the caller waits in the event loop."""
        return await asyncio.wrap_future(self._pool.submit(fn))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PixelBudget:
    """At most `pixels` pixels being decoded at once, across the decode threads (claimed from the image's
    header before decoding). A camera field near the pixel limit decodes alone; cell images, about 0.13
    megapixels, decode side by side. Decoding an RGBA PNG of 12 megapixels briefly takes about 200 MB."""

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise HemaclipError(f"the pixel budget must be >= 1, got {pixels}")
        self.pixels = int(pixels)
        self.in_use = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def claim(self, pixels: int) -> Iterator[None]:
        """Wait (in the calling thread) until `pixels` fit, hold them for the block; larger claims than
        the budget wait for the whole budget."""
        pixels = max(0, min(int(pixels), self.pixels))
        with self._room:
            self._room.wait_for(lambda: self.in_use + pixels <= self.pixels)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._room:
                self.in_use -= pixels
                self._room.notify_all()


class DescribeBatcher:
    """Describe requests answered in batches by one worker thread (see the module docstring).

    `describer` is a hemaclip.tasks.describe.Describer (``describe_pictures(pictures, names)`` giving one
    list of cell descriptions per picture, and ``model``); `saliency` the (saliency_map, overlay_png) pair
    or None; `lock` the model lock shared with the other endpoints. Each answer is the first cell's
    ``to_dict()`` at the top level, every cell in ``cells``, the picture's ``image_size`` [width, height]
    and ``saliency_png`` (of the first cell, or None).
    """

    def __init__(self, describer: Describer, *, lock: threading.Lock, saliency: tuple[Any, Any] | None, max_batch: int = 32,
                 max_wait_s: float = DEFAULT_BATCH_WAIT_S) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise HemaclipError(f"batch size must be >= 1 and wait >= 0, got {max_batch} and {max_wait_s}")
        self.describer = describer
        self.lock = lock
        self.saliency = saliency
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.batches: list[int] = []  # sizes of the batches run (the last 1,000), for tests and benchmarks
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._on_the_way = 0  # requests uploaded and decoding, not yet queued

    @contextlib.asynccontextmanager
    async def on_the_way(self) -> AsyncIterator[None]:
        """Around a request's decode: a batch being collected waits for it (up to max_wait_s)."""
        self._on_the_way += 1
        try:
            yield
        finally:
            self._on_the_way -= 1

    async def describe(self, views: Sequence[Any], name: str, image_size: list[int], saliency: bool) -> dict[str, Any]:
        """The description of one picture already cut into views (Describer.views), from the next batch."""
        return await asyncio.wrap_future(self.submit(views, name, image_size, saliency))

    def submit(self, views: Sequence[Any], name: str, image_size: list[int], saliency: bool) -> concurrent.futures.Future:
        """Queue a picture for the next batch from any thread; the future holds its answer. The server submits
        from the decode thread, inside :meth:`on_the_way`: a batch being collected gets the picture as soon as it
        is cut, not when the busy event loop next runs the request (and never sees it neither on the way nor
        queued)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((list(views), name, image_size, saliency, future))
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hemaclip-describe-batches", daemon=True)
                self._thread.start()
        return future

    # -- the worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._start:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            self._answer(self._collect(first))

    def _collect(self, first: tuple) -> list[tuple]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or self._on_the_way <= 0:
                break
            try:  # in short steps: an upload that fails to decode leaves the way without being queued
                batch.append(self._queue.get(timeout=min(left, WAIT_STEP_S)))
            except queue.Empty:
                continue
        return batch

    def _answer(self, batch: list[tuple]) -> None:
        live = [item for item in batch if item[4].set_running_or_notify_cancel()]
        self.batches = [*self.batches[-999:], len(live)]
        if not live:
            return
        with self.lock:
            results = self._describe([item[0] for item in live], [item[1] for item in live])
            for (views, _, size, saliency, future), result in zip(live, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                    continue
                try:
                    future.set_result(self._answer_one(result, views, size, saliency))
                except Exception as exc:  # noqa: BLE001 - the request gets its error, the thread carries on
                    future.set_exception(exc)

    def _describe(self, pictures: list[list[Any]], names: list[str]) -> list[Any]:
        """One list of descriptions (or an exception) per picture: the batch in one call, else each alone."""
        try:
            results = list(self.describer.describe_pictures(pictures, names))
            if len(results) == len(pictures):
                return results
        except Exception:  # noqa: BLE001 - find the picture that broke it below
            pass
        out: list[Any] = []
        for views, name in zip(pictures, names):
            try:
                out.append(self.describer.describe_pictures([views], [name])[0])
            except HemaclipError as exc:
                out.append(exc)
            except (OSError, ValueError, RuntimeError) as exc:
                out.append(UploadError(422, f"{name}: cannot be described ({type(exc).__name__}: {str(exc)[:200]})"))
        return out

    def _answer_one(self, descriptions: list[Any], views: list[Any], image_size: list[int], saliency: bool) -> dict[str, Any]:
        if not descriptions:
            raise UploadError(422, "the picture gave no view to describe")
        first = descriptions[0]
        if getattr(first, "error", None) is not None:
            raise UploadError(422, str(first.error))
        out = dict(first.to_dict())  # the first cell's reading at the top level (as before), every cell in `cells`
        out["cells"] = [d.to_dict() for d in descriptions]
        out["image_size"] = [int(v) for v in image_size]
        out["saliency_png"] = None
        if saliency and self.saliency is not None:
            saliency_map, overlay_png = self.saliency
            prepared = views[int(getattr(first, "cell", 0))].array
            heat = saliency_map(self.describer.model, prepared, target="class")
            out["saliency_png"] = "data:image/png;base64," + base64.b64encode(overlay_png(prepared, heat)).decode("ascii")
        return out
