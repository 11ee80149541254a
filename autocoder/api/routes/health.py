"""Health: whether the service can take runs, without a token."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

from fastapi import APIRouter, Response

from autocoder import __version__, disk
from autocoder.api.deps import ServiceDep
from autocoder.api.schemas import Health
from autocoder.config import DEFAULT_OPENAI_URL

router = APIRouter()


@router.get(
    "/health",
    responses={
        503: {
            "model": Health,
            "description": "Degraded: kernels cannot be started, or the disk is low.",
        }
    },
    summary="Is the service ready (kernels, model endpoint)? No token needed",
)
async def health(service: ServiceDep, response: Response) -> Health:
    s = service.settings
    pool = service.pool
    # A remote gateway is asked each time: kernels started there earlier say nothing of now.
    problem = await pool.check()
    free, disk_error = await asyncio.to_thread(disk.low_disk, s)
    degraded = (
        problem is not None
        or disk_error is not None
        or (pool.size > 0 and pool.ready == 0 and pool.last_error is not None)
    )
    if degraded:
        response.status_code = 503
    endpoint = (s.openai_base_url or DEFAULT_OPENAI_URL) if s.uses_remote_endpoint else None
    return Health(
        status="degraded" if degraded else "ok",
        version=__version__,
        kernels_ready=pool.ready,
        pool_size=pool.size,
        kernel_error=problem or pool.last_error,
        llm_backend="openai" if s.uses_remote_endpoint else "local",
        llm_endpoint=_without_credentials(endpoint) if endpoint else None,
        llm_model=s.model,
        runs_running=service.admission.running,
        runs_queued=service.admission.queued,
        max_concurrent_runs=s.max_concurrent_runs,
        max_queued_runs=s.max_queued_runs,
        sessions_open=service.sessions.open_count,
        max_sessions=s.max_sessions,
        disk_free_mb=round(free / disk.MIB, 1),
        disk_error=disk_error,
    )


def _without_credentials(url: str) -> str:
    parts = urlparse(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
