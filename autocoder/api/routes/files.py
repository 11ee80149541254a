"""The files a run's code wrote: `GET /runs/{run_id}/files/{name}`."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

from autocoder.api.deps import RunId, ServiceDep
from autocoder.api.routes.runs import stored_response
from autocoder.api.schemas import ErrorBody
from autocoder.files import media_type

router = APIRouter()  # auth.Guard checks the token

FileName = Annotated[
    str, PathParam(description="The file's `name` as the run's `files` list gives it.")
]


@router.get(
    "/runs/{run_id}/files/{name:path}",
    response_class=FileResponse,
    responses={
        200: {"description": "The file, as the code wrote it."},
        404: {"model": ErrorBody, "description": "No such run, or no such file in it."},
    },
    summary="Download a file a run's code wrote",
)
async def get_file(run_id: RunId, name: FileName, service: ServiceDep) -> Response:
    """Served only from the run's own directory: `..`, absolute names and any symlink on the
    way are refused, so nothing a run leaves can point a download elsewhere."""
    stored = await asyncio.to_thread(service.store.output_file, run_id, name)
    if stored is None:
        raise HTTPException(404, f"run {run_id!r} has no file {name!r}")
    return stored_response(stored, media_type(name))
