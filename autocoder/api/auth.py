"""Who may use the API: a bearer token, or loopback only when there is none."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from autocoder.api.deps import ServiceDep
from autocoder.config import Settings
from autocoder.errors import ConfigError

_bearer = HTTPBearer(auto_error=False, description="AUTOCODER_API_TOKEN, when the server has one.")


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
    """Refuse to offer code execution beyond this machine without a token."""
    if not _is_loopback(settings.host) and not _token(settings):
        raise ConfigError(
            f"refusing to listen on {settings.host or 'all addresses'} without AUTOCODER_API_TOKEN: "
            "set it (clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1 "
            "(AUTOCODER_HOST / --host)"
        )


def _arrived_on_loopback(request: Request) -> bool:
    """The local address the request came in on. Unix sockets and in-process clients count as local."""
    server = request.scope.get("server")
    if not server:
        return True
    try:
        return ipaddress.ip_address(str(server[0])).is_loopback
    except ValueError:
        return True


def require_token(
    request: Request,
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = _token(service.settings)
    if not token:
        # `uvicorn autocoder.api:app --host 0.0.0.0` bypasses serve()'s check; this one holds.
        if not _arrived_on_loopback(request):
            raise HTTPException(
                403, "this server has no AUTOCODER_API_TOKEN, so it answers only on loopback"
            )
        return
    given = credentials.credentials if credentials else ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            401,
            "missing or wrong token: send 'Authorization: Bearer <AUTOCODER_API_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
