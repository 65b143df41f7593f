"""A small asynchronous client of the OpenAI-compatible chat-completions API (vLLM, llama.cpp's server,
Ollama, LM Studio, hosted APIs), built on httpx.

Why httpx and not the `openai` package: httpx is already in the environment (FastAPI's test client), its
async client gives exactly what a benchmark needs (timeouts, connection limits), and retries stay in one
visible place here: the `openai` package retries on its own with its own back-off, which would make the
request budget and the "no request sent twice" guarantee harder to state.

What it guarantees:

* **Bounded concurrency**: at most `concurrency` requests in flight.
* **Timeouts** per request: `timeout_s` bounds the whole request (connect, send, every byte of the answer),
  not each read, so a server dripping a byte at a time cannot hold a worker; a timed-out request is retried.
* **A size limit** on each answer (`max_response_bytes`): the body is streamed and the request abandoned
  past it, so a runaway answer never fills memory or the cache.
* **An answer is a body with `choices`**: an HTTP 200 without them (or not JSON) is a failed attempt,
  retried and never cached.
* **Retries with exponential back-off** on timeouts, connection errors, 429 and 5xx; a ``Retry-After``
  header (seconds or an HTTP date) is honoured, and after a 429 every worker waits until then, not just
  the one that was told.
* **A request budget**: at most `max_requests` HTTP requests (retries included) per client; when it is spent,
  nothing more is sent and the caller is told (:class:`BudgetExhausted`).
* **Credentials**: the key is given to the client, sent only as the ``Authorization`` header, and never
  logged; :meth:`ChatClient.redacted` is how an endpoint is written anywhere.
* 401, 403 and 404 mean every request would fail the same way: they stop the run at once
  (:class:`EndpointError`) instead of spending the budget.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from hemaclip.errors import HemaclipError
from hemaclip.log import get_logger
from hemaclip.tasks.lvlm import MAX_RESPONSE_BYTES

__all__ = ["BudgetExhausted", "ChatClient", "ChatResult", "ClientSettings", "EndpointError", "RequestFailed",
           "chat_url", "redact_url"]

log = get_logger(__name__)
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})


@dataclass(frozen=True)
class ClientSettings:
    """How the client talks to the endpoint; defaults suit a local server on one GPU."""

    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_retry_after_s: float = 600.0
    max_requests: int | None = None
    max_tokens: int = 1024
    temperature: float = 0.0
    max_response_bytes: int = MAX_RESPONSE_BYTES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise HemaclipError(f"concurrency must be >= 1, got {self.concurrency}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise HemaclipError(f"timeout must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.max_response_bytes < 1:
            raise HemaclipError(f"max response size must be >= 1 byte, got {self.max_response_bytes}")
        if self.max_retries < 0:
            raise HemaclipError(f"max retries must be >= 0, got {self.max_retries}")
        if self.max_requests is not None and self.max_requests < 0:
            raise HemaclipError(f"max requests must be >= 0, got {self.max_requests}")
        if self.max_tokens < 1:
            raise HemaclipError(f"max tokens must be >= 1, got {self.max_tokens}")


class EndpointError(HemaclipError):
    """The endpoint refuses every request (wrong URL, model or key): the run stops."""


class RequestFailed(Exception):
    """One request failed for good (after retries, or a 4xx that retrying cannot fix)."""


class BudgetExhausted(Exception):
    """The request budget is spent: nothing more is sent."""


class _TooLarge(Exception):
    """An answer's body passed `max_response_bytes` (the request is abandoned)."""


@dataclass(frozen=True)
class _Reply:
    """What came back for one attempt: status, headers and the body's bytes (read within the limits)."""

    status: int
    headers: httpx.Headers
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class ChatResult:
    """A successful answer: the assistant's text, the full JSON body, attempts and seconds it took."""

    content: str | None
    response: dict[str, Any]
    attempts: int
    seconds: float


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment: the form written to logs and reports."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def chat_url(endpoint: str) -> str:
    """The chat-completions URL of an endpoint given as a base URL (``.../v1``) or as the full URL."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HemaclipError(f"endpoint '{redact_url(endpoint)}' is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content(body: Mapping[str, Any]) -> str | None:
    """The assistant's text of a chat-completions body (a list of parts is joined)."""
    try:
        message = body["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None
    content = message.get("content") if isinstance(message, Mapping) else None
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return content if isinstance(content, str) else None


class ChatClient:
    """Sends chat-completions requests with the guarantees of this module. Use as ``async with``."""

    def __init__(self, endpoint: str, api_key: str | None = None, settings: ClientSettings = ClientSettings()) -> None:
        self.url = chat_url(endpoint)
        self.redacted = redact_url(self.url)
        self.settings = settings
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._pause_until = 0.0
        self.requests_sent = 0
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> ChatClient:
        limits = httpx.Limits(max_connections=self.settings.concurrency, max_keepalive_connections=self.settings.concurrency)
        timeout = httpx.Timeout(self.settings.timeout_s, connect=min(10.0, self.settings.timeout_s))
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()

    @property
    def budget_left(self) -> int | None:
        cap = self.settings.max_requests
        return None if cap is None else max(0, cap - self.requests_sent)

    def _take_budget(self) -> None:
        if self.budget_left == 0:
            raise BudgetExhausted()
        self.requests_sent += 1

    def _backoff(self, attempt: int) -> float:
        delay = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** (attempt - 1))
        return delay * (1.0 + 0.1 * random.random())  # a little jitter so workers do not retry in lockstep

    async def _post(self, payload: Mapping[str, Any]) -> _Reply:
        """One POST, the body streamed and abandoned past `max_response_bytes`."""
        assert self._http is not None
        cap = self.settings.max_response_bytes
        async with self._http.stream("POST", self.url, json=payload) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise _TooLarge(int(declared))
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise _TooLarge(size)
                chunks.append(chunk)
            return _Reply(response.status_code, response.headers, b"".join(chunks))

    async def _wait_pause(self) -> None:
        wait = self._pause_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def complete(self, payload: Mapping[str, Any]) -> ChatResult:
        """POST one chat-completions request; retries as described above.

        Raises RequestFailed (this request failed for good), BudgetExhausted or EndpointError.
        """
        assert self._http is not None, "use ChatClient as 'async with'"
        start = time.monotonic()
        last = "no attempt"
        for attempt in range(1, self.settings.max_retries + 2):
            async with self._slots:
                await self._wait_pause()
                self._take_budget()
                wait: float | None = None
                try:
                    # The deadline covers the whole request, not each read of it.
                    response = await asyncio.wait_for(self._post(payload), timeout=self.settings.timeout_s)
                except (TimeoutError, httpx.TimeoutException):
                    last = f"timed out after {self.settings.timeout_s:g} s"
                except _TooLarge as err:
                    raise RequestFailed(f"answer larger than {self.settings.max_response_bytes} bytes "
                                        f"({err.args[0]} bytes or more); abandoned") from None
                except httpx.TransportError as err:
                    last = f"connection failed ({type(err).__name__})"
                else:
                    status = response.status
                    if status == 200:
                        try:
                            body = json.loads(response.body)
                        except ValueError:
                            last = "HTTP 200 with a body that is not JSON"
                        else:
                            if isinstance(body, dict) and isinstance(body.get("choices"), list) and body["choices"]:
                                return ChatResult(_content(body), body, attempt, time.monotonic() - start)
                            last = "HTTP 200 without 'choices' (not an answer)"
                    else:
                        detail = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
                        last = f"HTTP {status}" + (f": {detail}" if detail else "")
                        if status in FATAL_STATUS:
                            raise EndpointError(f"{self.redacted} answered {last}; check --endpoint, --model and --api-key-env")
                        if status not in RETRY_STATUS:
                            raise RequestFailed(last)
                        wait = _retry_after(response.headers.get("retry-after"))
                        if wait is not None:
                            wait = min(wait, self.settings.max_retry_after_s)
                            if status == 429:
                                self._pause_until = max(self._pause_until, time.monotonic() + wait)
            if attempt > self.settings.max_retries:
                break
            delay = max(self._backoff(attempt), wait or 0.0)
            log.debug("request failed (%s); retry %d of %d in %.2f s", last, attempt, self.settings.max_retries, delay)
            await asyncio.sleep(delay)
        raise RequestFailed(f"{last} (after {self.settings.max_retries + 1} attempts)")
