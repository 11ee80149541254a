"""The seam every way to get a kernel plugs into, declared as jupyter_client declares its
`KernelProvisionerBase`: a backend says whether it can serve a language under some settings,
checks itself at start, reports its health, reclaims what a dead replica left on it, and makes
handles on kernels; a handle starts one kernel and hands back its channels, says whether it
lives, interrupts, kills and shuts it down, and explains in words why it ended.

`kernel.client.Kernel` holds the conversation (execute under a deadline, interrupt, replace)
and never imports a backend; `kernel.pool` chooses one, the first of its list that serves.
A new backend is one module implementing `Backend` plus one entry in `pool.BACKENDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from autocoder.config import Settings

if TYPE_CHECKING:
    from autocoder.languages import Language

STARTUP_TIMEOUT = 60.0


class KernelLedger(Protocol):
    """Where the kernels started on a gateway are noted while they exist (a shared run store),
    so that if this process dies another one deletes them. Its methods block."""

    def kernel_started(self, kernel_id: str) -> None: ...

    def kernels_ended(self, kernel_ids: list[str]) -> None: ...


@dataclass(frozen=True)
class KernelRequest:
    """What a handle is asked to start: one kernel of `language` with this id, working in
    `workdir` (None for a backend whose kernels' files are elsewhere)."""

    settings: Settings
    language: Language
    kernel_id: str
    workdir: Path | None
    ledger: KernelLedger | None = None


class KernelChannels(Protocol):
    """The messages of one started kernel (jupyter_client's async client has these)."""

    def execute(
        self, code: str, silent: bool = False, store_history: bool = True, allow_stdin: bool = ...
    ) -> str: ...

    async def get_iopub_msg(self, timeout: float) -> dict[str, Any]: ...

    async def get_shell_msg(self, timeout: float) -> dict[str, Any]: ...


class KernelHandle(Protocol):
    """One kernel a backend runs, from its start to its shutdown."""

    async def start(self) -> KernelChannels:
        """Start the kernel and return once it answers; KernelStartError (every resource
        released) when it does not."""
        ...

    async def is_alive(self) -> bool: ...

    async def interrupt(self) -> None:
        """What Jupyter's interrupt button does; never raises."""
        ...

    async def end_processes(self) -> None:
        """Kill the kernel's processes and wait until they are gone (nothing of it can change
        its working directory afterwards); `stop()` does the rest."""
        ...

    async def stop(self) -> None:
        """Shut the kernel down: every resource of it is released when this returns."""
        ...

    def kill_now(self) -> None:
        """Synchronous last resort at interpreter exit or on a signal."""
        ...

    def exit_status(self) -> str:
        """How the kernel ended, in words."""
        ...

    def kernel_log(self, limit: int = 2000) -> str:
        """The end of what the kernel wrote to stderr, where it can be had ("" elsewhere)."""
        ...


class Backend(Protocol):
    """A way to get kernels. `local_workdir`: its kernels work in a directory of this machine
    (the run's files can be placed there and read back)."""

    name: str
    local_workdir: bool

    def why_not(self, language: Language, settings: Settings) -> str | None:
        """Why this backend cannot serve `language` under `settings`, or None when it can."""
        ...

    def check(self, settings: Settings) -> None:
        """At start: raise (a one-line AutocoderError) when kernels cannot be had. Blocks."""
        ...

    async def probe(self, settings: Settings) -> str | None:
        """For /health: why kernels cannot be had right now, or None."""
        ...

    async def reclaim(self, settings: Settings, kernel_ids: list[str]) -> list[str]:
        """Delete kernels a replica that died left here; returns the ids that are gone."""
        ...

    def new(self, request: KernelRequest) -> KernelHandle:
        """A handle on a kernel to start (nothing runs until its `start()`)."""
        ...
