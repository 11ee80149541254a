"""Downloads: what the server serves from a directory that generated code can write.

Nothing here opens a path. A route gets a file already opened once, by descriptor, without
following symlinks (`files.open_beneath`), and the bytes sent are read from that descriptor, so
a name swapped for a symlink, or a file replaced while it is served, changes nothing about
what is sent: the file that was checked, with the length it had.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi.responses import Response, StreamingResponse

from autocoder.files import OpenedFile
from autocoder.store.base import StoredFile

SNAPSHOT_BYTES = 8 * 1024 * 1024
"""Files up to this size are read whole before the headers go out, so the Content-Length sent
is exactly what was read even if the code cuts the file meanwhile; larger ones are streamed."""


def attachment(name: str) -> str:
    quoted = quote(name)
    if quoted == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename*=utf-8''{quoted}"


async def download(stored: StoredFile, media_type: str, filename: str | None = None) -> Response:
    """A stored file as an attachment named `filename` (else its own name)."""
    headers = {"content-disposition": attachment(filename or stored.name)}
    opened = stored.opened
    if opened is None:
        return Response(stored.data or b"", media_type=media_type, headers=headers)
    if opened.size <= SNAPSHOT_BYTES:
        try:
            data = await asyncio.to_thread(opened.read)
        finally:
            opened.close()
        return Response(data, media_type=media_type, headers=headers)
    headers["content-length"] = str(opened.size)
    return StreamingResponse(_stream(opened), media_type=media_type, headers=headers)


async def _stream(opened: OpenedFile) -> AsyncIterator[bytes]:
    """The file's bytes from its descriptor, closed whatever ends the response. A file cut
    shorter while it is sent ends the response early (the client sees it incomplete)."""
    try:
        chunks = opened.chunks()
        while True:
            data = await asyncio.to_thread(next, chunks, b"")
            if not data:
                return
            yield data
    finally:
        opened.close()
