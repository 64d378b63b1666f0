"""Who may talk to the server: the token on every request, a login cookie for browsers, CSRF checks.

Three ways in, all checked in constant time against the server's token:

- ``Authorization: Bearer TOKEN``: API clients (the CLI, the Python client, curl). Browsers never
  attach it on their own, so these requests need no CSRF check.
- ``?token=TOKEN``: a link. On a dashboard page it is a one-time login (as Jupyter's): the answer is
  a redirect to the same page without the token, setting an HttpOnly, SameSite=Strict cookie, so the
  token leaves the address bar, the history and any Referer.
- the cookie: pages, the API and ``EventSource`` (which cannot send an Authorization header). It
  holds an HMAC of the token, not the token: a leaked cookie is not an API key for other tools.
  Browsers attach cookies on their own, so a cookie-authenticated write (any method but GET/HEAD)
  must also carry ``X-Lightdist-CSRF`` — a header a cross-origin page cannot add without a CORS
  preflight this server never grants — and, when the browser says where it comes from (``Origin``,
  ``Sec-Fetch-Site``), come from this origin. SameSite alone is not enough: another port on
  127.0.0.1 is the same *site*.

Every answer also carries headers that keep the pages self-contained (a CSP allowing only this
origin: no inline script runs even if a string escaped its element) and out of frames.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import urllib.parse
from collections.abc import Iterable

from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CSRF_HEADER", "TokenGate", "cookie_name", "is_api_path"]

CSRF_HEADER = "x-lightdist-csrf"
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lightdist: log in</title>
<link rel="stylesheet" href="/static/app.css"></head><body><main class="narrow"><h1>lightdist server</h1>
<p>This dashboard needs the server's token. Open the link <code>lightdist serve</code> printed
(<code>open http://HOST:PORT/?token=...</code>), or add <code>?token=TOKEN</code> to this address with the
token from <code>STATE_DIR/token</code>.</p></main></body></html>"""


def is_api_path(path: str) -> bool:
    """The JSON API (answers JSON errors); everything else is a dashboard page or its files."""
    return path.startswith("/v1/") or path == "/openapi.json"


def cookie_name(port: int | None) -> str:
    """One cookie per port: browsers send a cookie to every port of a host, so two servers on one
    host (two state directories) would otherwise log each other out."""
    return f"lightdist-{port or 0}"


class TokenGate:
    """ASGI middleware: authenticate (bearer, link, cookie), log in, refuse cross-site writes."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = token.encode()
        self._cookie = hmac.new(self._expected, b"lightdist dashboard cookie", hashlib.sha256).hexdigest().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan
            return
        send = _with_security_headers(send)
        headers = dict(scope["headers"])  # the last of a repeated header wins; the ones read here do not repeat
        how = self._authenticate(scope, headers)
        path = scope["path"]
        if how is None:
            await _unauthorized(path, headers)(scope, receive, send)
        elif how == "link" and scope["method"] == "GET" and not is_api_path(path):
            await self._login(scope)(scope, receive, send)
        elif how == "cookie" and scope["method"] not in _SAFE_METHODS and not _same_origin_write(scope, headers):
            forbidden = JSONResponse(
                {"error": "forbidden", "message": "a browser write needs the X-Lightdist-CSRF header from this origin"},
                status_code=403,
            )
            await forbidden(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope, headers: dict[bytes, bytes]) -> str | None:
        authorization = headers.get(b"authorization", b"")
        if authorization.startswith(b"Bearer "):
            return "bearer" if secrets.compare_digest(authorization[7:].strip(), self._expected) else None
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        given = query.get("token", [""])[0].encode()
        if given:
            return "link" if secrets.compare_digest(given, self._expected) else None
        cookie = _cookies(headers.get(b"cookie", b"")).get(cookie_name(_port(scope)), "").encode()
        if cookie and secrets.compare_digest(cookie, self._cookie):
            return "cookie"
        return None

    def _login(self, scope: Scope) -> Response:
        """The one-time link: set the cookie, then show the same page without the token."""
        query = urllib.parse.parse_qsl(scope.get("query_string", b"").decode(errors="replace"), keep_blank_values=True)
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "token"])
        response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
        response.set_cookie(
            cookie_name(_port(scope)),
            self._cookie.decode(),
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
            path="/",
        )
        response.headers["Cache-Control"] = "no-store"
        return response


def _unauthorized(path: str, headers: dict[bytes, bytes]) -> Response:
    if not is_api_path(path) and b"text/html" in headers.get(b"accept", b""):
        return HTMLResponse(_LOGIN_PAGE, status_code=401)  # a person at a browser: say how to get in
    return JSONResponse(
        {"error": "unauthorized", "message": "this server needs its token (Authorization: Bearer TOKEN)"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _same_origin_write(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    if CSRF_HEADER.encode() not in headers:
        return False
    fetch_site = headers.get(b"sec-fetch-site")
    if fetch_site is not None and fetch_site not in (b"same-origin", b"none"):
        return False
    origin = headers.get(b"origin")
    if origin is None:
        return True  # old browsers: the custom header already needed a preflight to cross origins
    host = headers.get(b"host", b"").decode(errors="replace")
    return origin.decode(errors="replace") == f"{scope.get('scheme', 'http')}://{host}"


def _cookies(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in raw.decode(errors="replace").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out.setdefault(name, value)
    return out


def _port(scope: Scope) -> int | None:
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else None


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            existing = {name.lower() for name, _ in message.get("headers", [])}
            extra: Iterable[tuple[bytes, bytes]] = (h for h in _SECURITY_HEADERS if h[0] not in existing)
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped
