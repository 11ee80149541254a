"""The kernel provisioner autocoder's kernelspecs name, so any Jupyter server launches them safely.

A Jupyter server (Kernel Gateway, jupyter_server, Enterprise Gateway's local mode) starts every
kernel with its own runtime dir, TCP on loopback and its own environment passed through. For
autocoder's kernels that is unsafe: a kernel could read the others' connection files (their HMAC
keys) and the server's secrets in its environment, and the launcher would hand the server's own
runtime dir to a kernel's throwaway uid. This provisioner gives each kernel what `kernel.local`
gives it here: a runtime dir and a working dir of its own, IPC sockets inside that runtime
dir, and an environment built from scratch (`sandbox.kernel_env`) with the limits of the
AUTOCODER_* settings of the server's environment, each dir capped as a local kernel's is
(`disk`). Both go when the kernel is shut down.

A client may ask for tighter limits than the server's (`KERNEL_AUTOCODER_MEMORY_MB=512` in the
`env` of `POST /api/kernels`, as a gateway passes on `KERNEL_*` variables), never looser ones.

`kernel.local` makes those dirs itself (it places input files in the working dir and keeps
what the code wrote); the provisioner sees them already set and leaves them as they are.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import LocalProvisioner

from autocoder import disk, sandbox
from autocoder.config import Settings, load_settings
from autocoder.kernel.leftovers import RUNTIME_PREFIX, owner_tag, workdirs_root


class AutocoderProvisioner(LocalProvisioner):  # type: ignore[misc]
    """A LocalProvisioner whose kernels share nothing with the server or with each other."""

    made: list[Path] | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        env = kwargs.get("env") or {}
        given = env.get(sandbox.RUNTIME_DIR_VAR)
        # Only code in this process can set the manager's transport and connection file: a
        # client of the server can pass environment variables, never these.
        ours = (
            km is not None
            and km.transport == "ipc"
            and given is not None
            and Path(km.connection_file).parent == Path(given)
        )
        if km is not None and not ours:
            kwargs.update(self._own_dirs(km, env))
        return await super().pre_launch(**kwargs)  # type: ignore[no-any-return]

    def _own_dirs(self, km: Any, asked: dict[str, str]) -> dict[str, Any]:
        """A runtime and a working dir for this kernel (made once, kept across restarts)."""
        settings = load_settings(sandbox="bwrap" if "bwrap" in self.kernel_spec.argv else "none")
        settings = tightened(settings, asked)
        if self.made is None:
            runtime = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{owner_tag()}-"))
            workdir = (workdirs_root(settings) / f"{owner_tag()}-{uuid.uuid4().hex[:12]}").resolve()
            workdir.mkdir(parents=True, mode=0o700)
            # The same disk budgets as a local kernel's (they go with the kernel).
            disk.confine(runtime, disk.RUNTIME_DIR_BYTES)
            disk.confine_workdir(settings, workdir)
            self.made = [runtime, workdir]
        runtime, workdir = self.made
        km.transport = "ipc"
        km.cache_ports = False
        km.ip = str(runtime / "k")
        km.connection_file = str(runtime / "kernel.json")
        return {
            "env": sandbox.kernel_env(settings, workdir, runtime),
            "cwd": str(workdir),
            "pass_fds": (sandbox.lifeline(),),
        }

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart and self.made is not None:
            for d in self.made:
                disk.remove(d)
            self.made = None


TIGHTENABLE = (
    *("memory_mb", "cpu_seconds", "max_processes", "max_open_files", "max_file_mb"),
    "max_output_bytes",
)
ASKED_PREFIX = "KERNEL_AUTOCODER_"


def tightened(settings: Settings, asked: dict[str, str]) -> Settings:
    """`settings` with each limit a client asked for that is tighter (and valid: below a
    setting's floor the server's own holds)."""
    for name in TIGHTENABLE:
        value = asked.get(ASKED_PREFIX + name.upper(), "")
        if value.isdigit() and int(value) < getattr(settings, name):
            with contextlib.suppress(ValueError):
                settings = Settings.model_validate({**settings.model_dump(), name: int(value)})
    return settings
