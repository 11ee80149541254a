"""The zygote's launcher (outside the sandbox): bind to the server, then exec bwrap around
the zygote's source (`inside/zygote.py`). `kernel.fork.Zygote` runs it as
`python -m autocoder.sandbox.zygote`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from autocoder import sandbox
from autocoder.inside import zygote

# The zygote's parameters and its source come through a pipe, not its command line, and
# bwrap's arguments too (--args): no process of the zygote names a run's dirs.
_BOOT = (
    "import json, os, sys\n"
    "fd = int(sys.argv[1]); data = b''\n"
    "while chunk := os.read(fd, 65536):\n"
    "    data += chunk\n"
    "os.close(fd)\n"
    "params, source = data.split(b'\\n', 1)\n"
    "zygote = {'__name__': 'autocoder_zygote'}\n"
    "exec(compile(source, 'autocoder/inside/zygote.py', 'exec'), zygote)\n"
    "zygote['serve'](**json.loads(params))\n"
)


def main(argv: list[str] | None = None) -> None:
    """The zygote's launcher (outside the sandbox): bind to the server, then exec bwrap."""
    sandbox.bind_to_parent()
    args = sys.argv[1:] if argv is None else argv
    directory, roots = args[0], json.loads(args[1])
    allow_network = "--network" in args[2:]
    lifeline = os.environ.get(sandbox.LIFELINE_VAR, "")
    if not lifeline.isdigit():
        sys.exit("autocoder.sandbox.zygote: no lifeline; start the zygote through Zygote")
    with open(zygote.__file__, encoding="utf-8") as f:
        source = f.read()
    params = json.dumps(
        {
            "directory": directory,
            "roots": roots,
            "lifeline": int(lifeline),
            "kernel_args": sandbox.BWRAP_KERNEL_ARGS,
        }
    )
    fds = [
        sandbox.data_fd(params + "\n" + source),
        sandbox.data_fd(sandbox.passwd_text(0)),
        sandbox.data_fd(sandbox.group_text(0)),
    ]
    a = ["--die-with-parent", "--new-session"]
    a += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox"]
    a += ["--unshare-cgroup-try"]
    if not allow_network:
        a += ["--unshare-net"]
    a += ["--cap-drop", "ALL"]
    for cap in (
        "CAP_SYS_ADMIN",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_NET_ADMIN",
        "CAP_SYS_CHROOT",  # setns() into a mount namespace: the kernel into its init's
    ):
        a += ["--cap-add", cap]
    a += sandbox.system_mounts(allow_network)
    a += sandbox.parent_dirs(Path(sandbox.SANDBOX_HOME))
    for path, mode in (("/tmp", "1777"), ("/dev/shm", "1777"), (sandbox.SANDBOX_HOME, "0700")):
        a += ["--perms", mode, "--size", str(1 << 20), "--tmpfs", path]
    a += sandbox.ro_bind_args(sandbox.python_dirs(None))
    for root in roots:
        a += sandbox.parent_dirs(Path(root))
        a += ["--bind", root, root]
    for data_fd, name in zip(fds[1:], ("/etc/passwd", "/etc/group"), strict=True):
        a += ["--perms", "0644", "--ro-bind-data", str(data_fd), name]
    a += ["--remount-ro", "/", "--chdir", "/", "--clearenv"]
    for key, value in sandbox.inner_env().items():
        a += ["--setenv", key, value]
    a += ["--setenv", "PYDEVD_DISABLE_FILE_VALIDATION", "1"]  # debugpy, preloaded, warns otherwise
    options_fd = sandbox.data_fd("".join(arg + "\0" for arg in a))
    for fd in (*fds, options_fd):
        os.set_inheritable(fd, True)
    bwrap = shutil.which("bwrap") or "bwrap"
    command = [sys.executable, "-c", _BOOT, str(fds[0]), " " * zygote.TITLE_ROOM]
    os.execv(bwrap, [bwrap, "--args", str(options_fd), "--", *command])


if __name__ == "__main__":
    main()
