"""Who may use the API, decided before a request's body is read.

`Guard` is an ASGI middleware, not a FastAPI dependency, because FastAPI validates a body
before any dependency runs: a wrong token must get 401 whatever the body holds (JSON today,
a multipart upload tomorrow), and no byte of it is read for a caller that may not send it.

Two checks, in order:
- The Host header (and Origin, when a browser sends one) must name this server: a loopback
  name, AUTOCODER_HOST, or one of AUTOCODER_ALLOWED_HOSTS. This stops DNS rebinding, where a
  web page whose name re-resolves to 127.0.0.1 talks to the server as if it were same-origin
  (Jupyter checks the same). A server bound to every address (0.0.0.0, ::) has a token by
  then and cannot know its public names, so there any Host passes unless
  AUTOCODER_ALLOWED_HOSTS lists them.
- A bearer token, when AUTOCODER_API_TOKEN is set, on every path but /health, the docs and
  the web page's shells and assets (which hold no data);
  without one, only requests that arrived on loopback are served.
"""

from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autocoder.config import Settings
from autocoder.errors import ConfigError

PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# The web page's shells and assets hold no run data (their scripts ask the API with the token).
PAGE_PATHS = frozenset({"/", "/history"})
PAGE_PREFIXES = ("/static/", "/history/")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def _token(settings: Settings) -> str:
    return settings.api_token.get_secret_value() if settings.api_token else ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to offer code execution beyond this machine without a token, and refuse a token
    no client could send (HTTP headers carry ASCII; anything else never matches)."""
    token = _token(settings)
    if token and not (
        token.isascii() and token.isprintable() and not any(c.isspace() for c in token)
    ):
        raise ConfigError(
            "AUTOCODER_API_TOKEN must be printable ASCII without spaces, or no client can send it"
        )
    if not _is_loopback(settings.host) and not token:
        raise ConfigError(
            f"refusing to listen on {settings.host or 'all addresses'} without AUTOCODER_API_TOKEN: "
            "set it (clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1 "
            "(AUTOCODER_HOST / --host)"
        )


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The names a request's Host may give, lower-case without port; None means any."""
    extra = {h.strip().lower().strip("[]") for h in settings.allowed_hosts.split(",") if h.strip()}
    if "*" in extra:
        return None
    bound = settings.host.lower().strip("[]")
    if bound in ANY_ADDRESS and _token(settings) and not extra:
        return None
    return LOOPBACK_NAMES | extra | ({bound} - ANY_ADDRESS)


def _host_name(authority: str) -> str:
    """`name[:port]` or `[v6]:port` → the name, lower-case; '' when it cannot be parsed."""
    try:
        return (urlsplit(f"//{authority}").hostname or "").lower()
    except ValueError:
        return ""


def _arrived_over_ip(scope: Scope) -> bool:
    server = scope.get("server")
    if not server:
        return False
    try:
        ipaddress.ip_address(str(server[0]))
    except ValueError:
        return False
    return True


def _arrived_on_loopback(scope: Scope) -> bool:
    """The local address the request came in on. Unix sockets and in-process clients count as local."""
    server = scope.get("server")
    if not server:
        return True
    try:
        return ipaddress.ip_address(str(server[0])).is_loopback
    except ValueError:
        return True


def _refusal(scope: Scope, settings: Settings) -> JSONResponse | None:
    headers = {k.lower(): v for k, v in scope["headers"]}
    hosts = allowed_hosts(settings)
    # Only a request that came over TCP has a Host a browser could have been tricked into
    # (a Unix socket or an in-process client has no address a page could rebind).
    if hosts is not None and _arrived_over_ip(scope):
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        if host not in hosts:
            return JSONResponse(
                {
                    "detail": f"Host {host or '(none)'!r} is not this server's name; "
                    "add it to AUTOCODER_ALLOWED_HOSTS to serve it"
                },
                status_code=403,
            )
        origin = headers.get(b"origin")
        if origin is not None:
            name = urlsplit(origin.decode("latin-1")).hostname or ""
            if name.lower() not in hosts:
                return JSONResponse(
                    {"detail": "cross-origin requests are refused (Origin is not this server)"},
                    status_code=403,
                )
    path = scope["path"]
    if path in PUBLIC_PATHS or path in PAGE_PATHS or path.startswith(PAGE_PREFIXES):
        return None
    token = _token(settings)
    if not token:
        # `uvicorn autocoder.api:app --host 0.0.0.0` bypasses serve()'s check; this one holds.
        if not _arrived_on_loopback(scope):
            return JSONResponse(
                {
                    "detail": "this server has no AUTOCODER_API_TOKEN, so it answers only on loopback"
                },
                status_code=403,
            )
        return None
    scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), token.encode()):
        return JSONResponse(
            {
                "detail": "missing or wrong token: send 'Authorization: Bearer <AUTOCODER_API_TOKEN>'"
            },
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


class Guard:
    """Host, Origin and token checks before the app sees the request; HEAD answered as GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = getattr(getattr(scope.get("app"), "state", None), "service", None)
        if scope["type"] != "http" or service is None:
            await self.app(scope, receive, send)
            return
        refusal = _refusal(scope, service.settings)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            await self.app({**scope, "method": "GET"}, receive, _headers_only(send))
            return
        await self.app(scope, receive, send)


def _headers_only(send: Send) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b""}
        await send(message)

    return sender
