"""The files a run's code wrote: `GET /runs/{run_id}/files/{name}`."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import Response

from autocoder.api.deps import RunId, ServiceDep
from autocoder.api.downloads import download
from autocoder.api.schemas import ErrorBody
from autocoder.files import media_type

router = APIRouter()  # auth.Guard checks the token

FileName = Annotated[
    str, PathParam(description="The file's `name` as the run's `files` list gives it.")
]


@router.get(
    "/runs/{run_id}/files/{name:path}",
    response_class=Response,
    responses={
        200: {"description": "The file, as the code wrote it."},
        404: {"model": ErrorBody, "description": "No such run, or no such file in it."},
    },
    summary="Download a file a run's code wrote",
)
async def get_file(run_id: RunId, name: FileName, service: ServiceDep) -> Response:
    """Served only from the run's own directory, opened once by descriptor: `..`, absolute
    names and any symlink on the way are refused, so nothing a run leaves (or swaps in while
    it is served) can point a download elsewhere."""
    stored = await asyncio.to_thread(service.store.output_file, run_id, name)
    if stored is None:
        raise HTTPException(404, f"run {run_id!r} has no file {name!r}")
    return await download(stored, media_type(name))
