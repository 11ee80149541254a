"""Where the HTTP API serves what a run or a session holds.

The engine's records name a file by its path inside the run (or the session); the address it
is downloaded from is the API's to make, here, on the way out.
"""

from __future__ import annotations

from autocoder.records import Event, RunFile, RunResult, SessionInfo


def _linked(files: list[RunFile], base: str) -> list[RunFile]:
    return [f.model_copy(update={"url": base + f.name}) for f in files]


def run_links(result: RunResult) -> RunResult:
    """`result` with each file's address: `GET /runs/{run_id}/files/{name}`."""
    if not result.files:
        return result
    return result.model_copy(
        update={"files": _linked(result.files, f"/runs/{result.run_id}/files/")}
    )


def event_links(event: Event) -> Event:
    """A run's last event carries its result: its files get their addresses too."""
    files = event.data.get("files")
    if event.type != "run_finished" or not files:
        return event
    base = f"/runs/{event.run_id}/files/"
    data = {**event.data, "files": [{**f, "url": base + f["name"]} for f in files]}
    return event.model_copy(update={"data": data})


def session_links(info: SessionInfo) -> SessionInfo:
    """A session's files are downloaded from the session: `GET /sessions/{id}/files/{name}`."""
    return info.model_copy(
        update={"files": _linked(info.files, f"/sessions/{info.session_id}/files/")}
    )
