"""How the server spends CPU and memory on uploads: bounded decoding and batched model calls.

Why it is built this way:

* **Decoding off the event loop, a few at a time.** Decoding a camera field takes tens to hundreds of
  milliseconds; on the event loop it stalled every other request (``/api/health`` took 1.2 s behind one
  large PNG). :class:`UploadGate` lets at most ``decode_workers`` uploads decode at once, each in a worker
  thread, and waits in the event loop (no thread is held while waiting).
* **A budget of decoded pixels.** A decoded image is held until its answer is sent, so the memory of many
  concurrent uploads is the sum of their pixels. The gate admits a decoded image only while the pixels
  held by all requests stay within ``held_pixels``; the next decode waits until there is room. Together
  with the per-image pixel limit this bounds memory whatever arrives.
* **Micro-batching.** One model call on 32 images costs far less than 32 calls on one. :class:`DescribeBatcher`
  collects concurrent describe requests in one worker thread, up to ``max_batch`` images, waiting at most
  ``max_wait_s`` for requests already on their way (uploaded, still decoding; none are waited for when
  nothing else is in flight, so a lone request pays no delay), runs one ``Describer.describe_arrays`` call
  and answers each request with its own result, whatever fields the describer puts in it. When the batch
  call fails, each image is described alone, so one bad image fails only its own request.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from hemaclip.errors import HemaclipError

__all__ = ["DescribeBatcher", "UploadError", "UploadGate"]

IDLE_EXIT_S = 2.0  # the batch thread ends after this long without work and starts again on the next request


class UploadError(Exception):
    """An upload the API refuses, with the HTTP status that says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class UploadGate:
    """At most `decode_workers` decodes at once; at most `held_pixels` decoded pixels held at once.

    asyncio objects belong to one event loop; they are made on first use in each loop (uvicorn has one;
    a TestClient used without ``with`` starts one per request).
    """

    def __init__(self, decode_workers: int, held_pixels: int) -> None:
        if decode_workers < 1 or held_pixels < 1:
            raise HemaclipError(f"decode workers and held pixels must be >= 1, got {decode_workers} and {held_pixels}")
        self.decode_workers = int(decode_workers)
        self.held_pixels = int(held_pixels)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.free = self.held_pixels

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._decoding = asyncio.Semaphore(self.decode_workers)
            self._room = asyncio.Condition()
            self.free = self.held_pixels

    async def decode(self, fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, int]:
        """Run `fn` (a decode returning an HxWx3 array) in a worker thread once a decode slot is free, then
        wait, still holding the slot, until its pixels fit in the budget. Returns (array, pixels held);
        give the pixels back with :meth:`release` once the answer is made."""
        from starlette.concurrency import run_in_threadpool

        self._bind()
        async with self._decoding:
            array = await run_in_threadpool(fn)
            pixels = min(int(array.shape[0]) * int(array.shape[1]), self.held_pixels)
            async with self._room:
                await self._room.wait_for(lambda: self.free >= pixels)
                self.free -= pixels
        return array, pixels

    async def release(self, pixels: int) -> None:
        self._bind()
        async with self._room:
            self.free = min(self.held_pixels, self.free + pixels)
            self._room.notify_all()


class DescribeBatcher:
    """Describe requests answered in batches by one worker thread (see the module docstring).

    `describer` is a hemaclip.tasks.describe.Describer (anything with ``describe_arrays(arrays, names)``
    returning one result with ``to_dict()`` and ``error`` per image, ``prepare`` and ``model``);
    `saliency` the (saliency_map, overlay_png) pair or None; `lock` the model lock shared with the
    other endpoints. Each answer is the describer's own ``to_dict()`` plus ``saliency_png``.
    """

    def __init__(self, describer: Any, *, lock: threading.Lock, saliency: tuple[Any, Any] | None, max_batch: int = 32,
                 max_wait_s: float = 0.005) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise HemaclipError(f"batch size must be >= 1 and wait >= 0, got {max_batch} and {max_wait_s}")
        self.describer = describer
        self.lock = lock
        self.saliency = saliency
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.batches: list[int] = []  # sizes of the batches run (the last 1,000), for tests and /api/health
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

    async def describe(self, array: np.ndarray, name: str, saliency: bool) -> dict[str, Any]:
        """The description of one decoded image (HxWx3 uint8), from the next batch."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((array, name, saliency, future))
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hemaclip-describe-batches", daemon=True)
                self._thread.start()
        return await asyncio.wrap_future(future)

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
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _answer(self, batch: list[tuple]) -> None:
        live = [item for item in batch if item[3].set_running_or_notify_cancel()]
        self.batches = [*self.batches[-999:], len(live)]
        if not live:
            return
        with self.lock:
            results = self._describe([item[0] for item in live], [item[1] for item in live])
            for (array, name, saliency, future), result in zip(live, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                    continue
                try:
                    future.set_result(self._with_saliency(result, array, saliency))
                except Exception as exc:  # noqa: BLE001 - the request gets its error, the thread carries on
                    future.set_exception(exc)

    def _describe(self, arrays: list[np.ndarray], names: list[str]) -> list[Any]:
        """One result (or exception) per image: the batch in one call, else each image alone."""
        try:
            results = list(self.describer.describe_arrays(arrays, names))
            if len(results) == len(arrays):
                return results
        except Exception:  # noqa: BLE001 - find the image that broke it below
            pass
        out: list[Any] = []
        for array, name in zip(arrays, names):
            try:
                out.append(self.describer.describe_arrays([array], [name])[0])
            except HemaclipError as exc:
                out.append(exc)
            except (OSError, ValueError, RuntimeError) as exc:
                out.append(UploadError(422, f"{name}: cannot be described ({type(exc).__name__}: {str(exc)[:200]})"))
        return out

    def _with_saliency(self, description: Any, array: np.ndarray, saliency: bool) -> dict[str, Any]:
        out = dict(description.to_dict())
        out["saliency_png"] = None
        if getattr(description, "error", None) is not None:
            raise UploadError(422, str(description.error))
        if saliency and self.saliency is not None:
            saliency_map, overlay_png = self.saliency
            prepared = self.describer.prepare(array)
            heat = saliency_map(self.describer.model, prepared, target="class")
            out["saliency_png"] = "data:image/png;base64," + base64.b64encode(overlay_png(prepared, heat)).decode("ascii")
        return out

