"""The small process that stays beside a kernel that is not ipykernel, inside its sandbox.

The launcher runs this file's source with `python -I -S -c` (the sandbox does not see
autocoder's package), so it imports nothing but the standard library. It:

- forwards interrupts: every byte read on `--interrupt-fd` (written by the resident launcher
  outside the sandbox when Jupyter sends SIGINT) and every SIGINT it gets itself becomes a
  SIGINT to the kernel's process group, as a terminal's Ctrl-C would;
- relays TCP to IPC (`--relay`): a kernel that only speaks TCP (Deno's) gets a copy of the
  connection file naming loopback ports, and each IPC socket the original file names is
  served here and relayed byte for byte to the matching port, so the network stays cut;
- watches the lifeline (`--lifeline`): when the server that started the kernel is gone, the
  kernel goes too;
- exits with the kernel's status, and takes the kernel with it when it is stopped.
"""

import argparse
import asyncio
import contextlib
import ctypes
import functools
import json
import os
import select
import signal
import socket
import stat
import subprocess
from typing import Any

CONNECT_TIMEOUT = 60.0
PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_connection_file(path: str) -> tuple[str, dict[str, tuple[str, int]]]:
    """A TCP twin of an IPC connection file, and which IPC socket relays to which port."""
    with open(path) as f:
        info = json.load(f)
    routes = {}
    twin = dict(info, transport="tcp", ip="127.0.0.1")
    for name in PORTS:
        port = _free_port()
        routes[f"{info['ip']}-{info[name]}"] = ("127.0.0.1", port)
        twin[name] = port
    out = path + ".tcp.json"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(twin, f)
    return out, routes


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _relay(
    target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One IPC connection, relayed to the kernel's TCP port (retried while the kernel starts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT
    while True:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
            break
        except OSError:
            if loop.time() > deadline:
                writer.close()
                return
            await asyncio.sleep(0.05)
    await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))


# The launcher outside the sandbox (sandbox.py) uses these two as well: they live here, where
# only the standard library may be imported.
def is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


async def supervise(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    argv = list(args.kernel)
    servers = []
    if args.relay:
        twin, routes = tcp_connection_file(args.relay)
        argv = [twin if a == args.relay else a for a in argv]
        for path, target in routes.items():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            servers.append(
                await asyncio.start_unix_server(functools.partial(_relay, target), path=path)
            )
    if args.lifeline is not None and not is_pipe(args.lifeline):
        args.lifeline = None  # started without the pipe: nothing to watch
    if args.lifeline is not None and select.select([args.lifeline], [], [], 0)[0]:
        return 1  # the server is already gone
    kernel = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
    done = asyncio.Event()

    def interrupt() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kernel.pid, signal.SIGINT)

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kernel.pid, signal.SIGKILL)
        done.set()

    def on_interrupt_fd() -> None:
        try:
            data = os.read(args.interrupt_fd, 64)
        except OSError:
            data = b""
        if data:
            interrupt()
        else:  # the launcher is gone
            loop.remove_reader(args.interrupt_fd)
            stop()

    def on_lifeline() -> None:
        loop.remove_reader(args.lifeline)
        stop()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGTERM, stop)
    if args.interrupt_fd is not None:
        loop.add_reader(args.interrupt_fd, on_interrupt_fd)
    if args.lifeline is not None:
        loop.add_reader(args.lifeline, on_lifeline)
    waiter: asyncio.Future[Any] = loop.run_in_executor(None, kernel.wait)
    stopper: asyncio.Future[Any] = asyncio.ensure_future(done.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    code = kernel.poll()
    if code is None:
        stop()
        code = await waiter
    for server in servers:
        server.close()
    return 128 - code if code < 0 else code


def main() -> None:
    p = argparse.ArgumentParser(prog="autocoder-supervisor")
    p.add_argument("--interrupt-fd", type=int)
    p.add_argument("--lifeline", type=int)
    p.add_argument("--relay", metavar="CONNECTION_FILE")
    p.add_argument("kernel", nargs="+")
    args = p.parse_args()
    os._exit(asyncio.run(supervise(args)))


if __name__ == "__main__":
    main()
