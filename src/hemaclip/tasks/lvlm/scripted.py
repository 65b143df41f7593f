"""A scripted OpenAI-compatible chat server on the loopback interface: it answers from a policy per image
instead of looking, so the client, the protocols and the scoring can be checked against known answers.

Used by the tests and by ``scripts/lvlm_protocol_demo.py`` (the committed protocol demonstration). It is
not a model: every answer it gives is written in advance. Its replies carry the system fingerprint
:data:`SCRIPTED_FINGERPRINT`, and the report labels any run answered by it as a protocol demonstration.

Per image (by the SHA-1 of the query image's bytes) a :class:`Behaviour` says what happens:
``correct`` / ``wrong`` (answer :attr:`Behaviour.answer`), ``unparseable`` (a reply naming no label),
``slow`` (the first attempt sleeps `slow_s` before answering), ``error500`` (the first attempt gets HTTP
500), ``always500``, ``rate_limit`` (the first attempt gets 429 with ``Retry-After``). The server counts
requests received and answers delivered per (image, protocol), and can hold every request after a number
of answers (to kill a client mid-run with nothing in flight answered).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hemaclip.tasks.lvlm.protocols import FEATURES, LABEL_NAMES, SCRIPTED_FINGERPRINT, detect_protocol

__all__ = ["KINDS", "SCRIPTED_FINGERPRINT", "Behaviour", "ScriptedServer", "reply_text"]

KINDS = ("correct", "wrong", "unparseable", "slow", "error500", "always500", "rate_limit")
UNPARSEABLE_REPLY = "I am not able to tell from this image what kind of cell it is."


@dataclass(frozen=True)
class Behaviour:
    """What the server does for one image: `kind` (see the module), the label it answers, and for the explain
    and features protocols the justification, certainty and feature points it gives."""

    kind: str = "correct"
    answer: str | None = None
    justification: str = ""
    certainty: int = 4
    features: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown behaviour '{self.kind}'; choose from {', '.join(KINDS)}")


def reply_text(protocol: str, behaviour: Behaviour) -> str:
    """The reply text for `protocol` (see the prompts in :mod:`hemaclip.tasks.lvlm.protocols`)."""
    if behaviour.kind == "unparseable" or behaviour.answer is None:
        return UNPARSEABLE_REPLY
    name = LABEL_NAMES.get(behaviour.answer, behaviour.answer)
    if protocol == "explain":
        why = behaviour.justification or "Its morphology fits this cell type."
        return f"Answer: {name}\nJustification: {why}\nCertainty: {behaviour.certainty}"
    if protocol == "features":
        points = behaviour.features or {"nuclear_shape": 40.0, "chromatin_pattern": 20.0, "granule_type": 20.0, "cell_size": 20.0}
        lines = [f"{FEATURES[key][0]}: {points.get(key, 0.0):g}" for key in FEATURES]
        return "Answer: " + name + "\n" + "\n".join(lines)
    return f"I considered the nucleus, the chromatin, the cytoplasm and the granules.\nAnswer: {name}"


def _query_sha1(messages: Any) -> str | None:
    urls = [p["image_url"]["url"] for m in messages for p in (m.get("content") if isinstance(m.get("content"), list) else [])
            if isinstance(p, dict) and p.get("type") == "image_url"]
    if not urls or "," not in urls[-1]:
        return None
    return hashlib.sha1(base64.b64decode(urls[-1].split(",", 1)[1])).hexdigest()


class ScriptedServer:
    """The server in a background thread on 127.0.0.1 (a free port). Use as a context manager; `url` is the
    base URL to pass as ``--endpoint``."""

    def __init__(self, behaviours: Mapping[str, Behaviour], *, default: Behaviour = Behaviour("unparseable"),
                 api_key: str | None = None, slow_s: float = 2.0, retry_after_s: int = 1, model: str = "scripted",
                 hold_after: int | None = None) -> None:
        self.behaviours = dict(behaviours)
        self.default = default
        self.api_key = api_key
        self.slow_s = slow_s
        self.retry_after_s = retry_after_s
        self.model = model
        self.hold_after = hold_after
        self.received: Counter = Counter()
        self.answered: Counter = Counter()
        self.statuses: Counter = Counter()
        self.retry_times: dict[tuple[str, str], list[float]] = {}
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def release(self) -> None:
        """Stop holding requests (held ones are answered 503 and not counted as answered)."""
        self._released.set()

    def _app(self) -> Any:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model, "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "invalid API key"}}, status_code=401)
            body = await request.json()
            messages = body.get("messages", [])
            sha1, protocol = _query_sha1(messages), detect_protocol(messages)
            key = (sha1 or "", protocol)
            with self._lock:
                self.received[key] += 1
                attempt = self.received[key]
                self.retry_times.setdefault(key, []).append(time.monotonic())
                hold = self.hold_after is not None and sum(self.answered.values()) >= self.hold_after
            if hold:
                while not self._released.is_set():
                    await asyncio.sleep(0.05)
                return self._status(503, "held")
            behaviour = self.behaviours.get(sha1 or "", self.default)
            if behaviour.kind == "always500" or (behaviour.kind == "error500" and attempt == 1):
                return self._status(500, "scripted server error")
            if behaviour.kind == "rate_limit" and attempt == 1:
                return self._status(429, "scripted rate limit", {"Retry-After": str(self.retry_after_s)})
            if behaviour.kind == "slow" and attempt == 1:
                await asyncio.sleep(self.slow_s)
                if await request.is_disconnected():
                    return self._status(499, "client gone")
            with self._lock:
                self.answered[key] += 1
                self.statuses[200] += 1
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model, "system_fingerprint": SCRIPTED_FINGERPRINT,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply_text(protocol, behaviour)}}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }

        return app

    def _status(self, code: int, message: str, headers: Mapping[str, str] | None = None) -> Any:
        with self._lock:
            self.statuses[code] += 1
        return JSONResponse({"error": {"message": message}}, status_code=code, headers=dict(headers or {}))

    def __enter__(self) -> ScriptedServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the scripted server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
