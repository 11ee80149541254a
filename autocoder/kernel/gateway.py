"""Kernels from a Jupyter Kernel Gateway or Enterprise Gateway (AUTOCODER_GATEWAY_URL).

`GatewayBackend` is the backend (`kernel.backend`) whose kernels run on the gateway: each is
started with `POST /api/kernels`, spoken to over `/api/kernels/{id}/channels` (the Jupyter
message protocol as JSON over a websocket), interrupted with `POST .../interrupt` and deleted
with `DELETE`. Everything else is `kernel.client.Kernel`'s own code: the deadline, interrupt →
grace → replace, the output caps applied as messages arrive, a dead kernel reported as
kernel_died. The gateway serves autocoder's kernelspec, so its kernels are confined there as
local ones are here. Their files stay on the gateway's host: it gives them no local working
directory, so sessions (which keep files between prompts) are refused there.

A kernel is known dead when the gateway says so on the websocket (`dead`, with
`--KernelRestarter.restart_limit=0`; or `restarting`: the gateway brought it back empty), when
the gateway no longer lists it, or when the websocket closes and the gateway does not answer.
Every request has a deadline; a gateway that is down or refuses is one `GatewayError` naming it.

Each kernel is noted in a `KernelLedger` (the shared run store) while it exists, so that if this
process dies another replica finds it there and `reclaim`s it (docs/scale.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import queue
import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

from autocoder.config import Settings, without_credentials
from autocoder.errors import KernelStartError
from autocoder.kernel.backend import STARTUP_TIMEOUT, KernelLedger, KernelRequest
from autocoder.kernel.provisioner import ASKED_PREFIX, TIGHTENABLE
from autocoder.languages import Language

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
PROBE_TIMEOUT = 5.0
# How often a busy kernel is asked after over REST, besides what the websocket says.
ALIVE_EVERY = 2.0
READY_EVERY = 1.0
DELETE_TIMEOUT = 6.0


def gateway_args(*, max_kernels: int = 32) -> list[str]:
    """What `jupyter kernelgateway` needs to serve autocoder's kernels well (docs/scale.md).

    No restarts: a kernel that died would come back under the same id with an empty namespace,
    silently; with none the gateway reports it dead (~2.3 s after) and autocoder replaces it.
    The no-delay websocket: 7 ms a round trip instead of 48. The token comes from KG_AUTH_TOKEN.
    """
    return [
        "--KernelRestarter.restart_limit=0",
        f"--KernelGatewayApp.max_kernels={max_kernels}",
        "--KernelGatewayApp.kernel_websocket_connection_class=autocoder.kernel.gateway_ws.NoDelayChannels",
        "--KernelGatewayApp.default_kernel_name=autocoder-sandbox",
    ]


class GatewayError(KernelStartError):
    """The gateway is down, refused, or cannot start autocoder's kernel; the message names it."""


def where(settings: Settings) -> str:
    """The gateway's URL without any credentials, for messages."""
    return without_credentials(settings.gateway_url or "")


def _headers(settings: Settings) -> dict[str, str]:
    token = settings.gateway_token.get_secret_value() if settings.gateway_token else ""
    return {"Authorization": f"token {token}"} if token else {}


def _refusal(settings: Settings, response: httpx.Response, doing: str) -> GatewayError:
    at = f"the kernel gateway at {where(settings)}"
    if response.status_code == 401:
        return GatewayError(f"{at} refused the token (AUTOCODER_GATEWAY_TOKEN) {doing}")
    try:
        reason = str(response.json().get("message") or response.json().get("reason") or "")
    except ValueError:
        reason = ""
    reason = reason.strip().splitlines()[-1][:200] if reason.strip() else response.reason_phrase
    if response.status_code == 403 and "limit" in reason.lower():
        return GatewayError(f"{at} runs as many kernels as it may (its max_kernels) {doing}")
    return GatewayError(f"{at} answered {response.status_code} {doing}: {reason}")


def _unreachable(settings: Settings, e: Exception) -> GatewayError:
    what = type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}"
    return GatewayError(
        f"the kernel gateway at {where(settings)} cannot be reached ({what}); "
        "check AUTOCODER_GATEWAY_URL"
    )


def _specs_problem(settings: Settings, response: httpx.Response) -> str | None:
    if response.status_code != 200:
        return str(_refusal(settings, response, "listing its kernelspecs"))
    try:
        specs = response.json().get("kernelspecs", {})
    except ValueError:
        return f"{where(settings)} does not answer as a Jupyter kernel gateway (/api/kernelspecs)"
    if settings.gateway_kernel not in specs:
        return (
            f"the kernel gateway at {where(settings)} has no kernelspec "
            f"{settings.gateway_kernel!r} (AUTOCODER_GATEWAY_KERNEL); run "
            "`autocoder kernels install` on the gateway's host"
        )
    return None


def check(settings: Settings) -> None:
    """At start: the gateway answers, takes the token and serves the kernelspec, or GatewayError.

    Once it has, later calls (each local kernel start checks its sandbox) cost nothing."""
    token = settings.gateway_token.get_secret_value() if settings.gateway_token else ""
    _check(settings.gateway_url or "", token, settings.gateway_kernel)


@functools.cache
def _check(url: str, token: str, kernel_name: str) -> None:
    settings = Settings(gateway_url=url, gateway_token=token or None, gateway_kernel=kernel_name)
    try:
        with httpx.Client(headers=_headers(settings), timeout=PROBE_TIMEOUT) as http:
            response = http.get(f"{url}/api/kernelspecs")
    except httpx.HTTPError as e:
        raise _unreachable(settings, e) from None
    problem = _specs_problem(settings, response)
    if problem:
        raise GatewayError(problem)


async def probe(settings: Settings) -> str | None:
    """`check` for /health: why kernels cannot be had from the gateway now, or None."""
    try:
        async with httpx.AsyncClient(headers=_headers(settings), timeout=PROBE_TIMEOUT) as http:
            response = await http.get(f"{settings.gateway_url}/api/kernelspecs")
    except httpx.HTTPError as e:
        return str(_unreachable(settings, e))
    return _specs_problem(settings, response)


def asked_limits(settings: Settings) -> dict[str, str]:
    """This server's kernel limits, for autocoder's provisioner on the gateway: it applies those
    tighter than its own (a gateway passes on `KERNEL_*` variables only)."""
    return {ASKED_PREFIX + name.upper(): str(getattr(settings, name)) for name in TIGHTENABLE}


class _Channels:
    """The websocket to one remote kernel, as `KernelChannels`."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.session = Session(username="autocoder")
        self.iopub: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.shell: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.outgoing: asyncio.Queue[str] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.gone = ""  # why the kernel is known dead, once it is
        self.closed = False
        self.tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._write()),
        ]

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg = self.session.msg(msg_type, content)
        msg["channel"] = channel
        msg["buffers"] = []
        self.outgoing.put_nowait(json.dumps(msg, default=json_default))
        return str(msg["header"]["msg_id"])

    def execute(
        self,
        code: str,
        silent: bool = False,
        store_history: bool = True,
        allow_stdin: bool = False,
    ) -> str:
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        }
        return self.send("execute_request", content)

    async def get_iopub_msg(self, timeout: float) -> dict[str, Any]:
        if self.gone or (self.closed and self.iopub.empty()):
            if not self.gone:
                await asyncio.sleep(timeout)  # the caller asks over REST whether it is alive
            raise queue.Empty
        return await self._next(self.iopub, timeout)

    async def get_shell_msg(self, timeout: float) -> dict[str, Any]:
        if self.gone or (self.closed and self.shell.empty()):
            raise queue.Empty
        return await self._next(self.shell, timeout)

    @staticmethod
    async def _next(q: asyncio.Queue[dict[str, Any] | None], timeout: float) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(q.get(), timeout)
        except asyncio.TimeoutError:
            raise queue.Empty from None
        if msg is None:
            raise queue.Empty
        return msg

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                channel = msg.get("channel")
                if channel == "shell" and msg.get("msg_type") == "kernel_info_reply":
                    self.ready.set()
                elif channel == "shell":
                    self.shell.put_nowait(msg)
                elif channel == "iopub":
                    state = msg.get("content", {}).get("execution_state")
                    if state in ("dead", "restarting") and not msg.get("parent_header"):
                        self.gone = f"the gateway reported the kernel {state}"
                        self.iopub.put_nowait(None)
                        continue
                    self.iopub.put_nowait(msg)
        except Exception as e:  # the connection broke; the kernel may be alive or not
            log.debug("gateway websocket: %s", e)
        finally:
            self.closed = True
            self.iopub.put_nowait(None)
            self.shell.put_nowait(None)

    async def _write(self) -> None:
        try:
            while True:
                await self.ws.send(await self.outgoing.get())
        except Exception as e:
            log.debug("gateway websocket: %s", e)
            self.closed = True
            self.iopub.put_nowait(None)
            self.shell.put_nowait(None)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)


async def _note(what: str, method: Any, *args: Any) -> None:
    """Tell the ledger; one that fails costs a reclaim, never the run (the gateway's culling
    still removes the kernel)."""
    try:
        await asyncio.to_thread(method, *args)
    except Exception as e:
        log.warning("could not note %s in the run store: %s", what, e)


async def reclaim(settings: Settings, kernel_ids: list[str]) -> list[str]:
    """Delete kernels that a replica which died left on the gateway; returns the ids that are
    gone (deleted, or already unknown to the gateway). The others are logged, to be tried again."""
    gone: list[str] = []

    async def delete(http: httpx.AsyncClient, kernel_id: str) -> None:
        try:
            response = await http.delete(f"/api/kernels/{quote(kernel_id)}")
        except httpx.HTTPError as e:
            what = type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}"
            log.warning("could not reclaim kernel %s on %s: %s", kernel_id, where(settings), what)
            return
        if response.status_code in (200, 204, 404):
            gone.append(kernel_id)
            # A warning, as the interrupted runs are: a replica died.
            log.warning(
                "reclaimed kernel %s on %s, left by a replica that stopped answering",
                kernel_id,
                where(settings),
            )
        else:
            problem = _refusal(settings, response, f"deleting kernel {kernel_id}")
            log.warning("could not reclaim a kernel: %s", problem)

    timeout = httpx.Timeout(DELETE_TIMEOUT, connect=CONNECT_TIMEOUT)
    async with httpx.AsyncClient(
        base_url=settings.gateway_url or "", headers=_headers(settings), timeout=timeout
    ) as http:
        await asyncio.gather(*(delete(http, k) for k in kernel_ids))
    return gone


class _RemoteKernel:
    """One kernel on the gateway, as a `KernelHandle`."""

    def __init__(self, settings: Settings, ledger: KernelLedger | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.http = httpx.AsyncClient(
            base_url=settings.gateway_url or "",
            headers=_headers(settings),
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
        )
        self.kernel_id: str | None = None
        self.channels: _Channels | None = None
        self.checked = time.monotonic()

    async def start(self) -> _Channels:
        try:
            await asyncio.wait_for(self._start(), STARTUP_TIMEOUT)
        except BaseException as e:
            await asyncio.shield(self.stop())
            if isinstance(e, asyncio.TimeoutError):
                raise GatewayError(
                    f"the kernel gateway at {where(self.settings)} did not start a kernel "
                    f"within {STARTUP_TIMEOUT:g} s"
                ) from None
            if isinstance(e, Exception) and not isinstance(e, KernelStartError):
                raise GatewayError(f"the kernel gateway at {where(self.settings)}: {e}") from e
            raise
        assert self.channels is not None
        return self.channels

    async def _start(self) -> None:
        s = self.settings
        try:
            response = await self.http.post(
                "/api/kernels", json={"name": s.gateway_kernel, "env": asked_limits(s)}
            )
        except httpx.HTTPError as e:
            raise _unreachable(s, e) from None
        if response.status_code not in (200, 201):
            raise _refusal(s, response, f"starting a {s.gateway_kernel!r} kernel")
        self.kernel_id = str(response.json()["id"])
        if self.ledger is not None:
            await _note(f"kernel {self.kernel_id}", self.ledger.kernel_started, self.kernel_id)
        self.channels = _Channels(await self._connect())
        # The kernel answers kernel_info once its shell is up; ask until it does.
        while not self.channels.ready.is_set():
            if self.channels.closed:
                raise GatewayError(
                    f"the kernel gateway at {where(s)} closed the kernel's websocket "
                    f"before it was ready ({self.channels.gone or 'the kernel did not start'})"
                )
            self.channels.send("kernel_info_request", {})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.channels.ready.wait(), READY_EVERY)

    async def _connect(self) -> Any:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        s = self.settings
        base = (s.gateway_url or "").replace("http", "ws", 1)
        url = (
            f"{base}/api/kernels/{quote(str(self.kernel_id))}/channels"
            f"?session_id={uuid.uuid4().hex}"
        )
        # A message may carry up to the output limit, JSON-escaped (6 bytes a character at worst).
        size = 8 * s.max_output_bytes + (4 << 20)
        try:
            return await connect(
                url,
                additional_headers=_headers(s),
                open_timeout=REQUEST_TIMEOUT,
                close_timeout=2,
                max_size=size,
                compression=None,
                ping_interval=None,  # a kernel busy for minutes is normal; REST says if it is gone
            )
        except InvalidStatus as e:
            raise GatewayError(
                f"the kernel gateway at {where(s)} refused the kernel's websocket "
                f"({e.response.status_code})"
            ) from None
        except (OSError, TimeoutError) as e:
            raise _unreachable(s, e) from None

    async def is_alive(self) -> bool:
        channels = self.channels
        if self.kernel_id is None or channels is None or channels.gone:
            return False
        if not channels.closed and time.monotonic() - self.checked < ALIVE_EVERY:
            return True
        self.checked = time.monotonic()
        try:
            response = await self.http.get(f"/api/kernels/{quote(self.kernel_id)}")
        except httpx.HTTPError:
            return not channels.closed  # the gateway is slow to answer; the websocket is up
        if response.status_code == 404:
            channels.gone = "the gateway no longer has the kernel"
            return False
        with contextlib.suppress(ValueError):
            if response.json().get("execution_state") == "dead":
                channels.gone = "the gateway reported the kernel dead"
                return False
        if channels.closed:
            # Alive, but its websocket is gone: no output of it can be had any more.
            channels.gone = "the kernel's websocket to the gateway closed"
            return False
        return True

    async def interrupt(self) -> None:
        if self.kernel_id is not None:
            with contextlib.suppress(Exception):
                await self.http.post(f"/api/kernels/{quote(self.kernel_id)}/interrupt")

    async def end_processes(self) -> None:
        """Nothing to wait for here: the kernel's files are on the gateway's host, and
        `stop()` deletes it."""

    async def stop(self) -> None:
        """Close the websocket and delete the kernel on the gateway, within 10 s in all."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stop(), 10)

    async def _stop(self) -> None:
        """Close the websocket and delete the kernel on the gateway; a gone kernel is fine."""
        channels, self.channels = self.channels, None
        try:
            if channels is not None:
                await channels.close()
            if self.kernel_id is not None:
                try:
                    # Within the 10 s a local kernel has for its whole shutdown.
                    response = await self.http.delete(
                        f"/api/kernels/{quote(self.kernel_id)}", timeout=DELETE_TIMEOUT
                    )
                except httpx.HTTPError as e:
                    log.warning(
                        "could not delete kernel %s on %s: %s",
                        self.kernel_id,
                        where(self.settings),
                        e,
                    )
                else:
                    if response.status_code not in (200, 204, 404):
                        log.warning(
                            "deleting kernel %s on %s: %s",
                            self.kernel_id,
                            where(self.settings),
                            response.status_code,
                        )
                    elif self.ledger is not None:
                        await _note(
                            f"the end of kernel {self.kernel_id}",
                            self.ledger.kernels_ended,
                            [self.kernel_id],
                        )
                self.kernel_id = None
        finally:
            await self.http.aclose()

    def delete_now(self) -> None:
        """Synchronous last resort at interpreter exit: ask the gateway to drop the kernel."""
        if self.kernel_id is None:
            return
        with contextlib.suppress(Exception):
            httpx.delete(
                f"{self.settings.gateway_url}/api/kernels/{quote(self.kernel_id)}",
                headers=_headers(self.settings),
                timeout=3,
            )
        self.kernel_id = None

    def kernel_log(self, limit: int = 2000) -> str:
        return ""  # the kernel's stderr is in the gateway's log

    def exit_status(self) -> str:
        gone = self.channels.gone if self.channels is not None else ""
        return f"the kernel on the gateway ended ({gone or 'its connection was lost'})"

    def kill_now(self) -> None:
        self.delete_now()


class GatewayBackend:
    """Kernels from AUTOCODER_GATEWAY_URL. It serves AUTOCODER_GATEWAY_KERNEL, a Python kernel:
    other languages stay local."""

    name = "gateway"
    local_workdir = False

    def why_not(self, language: Language, settings: Settings) -> str | None:
        if not settings.gateway_url:
            return "no AUTOCODER_GATEWAY_URL"
        if not language.ipykernel:
            return f"the gateway serves {settings.gateway_kernel}, a Python kernel"
        return None

    def check(self, settings: Settings) -> None:
        check(settings)

    async def probe(self, settings: Settings) -> str | None:
        return await probe(settings)

    async def reclaim(self, settings: Settings, kernel_ids: list[str]) -> list[str]:
        return await reclaim(settings, kernel_ids)

    def new(self, request: KernelRequest) -> _RemoteKernel:
        return _RemoteKernel(request.settings, request.ledger)
