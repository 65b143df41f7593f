"""Who may talk to a hemaclip server: the Host-header check and the token, shared by both servers.

Why it is built this way:

* **Host header** (Starlette's TrustedHostMiddleware): only requests that name this server are answered,
  so a web page cannot reach a loopback server through DNS rebinding. The describe server and the review
  server (which writes corrections) get the same check from :func:`guard`.
* **Token**: when one is given, every request must carry it (``Authorization: Bearer TOKEN`` or
  ``?token=TOKEN``, for a page and its images), compared in constant time; the packaged static files
  (``/static/...``: the page's script and styles, no data) are exempt so a page opened with ``?token=``
  can load them. A server bound to anything but loopback must have a token (:func:`check_exposure`).
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from hemaclip.errors import HemaclipError

__all__ = ["LOOPBACK_HOSTS", "MIN_TOKEN_LENGTH", "allowed_hosts_for", "check_exposure", "guard", "is_loopback"]

# As they appear in a Host header (an IPv6 address in brackets).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MIN_TOKEN_LENGTH = 16
PUBLIC_PREFIX = "/static/"  # packaged page assets: no data, needed before the page can add the token


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse a server reachable from the network without a token, and a token too short to guard it."""
    if not is_loopback(host) and not token:
        raise HemaclipError(f"--host {host} exposes the server to the network: give --token (every request must then carry it)")
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise HemaclipError(f"--token must be at least {MIN_TOKEN_LENGTH} characters "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")


def allowed_hosts_for(host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The Host header names a server bound to `host` answers to: the loopback names, `host` itself and
    `extra`; bound to every interface (0.0.0.0 or ::), also this machine's name and its addresses. An
    IPv6 address is written in brackets, as it appears in a Host header."""
    import ipaddress
    import socket

    def as_header(name: str) -> str:
        name = name.strip().strip("[]").lower()
        try:
            return f"[{name}]" if ipaddress.ip_address(name).version == 6 else name
        except ValueError:
            return name

    names = [*LOOPBACK_HOSTS, host, *extra]
    if host in ("0.0.0.0", "::", ""):
        machine = socket.gethostname()
        names += [machine, socket.getfqdn()]
        try:
            names += [info[4][0] for info in socket.getaddrinfo(machine, None)]
        except OSError:
            pass
    return tuple(dict.fromkeys(as_header(n) for n in names if n and n not in ("0.0.0.0", "::")))


def guard(app: FastAPI, allowed_hosts: tuple[str, ...] | list[str], token: str | None = None) -> None:
    """Answer only requests naming one of `allowed_hosts` (others: 400) and, with `token`, carrying it (others: 401)."""
    if token:
        expected = token.encode()

        @app.middleware("http")
        async def _check_token(request: Request, call_next: Any) -> Response:
            if request.url.path.startswith(PUBLIC_PREFIX):
                return await call_next(request)
            given = request.query_params.get("token", "")
            header = request.headers.get("authorization", "")
            if header.lower().startswith("bearer "):
                given = header[7:].strip()
            if not secrets.compare_digest(given.encode(), expected):
                return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
            return await call_next(request)

    # Added last, so it runs first: a rebinding page learns nothing, not even whether a token is needed.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
