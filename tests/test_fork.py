"""Kernels forked from a zygote: as fresh and as confined as exec'd ones, and as well supervised.

Real forked kernels under the real sandbox; every test skips, with the reason, where kernels
cannot be forked here (not root, no bubblewrap).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from autocoder import languages, sandbox
from autocoder.config import Settings
from autocoder.errors import SandboxUnavailable
from autocoder.kernel import fork as forkserver
from autocoder.kernel.client import Kernel
from autocoder.kernel.pool import new_kernel
from autocoder.records import ErrorKind
from tests.processes import alive, processes_naming
from tests.venvs import venv_importing_ours

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fork_settings(settings: Settings) -> Settings:
    forked = settings.model_copy(update={"kernel_start": "fork", "sandbox": "bwrap"})
    try:
        sandbox.check_available(forked)
    except SandboxUnavailable as e:
        pytest.skip(str(e))
    reason = forkserver.why_not(forked)
    if reason is not None:
        pytest.skip(reason)
    return forked


@pytest.fixture
async def zygote(fork_settings: Settings) -> forkserver.Zygote:
    """The zygote, listening: until it does, kernels are exec'd."""
    zygote = forkserver.zygote_for(fork_settings)
    await zygote.ready()
    return zygote


@pytest.fixture
async def kernel(fork_settings: Settings, zygote: forkserver.Zygote) -> AsyncIterator[Kernel]:
    async with new_kernel(fork_settings) as k:
        assert isinstance(process_of(k), forkserver.ForkedProcess)
        yield k


def process_of(k: Kernel) -> Any:
    """The kernel's process handle: a ForkedProcess when forked, a Popen when exec'd."""
    return getattr(getattr(k.km.manager, "provisioner", None), "process", None)  # type: ignore[union-attr]


async def value(k: Kernel, code: str) -> object:
    done = await k.execute(textwrap.dedent(code), timeout=20)
    assert done.kind is None, done
    return json.loads(done.stdout.strip().splitlines()[-1])


PROBE = """
import json, os, random, tempfile
from ipykernel.kernelapp import IPKernelApp
ip = get_ipython()
seen = [
    os.path.exists("/tmp/mine"),
    os.path.exists("mine.txt"),
    "secret" in globals(),
    "mine" in ip.magics_manager.magics["line"],
]
secret = random.random()
open("/tmp/mine", "w").write("x")
open("mine.txt", "w").write("x")
ip.register_magic_function(lambda line: line, magic_name="mine")
own = [ip.kernel is IPKernelApp.instance().kernel, ip.starting_dir, [str(d) for d in _dh]]
print(json.dumps([seen, secret, os.getcwd(), sorted(os.listdir("/proc/1/task")), own]))
"""


@pytest.mark.timeout(120)
async def test_two_forked_kernels_share_nothing(
    fork_settings: Settings, zygote: forkserver.Zygote
) -> None:
    results: list[Any] = []
    inits: list[int] = []
    for _ in range(2):
        async with new_kernel(fork_settings) as k:
            assert isinstance(process_of(k), forkserver.ForkedProcess)
            inits.append(process_of(k).pid)
            results.append(await value(k, PROBE))
    (seen_a, random_a, cwd_a, _, own_a), (seen_b, random_b, cwd_b, _, own_b) = results
    # Nor does what one does to its shell (a magic registered) reach the next.
    assert seen_a == seen_b == [False, False, False, False]
    # The shell each kernel takes from the zygote is its own: its kernel, its directory.
    assert own_a == [True, cwd_a, [cwd_a]] and own_b == [True, cwd_b, [cwd_b]]
    assert random_a != random_b
    assert cwd_a != cwd_b
    assert inits[0] != inits[1]


DATA_STACK_PROBE = """
import json, random, sys
preloaded = [m in sys.modules for m in ("numpy", "pandas", "matplotlib.pyplot")]
import numpy as np
import matplotlib as mpl
import matplotlib.pyplot as plt
import pandas as pd
seen = [plt.get_fignums(), mpl.rcParams["lines.linewidth"], pd.get_option("display.max_rows")]
plt.figure()
mpl.rcParams["lines.linewidth"] = 7.5
pd.set_option("display.max_rows", 3)
print(json.dumps([preloaded, seen, np.random.rand(3).tolist(), random.random()]))
"""


@pytest.mark.timeout(120)
async def test_forked_kernels_start_with_the_data_stack_and_their_own_random_state(
    fork_settings: Settings, zygote: forkserver.Zygote
) -> None:
    """numpy, pandas and pyplot are loaded before a run's first cell, and yet no two kernels
    draw the same random numbers or see each other's figures, rcParams or pandas options."""
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    results: list[Any] = []
    for _ in range(2):
        async with new_kernel(fork_settings) as k:
            assert isinstance(process_of(k), forkserver.ForkedProcess)
            results.append(await value(k, DATA_STACK_PROBE))
    (preloaded_a, seen_a, numpy_a, random_a), (preloaded_b, seen_b, numpy_b, random_b) = results
    assert preloaded_a == preloaded_b == [True, True, True]
    assert seen_a == seen_b  # the second kernel starts as the first did
    assert seen_b[0] == [] and seen_b[1] != 7.5 and seen_b[2] != 3
    assert numpy_a != numpy_b
    assert random_a != random_b


@pytest.mark.timeout(120)
async def test_a_plot_in_a_forked_kernel_fits_in_a_3_s_timeout(kernel: Kernel) -> None:
    pytest.importorskip("matplotlib")
    done = await kernel.execute(
        "import matplotlib.pyplot as plt\nimport pandas as pd\n"
        "pd.Series([1, 4, 9]).plot()\nplt.title('squares')\nplt.show()",
        timeout=3,
    )
    assert done.kind is None, done
    assert any("image/png" in out.get("data", {}) for out in done.outputs), done.outputs


@pytest.mark.timeout(120)
async def test_with_the_zygote_up_another_language_still_gets_its_own_kernel(
    fork_settings: Settings, zygote: forkserver.Zygote
) -> None:
    """The zygote is an IPython kernel: a Bash run must not be handed a forked Python one."""
    if not any(f.language == "bash" and f.available for f in languages.availability(fork_settings)):
        pytest.skip("the Bash kernel is not installed (./install.sh --languages)")
    async with new_kernel(fork_settings, language="bash") as k:
        assert not isinstance(process_of(k), forkserver.ForkedProcess)
        done = await k.execute('echo "$((6 * 7))"', timeout=20)
        assert done.kind is None and done.stdout.strip() == "42"


@pytest.mark.timeout(120)
async def test_a_forked_kernel_is_confined_as_an_exec_one(
    kernel: Kernel, fork_settings: Settings
) -> None:
    seen = await value(
        kernel,
        f"""
        import json, os, resource, socket
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", 1))
            net = "connected"
        except OSError as e:
            net = type(e).__name__
        print(json.dumps({{
            "uid": os.getuid(),
            "caps": status["CapEff"].strip(),
            "nnp": status["NoNewPrivs"].strip(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "env": sorted(os.environ),
            "net": net,
            "repo": os.path.exists({str(REPO / "autocoder")!r}),
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
            "as": resource.getrlimit(resource.RLIMIT_AS)[0],
            "home": os.listdir(os.path.expanduser("~")),
            "hostname": socket.gethostname(),
        }}))
        """,
    )
    assert isinstance(seen, dict)
    assert seen["uid"] >= sandbox.UID_BASE and seen["caps"] == "0000000000000000"
    assert seen["nnp"] == "1"
    assert seen["pids"][0] == 1 and len(seen["pids"]) < 5
    assert not {"OPENAI_API_KEY", "AUTOCODER_API_TOKEN"} & set(seen["env"])
    assert seen["net"] == "ConnectionRefusedError" and not seen["repo"]
    assert seen["nproc"] == fork_settings.max_processes
    assert seen["as"] == fork_settings.memory_mb * 2**20
    assert set(seen["home"]) <= {".ipython"} and seen["hostname"] == "sandbox"


@pytest.mark.timeout(120)
async def test_a_forked_kernel_is_interrupted_timed_out_and_replaced(kernel: Kernel) -> None:
    timed_out = await kernel.execute("import time\nwhile True: time.sleep(0.05)", timeout=1)
    assert timed_out.kind is ErrorKind.TIMEOUT and kernel.restarts == 0
    stubborn = (
        "while True:\n    try:\n        time.sleep(1)\n    except KeyboardInterrupt:\n        pass"
    )
    assert (await kernel.execute(stubborn, timeout=1)).kind is ErrorKind.TIMEOUT
    assert kernel.restarts == 1
    assert (await kernel.execute("print(6 * 7)", timeout=10)).stdout == "42\n"


@pytest.mark.timeout(120)
async def test_a_forked_kernel_says_how_it_died(kernel: Kernel) -> None:
    exited = await kernel.execute("import os; os._exit(3)", timeout=10)
    assert exited.kind is ErrorKind.KERNEL_DIED and exited.error is not None
    assert exited.error.evalue == "the kernel process exited with code 3"
    crashed = await kernel.execute("import ctypes; ctypes.string_at(0)", timeout=10)
    assert crashed.error is not None
    assert crashed.error.evalue == "the kernel process was killed by SIGSEGV"
    assert kernel.restarts == 2
    assert (await kernel.execute("print('back')", timeout=10)).stdout == "back\n"


@pytest.mark.timeout(120)
async def test_a_terminated_forked_kernel_ends_with_its_namespace(kernel: Kernel) -> None:
    """SIGTERM reaches the kernel's init (PID 1 of its namespace gets only the signals it
    handles) and ends it, with the kernel, as it ends an exec'd kernel's bwrap."""
    process = process_of(kernel)
    process.terminate()
    assert process.wait(10) == 128 + signal.SIGTERM
    assert not await kernel.is_alive()
    died = await kernel.execute("print('never')", timeout=10)
    assert died.kind is ErrorKind.KERNEL_DIED and kernel.restarts == 1
    assert (await kernel.execute("print('back')", timeout=10)).stdout == "back\n"


def status_field(pid: int, name: str) -> int:
    """A number of /proc/<pid>/status (VmSize in kB, PPid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(name)


@pytest.mark.timeout(120)
async def test_a_forked_kernels_init_is_no_copy_of_the_zygote(
    kernel: Kernel, zygote: forkserver.Zygote
) -> None:
    """The zygote's address space (IPython's, the data stack's) is copied into the kernel only:
    the init, which only builds namespaces and reaps, comes from a small process, and the
    kernel, in the init's namespaces, is the zygote's own child."""
    assert kernel.km is not None
    provisioner: Any = kernel.km.manager.provisioner  # type: ignore[attr-defined]
    init = provisioner.pid
    (pid,) = [p for p in forkserver._members(provisioner._cgroups) if p != init]
    assert status_field(init, "VmSize") * 4 < status_field(pid, "VmSize")
    assert status_field(pid, "PPid") != init
    assert status_field(status_field(pid, "PPid"), "PPid") != init
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{init}/ns/pid")
    assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{init}/ns/mnt")
    assert (await kernel.execute("print('served')", timeout=10)).stdout == "served\n"


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.timeout(120)
async def test_the_zygotes_heap_is_in_huge_pages_where_the_kernel_has_them(
    zygote: forkserver.Zygote,
) -> None:
    """Each kernel's fork copies, and its exit frees, the page tables of the zygote's
    anonymous memory: in 2 MiB pages there are 512 times fewer of them."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    if tuple(int(n) for n in os.uname().release.split(".")[:2] if n.isdigit()) < (6, 1):
        pytest.skip("MADV_COLLAPSE needs Linux 6.1")
    # bwrap, bwrap's child, then the zygote's python (its first child is the nursery).
    (inner,) = children(zygote.process.pid)
    (pid,) = children(inner)
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    huge_kib = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
    assert huge_kib >= 16 * 1024


@pytest.mark.timeout(120)
async def test_a_forked_kernel_has_the_debuggers_module_list_and_the_real_sys(
    kernel: Kernel,
) -> None:
    """The list IPythonKernel makes of the modules' files, for itself and its debugger, is the
    zygote's; the kernel's `sys` is the real one again once it is made."""
    real_sys, listed, count, same = await value(
        kernel,
        """
        import json, sys, ipykernel, ipykernel.ipkernel
        k = get_ipython().kernel
        files = k._kernel_modules
        print(json.dumps([
            ipykernel.ipkernel.sys is sys, ipykernel.__file__ in files, len(files),
            k.debugger.kernel_modules is files,
        ]))
        """,
    )
    assert real_sys is True and listed is True and same is True
    assert isinstance(count, int) and count > 300


@pytest.mark.timeout(120)
async def test_a_forked_kernel_makes_no_heartbeat_nobody_listens_to(kernel: Kernel) -> None:
    """The server's client opens no heartbeat channel: a forked kernel makes no heartbeat
    thread, nor the zmq context and its threads that went with it."""
    threads, tasks = await value(
        kernel,
        """
        import json, os, threading
        print(json.dumps([[t.name for t in threading.enumerate()], len(os.listdir("/proc/self/task"))]))
        """,
    )
    assert "Heartbeat" not in threads and {"IOPub", "Control"} <= set(threads)
    assert tasks <= 8  # main, IOPub, Control, Shell channel, zmq's two, the two fd watchers
    done = await kernel.execute("print('still answering')", timeout=20)
    assert done.stdout == "still answering\n"


@pytest.mark.timeout(120)
async def test_a_forked_kernel_imports_nothing_to_start(kernel: Kernel) -> None:
    """Every module a forked kernel has at its first cell the zygote had imported already:
    an import at start is the kernel's to pay in every run (pdb's were ~5 ms)."""
    imported = await value(
        kernel,
        """
        import json, sys
        zygotes = set(get_ipython().kernel._kernel_modules)  # the zygote's modules' files
        print(json.dumps(sorted(
            name for name, module in list(sys.modules.items())
            if isinstance(getattr(module, "__file__", None), str) and module.__file__ not in zygotes
        )))
        """,
    )
    assert imported == []


@pytest.mark.timeout(120)
async def test_storemagic_loaded_in_the_zygote_works_in_each_forked_kernel(
    kernel: Kernel, fork_settings: Settings, zygote: forkserver.Zygote
) -> None:
    """%store keeps a value in the kernel's own profile, in its private home: the next
    kernel, forked from the same zygote, has none of it."""
    stored = await kernel.execute(
        "plan = [1, 2]\n%store plan\ndel plan\n%store -r plan\nprint(plan)", timeout=20
    )
    assert stored.kind is None and stored.stdout.splitlines()[-1] == "[1, 2]", stored
    other = new_kernel(fork_settings)
    await other.start()
    try:
        seen = await other.execute("%store -r plan\nprint('plan' in globals())", timeout=20)
        assert seen.stdout.splitlines()[-1] == "False", seen
    finally:
        await other.shutdown()


HOME_TREE = """
import json, os, stat
home = os.path.expanduser("~")
tree = []
for here, dirs, files in os.walk(home):
    for name in dirs + files:
        path = os.path.join(here, name)
        st = os.stat(path)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        tree.append([os.path.relpath(path, home), oct(st.st_mode), st.st_uid == os.getuid(), size])
print(json.dumps(sorted(tree)))
"""


@pytest.mark.timeout(120)
async def test_a_forked_kernels_home_holds_the_profile_an_execd_kernels_does(
    kernel: Kernel, fork_settings: Settings
) -> None:
    """The profile dir the zygote built comes with the kernel; its dirs are made anew in the
    kernel's own home: the same names, modes and files as an exec'd kernel's, and its own."""
    forked = await value(kernel, HOME_TREE)
    async with new_kernel(fork_settings.model_copy(update={"kernel_start": "exec"})) as k:
        assert not isinstance(process_of(k), forkserver.ForkedProcess)
        execd = await value(k, HOME_TREE)
    assert forked == execd
    assert isinstance(forked, list) and all(own for _, _, own, _ in forked)
    assert [".ipython/profile_default/startup/README", "0o100644", True] in [
        entry[:3] for entry in forked
    ]


@pytest.mark.timeout(120)
async def test_reset_aggressive_in_a_forked_kernel_forgets_the_users_modules_only(
    kernel: Kernel,
) -> None:
    """The modules a kernel started with are the zygote's: %reset --aggressive drops what
    the user imported and keeps those."""
    kept = await value(
        kernel,
        """
        import json, sys, tabnanny
        get_ipython().run_line_magic("reset", "-f --aggressive")
        import json, sys
        print(json.dumps(["tabnanny" in sys.modules, "ipykernel" in sys.modules]))
        """,
    )
    assert kept == [False, True]


WRITERS = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        while True:
            with open(f"log-{os.getpid()}", "a") as f:
                f.write("x")
            time.sleep(0.001)
"""


@pytest.mark.timeout(120)
async def test_once_a_forked_kernel_is_ended_nothing_of_it_writes_any_more(
    kernel: Kernel,
) -> None:
    """A run takes what its code wrote once end_processes() returns: the writers the code
    left behind are gone by then, and the init said so itself (the kernel's status, not its
    own death) before its namespace was torn down."""
    assert (await kernel.execute(WRITERS, timeout=10)).kind is None
    assert kernel.workdir is not None and kernel.km is not None
    await asyncio.sleep(0.3)
    pids = forkserver._members(kernel.km.manager.provisioner._cgroups)  # type: ignore[union-attr]
    assert len(pids) == 5, "the init, the kernel and its three writers"
    process = process_of(kernel)
    await kernel.end_processes()
    assert not [pid for pid in pids if pid != process.pid and alive(pid)]
    assert process.returncode == 128 + signal.SIGKILL
    sizes = {p.name: p.stat().st_size for p in kernel.workdir.iterdir()}
    assert len(sizes) == 3 and all(sizes.values())
    await asyncio.sleep(0.3)
    assert {p.name: p.stat().st_size for p in kernel.workdir.iterdir()} == sizes


@pytest.mark.timeout(120)
async def test_an_ended_kernel_is_torn_down_without_talking_to_it(
    fork_settings: Settings, zygote: forkserver.Zygote
) -> None:
    """A run's kernel is ended by ending its processes; its teardown then sends it nothing
    (no interrupt to a kernel that is gone) and still leaves nothing: no process, cgroup,
    runtime dir or connection file."""
    k = new_kernel(fork_settings)
    await k.start()
    assert k.km is not None
    manager: Any = k.km.manager  # type: ignore[attr-defined]
    provisioner, runtime = manager.provisioner, k.km.runtime_dir  # type: ignore[attr-defined]
    cgroups, init = list(provisioner._cgroups), provisioner.pid
    assert cgroups and runtime is not None and runtime.is_dir()
    sent: list[str] = []
    send = manager.session.send
    manager.session.send = lambda stream, msg, *a, **kw: (
        sent.append(msg if isinstance(msg, str) else msg["header"]["msg_type"]),
        send(stream, msg, *a, **kw),
    )[1]
    await k.end_processes()
    await k.shutdown()
    assert sent == []
    assert not alive(init)
    assert not any(os.path.exists(c) for c in cgroups)
    assert not runtime.exists()


@pytest.mark.timeout(120)
async def test_a_zygote_killed_mid_run_is_replaced(
    kernel: Kernel, zygote: forkserver.Zygote
) -> None:
    starts = zygote.starts
    running = asyncio.create_task(kernel.execute("import time; time.sleep(30)", timeout=60))
    await asyncio.sleep(0.5)
    zygote.process.send_signal(signal.SIGKILL)
    died = await asyncio.wait_for(running, 30)
    assert died.kind is ErrorKind.KERNEL_DIED
    assert zygote.starts == starts + 1, "a new zygote is on its way"
    assert (await kernel.execute("print('fresh')", timeout=10)).stdout == "fresh\n"
    await zygote.ready()
    await kernel.replace()
    assert isinstance(process_of(kernel), forkserver.ForkedProcess)


FORKING_SERVER = """
import asyncio, sys
sys.path[:0] = [{repo!r}]
from autocoder.kernel import fork as forkserver
from autocoder.config import load_settings
from autocoder.kernel.client import Kernel
from autocoder.kernel.pool import new_kernel

async def main():
    settings = load_settings(sandbox="bwrap", kernel_start="fork", autofile_dir={work!r})
    await forkserver.zygote_for(settings).ready()
    async with new_kernel(settings) as k:
{body}
asyncio.run(main())
"""


def forking_server(tmp_path: Path, body: str) -> Path:
    """A script of a server whose zygote is up, running `body` with a forked kernel `k`."""
    script = tmp_path / "server.py"
    script.write_text(
        FORKING_SERVER.format(
            repo=str(REPO), work=str(tmp_path / "autofile"), body=textwrap.indent(body, " " * 8)
        )
    )
    return script


LEAVES_A_CHILD = """\
await k.execute("import os, time\\nif os.fork() == 0:\\n    os.setsid(); time.sleep(3600)", timeout=10)
zygote = forkserver.zygote_for(settings).process.pid
print(k.km.manager.provisioner.process.pid, zygote, flush=True)
await asyncio.sleep(3600)
"""


@pytest.mark.timeout(120)
def test_nothing_forked_outlives_a_killed_server(fork_settings: Settings, tmp_path: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))  # short: socket paths are bounded
    script = forking_server(tmp_path, LEAVES_A_CHILD)
    env = {**os.environ, "TMPDIR": str(tmp)}
    server = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert server.stdout is not None
        init, zygote = map(int, server.stdout.readline().split())
        assert len(processes_naming(str(tmp))) >= 2, "the kernel and its child"
        assert alive(init) and alive(zygote)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    deadline = time.monotonic() + 15
    while (
        processes_naming(str(tmp)) or alive(zygote) or alive(init)
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(str(tmp)) == []
    assert not alive(init) and not alive(zygote)


IMPORTS_FROM_THE_VENV = """\
done = await k.execute("import sys, venv_probe\\nprint(sys.prefix, venv_probe.WHERE)", timeout=20)
print(type(k.km.manager.provisioner.process).__name__, done.stdout.strip() or done.error, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_server_in_a_venv_under_tmp_forks_kernels_that_import_from_it(
    fork_settings: Settings, tmp_path: Path
) -> None:
    """A forked kernel's fresh /tmp must not hide the interpreter's own packages from it."""
    venv = Path(tempfile.mkdtemp(dir="/tmp")) / "venv"
    try:
        python = venv_importing_ours(venv)
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        Path(site, "venv_probe.py").write_text("WHERE = 'from the venv'\n")
        script = forking_server(tmp_path, IMPORTS_FROM_THE_VENV)
        done = subprocess.run(
            [python, str(script)], capture_output=True, text=True, timeout=90, check=False
        )
        assert done.stdout.strip() == f"ForkedProcess {venv} from the venv", done.stderr[-2000:]
    finally:
        shutil.rmtree(venv.parent, ignore_errors=True)


def test_where_kernels_cannot_be_forked_they_are_execd_and_one_line_says_why(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from autocoder import languages
    from autocoder.kernel.fork import ForkBackend

    def _fork_start(settings: Settings, language: languages.Language) -> bool:
        return ForkBackend().why_not(language, settings) is None

    python = languages.get("python")
    unconfined = settings.model_copy(update={"kernel_start": "fork", "sandbox": "none"})
    forkserver._exec_instead.cache_clear()  # said once per process: maybe already
    with caplog.at_level(logging.WARNING, logger="autocoder.kernel"):
        assert not _fork_start(unconfined, python)
        assert not _fork_start(unconfined, python)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["kernels start by exec, not fork: forked kernels need the bwrap sandbox"]
    assert not _fork_start(settings.model_copy(update={"kernel_start": "exec"}), python)


# The sandbox's own probes (tests/test_sandbox.py), unchanged, against a forked kernel.


@pytest.fixture
async def forked_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    from tests import test_sandbox as ts

    settings = ts.bwrap_settings().model_copy(
        update={"kernel_start": "fork", "autofile_dir": tmp_path / "autofile"}
    )
    if (reason := forkserver.why_not(settings)) is not None:
        pytest.skip(reason)
    # The server has secrets in its environment; the zygote and kernel must not.
    monkeypatch.setenv("OPENAI_API_KEY", ts.SECRET)
    monkeypatch.setenv("AUTOCODER_API_TOKEN", ts.SECRET)
    await forkserver.zygote_for(settings).ready()
    async with new_kernel(settings) as k:
        assert isinstance(process_of(k), forkserver.ForkedProcess)
        assert k.workdir is not None and k.km.runtime_dir is not None  # type: ignore[union-attr]
        yield ts.Box(k.km.manager, k.kc, k.workdir, k.km.runtime_dir)  # type: ignore[arg-type]


SANDBOX_PROBES = [
    "test_environment_has_no_secrets",
    "test_project_tree_and_home_are_read_only",
    "test_tmp_and_home_are_private",
    "test_rlimits_in_force",
    "test_process_limit_holds",
    "test_interrupt_by_message",
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("probe", SANDBOX_PROBES)
async def test_the_sandbox_probes_pass_against_a_forked_kernel(forked_box: Any, probe: str) -> None:
    from tests import test_sandbox as ts

    await getattr(ts, probe)(forked_box)


@pytest.mark.timeout(120)
async def test_a_forked_kernel_cannot_reach_the_host_loopback(forked_box: Any) -> None:
    from tests import test_sandbox as ts

    with contextlib.contextmanager(ts.listener.__wrapped__)() as srv:  # type: ignore[attr-defined]
        await ts.test_no_network_to_host_loopback(forked_box, srv)
