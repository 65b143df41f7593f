"""A small asynchronous client of the OpenAI-compatible chat-completions API (vLLM, llama.cpp's server,
Ollama, LM Studio, hosted APIs), built on httpx.

Why httpx and not the `openai` package: httpx is already in the environment (FastAPI's test client), its
async client gives exactly what a benchmark needs (timeouts, connection limits), and retries stay in one
visible place here: the `openai` package retries on its own with its own back-off, which would make the
request budget and the "no request sent twice" guarantee harder to state.

What it guarantees:

* **Bounded concurrency**: at most `concurrency` requests in flight.
* **Timeouts** per request; a timed-out request is retried.
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
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from hemaclip.errors import HemaclipError
from hemaclip.log import get_logger

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

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise HemaclipError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise HemaclipError(f"timeout must be > 0 seconds, got {self.timeout_s}")
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
                    response = await self._http.post(self.url, json=payload)
                except httpx.TimeoutException:
                    last = f"timed out after {self.settings.timeout_s:g} s"
                except httpx.TransportError as err:
                    last = f"connection failed ({type(err).__name__})"
                else:
                    status = response.status_code
                    if status == 200:
                        try:
                            body = response.json()
                        except ValueError:
                            last = "HTTP 200 with a body that is not JSON"
                        else:
                            return ChatResult(_content(body), body, attempt, time.monotonic() - start)
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
