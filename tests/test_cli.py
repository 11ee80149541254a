"""The command line as a user types it: `autocoder run "..."`, exit codes, --json, stdin."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import autocoder_cmd
from tests.processes import alive

pytestmark = pytest.mark.timeout(120)


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        autocoder_cmd() + args,
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_run_prints_code_output_and_where_the_notebook_went(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(
        fenced("print(1/0)"),
        fenced("def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\nprint(fib(10))"),
    )
    proc = run_cli(
        ["run", "Write a function that returns the n-th Fibonacci number and print fib(10)"],
        cli_env,
        tmp_path,
    )

    assert proc.returncode == 0, proc.stderr
    assert "def fib(n):" in proc.stdout
    assert "\n55\n" in proc.stdout
    notebook = next((tmp_path / "notebooks").glob("*.ipynb"))
    assert f"notebook: {notebook.resolve()}" in proc.stdout
    nbformat.validate(nbformat.read(notebook, as_version=4))
    assert "attempt 1: failed (exception: ZeroDivisionError)" in proc.stderr
    assert "attempt 2: succeeded" in proc.stderr
    run_id = next((tmp_path / "notebooks" / ".autocoder" / "records").glob("*.json")).stem
    assert notebook.name.endswith(
        f"-write-a-function-that-returns-the-n-th-fibonacci-{run_id[16:]}.ipynb"
    )
    assert (tmp_path / "autofile" / run_id / "generated_code_2.py").resolve().exists()


def test_a_plot_is_said_to_be_an_image_and_where_it_is(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A terminal shows no plot, and its text alone (`<Figure size 640x480 with 1 Axes>`)
    does not say one was made."""
    pytest.importorskip("matplotlib")
    llm.script(
        fenced("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()\nprint('plotted')")
    )
    proc = run_cli(["run", "plot the first three squares"], cli_env, tmp_path)

    assert proc.returncode == 0, proc.stderr
    notebook = next((tmp_path / "notebooks").glob("*.ipynb")).resolve()
    assert "<Figure size" not in proc.stdout
    shown = re.search(r"^\[image: PNG, (\d+)x(\d+) px, in the notebook (.+)\]$", proc.stdout, re.M)
    assert shown and shown[3] == str(notebook), proc.stdout
    assert int(shown[1]) > 100 and int(shown[2]) > 100  # the PNG's own size
    assert "plotted" in proc.stdout
    # --json stays the API's contract: the output as the kernel gave it.
    llm.script(fenced("import matplotlib.pyplot as plt\nplt.plot([1])\nplt.show()"))
    as_json = run_cli(["run", "--json", "plot one point"], cli_env, tmp_path)
    assert "<Figure size 640x480" in json.loads(as_json.stdout)["output"]


def test_a_fix_that_deletes_the_failing_check_is_reported_as_unchecked(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(fenced("assert sum([1, 2]) == 4"), fenced("print(sum([1, 2]))"))
    proc = run_cli(["run", "--attempts", "2", "add 1 and 2, and check it"], cli_env, tmp_path)

    assert proc.returncode == 1
    assert "attempt 1: failed (exception: AssertionError)" in proc.stderr
    assert "attempt 2: failed (unchecked: the code has no asserts left" in proc.stderr
    assert "\n3\n" in proc.stdout


def test_json_is_the_api_contract(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(fenced("print('hello')"))
    proc = run_cli(["run", "--json", "-q", "say hello"], cli_env, tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    data = json.loads(proc.stdout)
    assert {
        "status",
        "filename",
        "code",
        "output",
        "error",
        "run_id",
        "attempts",
        "notebook",
        "duration",
    } <= data.keys()
    assert data["status"] == "success" and data["output"] == "hello\n" and data["error"] == ""


def test_every_attempt_failing_exits_1(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(*[fenced("raise KeyError('missing')")] * 2)
    proc = run_cli(["run", "--attempts", "2", "fail please"], cli_env, tmp_path)

    assert proc.returncode == 1
    assert "KeyError: 'missing'" in proc.stdout


def test_the_prompt_can_come_from_stdin(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(fenced("print(2 + 3)"))
    proc = run_cli(["run"], cli_env, tmp_path, stdin="print the sum of 2 and 3\n")

    assert proc.returncode == 0, proc.stderr
    assert llm.requests[0]["messages"][1]["content"] == "print the sum of 2 and 3"


def test_an_empty_prompt_is_bad_usage(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(["run"], cli_env, tmp_path, stdin="")

    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "no prompt" in proc.stderr
    assert not (tmp_path / "notebooks").exists()


def test_an_unreachable_endpoint_is_one_line_naming_the_setting(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(cli_env, OPENAI_BASE_URL="http://127.0.0.1:9/v1", AUTOCODER_MODEL="m")
    proc = run_cli(["run", "anything"], env, tmp_path)

    assert proc.returncode == 2
    assert "OPENAI_BASE_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unknown_model_is_one_line_naming_the_setting(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    proc = run_cli(["run", "--model", "gpt-nonexistent", "anything"], cli_env, tmp_path)

    assert proc.returncode == 2
    assert "AUTOCODER_MODEL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_setting_is_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(["run", "x"], dict(cli_env, AUTOCODER_TIMEOUT="soon"), tmp_path)

    assert proc.returncode == 2
    assert "AUTOCODER_TIMEOUT" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_no_command_prints_help_and_exits_2(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli([], cli_env, tmp_path)

    assert proc.returncode == 2
    assert "run" in proc.stderr and "serve" in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_cli_leaves_no_kernel(
    signum: int, llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(fenced("import time\nprint('started', flush=True)\ntime.sleep(60)"))
    proc = subprocess.Popen(
        autocoder_cmd() + ["run", "--timeout", "60", "sleep"],
        env=cli_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "running" in line:
                break
        time.sleep(1.0)
        pids = kernel_pids_of(proc.pid)
        assert pids, "the run's kernel should be up"
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), f"kernel outlived the CLI after signal {signum}"
    if signum != signal.SIGKILL:
        assert proc.returncode != 0


def kernel_pids_of(parent: int) -> list[int]:
    """The processes started under `parent` (its kernels and their launchers)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [parent]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_with_no_prompt_it_asks_for_one(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """At a terminal, `autocoder run` alone asks for the prompt, as the original tool did."""
    import pty

    llm.script(fenced("print('asked')"))
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(tmp_path)
        os.execve(sys.executable, [*autocoder_cmd(), "run", "-q"], cli_env)
    seen = b""
    try:
        while b"prompt" not in seen:
            seen += os.read(fd, 1024)
        os.write(fd, b"say asked\n")
        deadline = time.monotonic() + 60
        while b"notebook:" not in seen and time.monotonic() < deadline:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode()
    assert b"Enter your prompt:" in seen
    assert llm.requests[0]["messages"][1]["content"] == "say asked"
    assert b"asked" in seen


def test_no_bubblewrap_is_one_line_before_anything_runs(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(cli_env, PATH=str(tmp_path / "empty-bin"), AUTOCODER_SANDBOX="bwrap")
    proc = run_cli(["run", "anything"], env, tmp_path)

    assert proc.returncode == 2
    assert "sandbox unavailable" in proc.stderr and "AUTOCODER_SANDBOX=none" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert llm.requests == []


def run_cli_bytes(
    args: list[str | bytes], env: dict[str, str], cwd: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    """The CLI given bytes as a user's shell can: argv and stdin that need not be UTF-8."""
    proc = subprocess.run(
        autocoder_cmd() + args, env=env, cwd=cwd, input=stdin, capture_output=True, timeout=90
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *says: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for text in says:
        assert text in proc.stderr


@pytest.mark.parametrize(
    "flag, where",
    [
        ("--notebooks-dir", "a-file"),
        ("--notebooks-dir", "a-file/notebooks"),
        ("--autofile-dir", "a-file"),
        ("--autofile-dir", "a-file/deeper/autofile"),
    ],
)
def test_a_directory_that_cannot_be_written_is_one_line_before_anything_runs(
    flag: str, where: str, llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A path that is a file, or under one, fails for root too: found before the code runs."""
    (tmp_path / "a-file").write_text("not a directory")
    llm.script(fenced("print('ran')"))
    proc = run_cli(["run", flag, str(tmp_path / where), "say ran"], cli_env, tmp_path)

    assert_one_line(proc, repr(str(tmp_path / where)), "not a directory")
    assert llm.requests == []
    assert (tmp_path / "a-file").read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_notebooks_dir_is_one_line_before_anything_runs(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    llm.script(fenced("print('ran')"))
    try:
        proc = run_cli(["run", "--notebooks-dir", str(locked), "say ran"], cli_env, tmp_path)
    finally:
        locked.chmod(0o700)

    assert_one_line(proc, repr(str(locked)), "Permission denied")
    assert llm.requests == []


def test_serve_with_a_notebooks_dir_under_a_file_exits_2_at_start(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    for name in ("AUTOCODER_NOTEBOOKS_DIR", "AUTOCODER_AUTOFILE_DIR"):
        env = dict(cli_env, AUTOCODER_PORT="0", AUTOCODER_POOL_SIZE="0")
        env[name] = str(tmp_path / "a-file" / "runs")
        proc = subprocess.run(
            autocoder_cmd() + ["serve"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert_one_line(proc, name, "is a file")


def test_a_prompt_that_is_not_utf8_is_one_line(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Latin-1 bytes from an old file or terminal, in argv and on stdin."""
    llm.script(fenced("print('ran')"))
    in_argv = run_cli_bytes(["run", b"caf\xe9 au lait"], cli_env, tmp_path)
    on_stdin = run_cli_bytes(["run"], cli_env, tmp_path, stdin=b"caf\xe9 au lait\n")

    for proc in (in_argv, on_stdin):
        assert_one_line(proc, "not valid UTF-8")
    assert llm.requests == []


@pytest.mark.parametrize(
    "args, env",
    [
        (["--timeout", "inf"], {}),
        (["--timeout", "nan"], {}),
        (["--timeout", "0"], {}),
        ([], {"AUTOCODER_TIMEOUT": "inf"}),
        ([], {"AUTOCODER_TIMEOUT": "-inf"}),
        ([], {"AUTOCODER_LLM_TIMEOUT": "inf"}),
        ([], {"AUTOCODER_QUEUE_TIMEOUT": "Infinity"}),
        ([], {"AUTOCODER_SHUTDOWN_GRACE": "inf"}),
        ([], {"AUTOCODER_MAX_REQUEST_TIMEOUT": "inf"}),
        # Limits too large for setrlimit and bwrap were a misleading "sandbox unavailable".
        ([], {"AUTOCODER_MEMORY_MB": "99999999999999"}),
        ([], {"AUTOCODER_CPU_SECONDS": "99999999999999999999"}),
    ],
)
def test_no_deadline_or_limit_can_be_infinite(
    args: list[str], env: dict[str, str], llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """inf would mean no deadline at all, and nan passes every comparison with a limit."""
    llm.script(fenced("print('ran')"))
    proc = run_cli(["run", *args, "say ran"], dict(cli_env, **env), tmp_path)

    named = args[0] if args else next(iter(env))
    assert_one_line(proc, named)
    assert llm.requests == []


def test_serve_refuses_an_infinite_timeout_at_start(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(cli_env, AUTOCODER_PORT="0", AUTOCODER_POOL_SIZE="0", AUTOCODER_QUEUE_TIMEOUT="inf")
    proc = subprocess.run(
        autocoder_cmd() + ["serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line(proc, "AUTOCODER_QUEUE_TIMEOUT", "finite")


def test_a_mistyped_flag_is_one_line_that_points_to_help(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    for args in (
        ["run", "--attempts", "many", "x"],
        ["run", "--sandbox", "docker", "x"],
        ["model"],
    ):
        proc = run_cli(args, cli_env, tmp_path)
        assert_one_line(proc, "--help")


def test_model_info_on_a_file_it_cannot_read_is_one_line(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    # A regular file that no one, root included, can read from the start.
    env = dict(cli_env, AUTOCODER_MODEL_PATH="/proc/self/mem", AUTOCODER_HOME=str(tmp_path))
    proc = run_cli(["model", "info"], env, tmp_path)

    assert_one_line(proc, "AUTOCODER_MODEL_PATH", "/proc/self/mem")


def test_a_notebooks_dir_named_in_latin1_is_one_line_before_anything_runs(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The run record is JSON, which cannot name that directory."""
    llm.script(fenced("print('ran')"))
    notebooks = os.fsencode(tmp_path) + b"/caf\xe9"
    proc = run_cli_bytes(["run", "--notebooks-dir", notebooks, "say ran"], cli_env, tmp_path)

    assert_one_line(proc, "AUTOCODER_NOTEBOOKS_DIR", "not valid UTF-8")
    assert llm.requests == []


def test_a_file_named_in_latin1_is_one_line_before_anything_runs(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / os.fsdecode(b"caf\xe9.csv")).write_text("a,b\n1,2\n")
    llm.script(fenced("print('ran')"))
    proc = run_cli_bytes(["run", "--file", b"caf\xe9.csv", "sum it"], cli_env, tmp_path)

    assert_one_line(proc, "not valid UTF-8")
    assert llm.requests == []


def test_an_embedded_model_home_under_a_file_is_one_line(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in cli_env.items() if not k.startswith("OPENAI_")}
    env["AUTOCODER_HOME"] = str(tmp_path / "a-file" / "home")
    for args in (["run", "say hi"], ["model", "serve", "--port", "9"]):
        proc = run_cli(args, env, tmp_path)
        assert_one_line(proc, "AUTOCODER_HOME", "is a file")


def test_installing_the_kernelspecs_into_a_file_is_one_line(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    proc = run_cli(["kernels", "install", "--prefix", str(tmp_path / "a-file")], cli_env, tmp_path)

    assert_one_line(proc, "cannot install the kernelspecs", "a-file")


def test_a_flag_or_variable_that_is_not_utf8_is_one_line_naming_it(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(fenced("print('ran')"))
    as_flag = run_cli_bytes(["run", "--model", b"caf\xe9", "say ran"], cli_env, tmp_path)
    env = dict(cli_env)
    env_bytes = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    env_bytes[b"AUTOCODER_MODEL"] = b"caf\xe9"
    in_env = subprocess.run(
        autocoder_cmd() + ["run", "say ran"], env=env_bytes, cwd=tmp_path, capture_output=True
    )

    assert_one_line(as_flag, "--model", "not valid UTF-8")
    assert in_env.returncode == 2
    assert (
        in_env.stderr.decode().strip()
        == "autocoder: error: AUTOCODER_MODEL: Value error, not valid UTF-8"
    )
    assert llm.requests == []


def test_a_reader_that_goes_away_ends_the_cli_quietly(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """`autocoder run --json ... | head -c 10`: no traceback once head has what it wants."""
    llm.script(fenced("print('ran')"))
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            autocoder_cmd() + ["run", "--json", "-q", "say ran"],
            env=cli_env,
            cwd=tmp_path,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=90,
        )
    finally:
        os.close(write)

    assert proc.stderr == ""
    assert proc.returncode == 128 + signal.SIGPIPE
    assert len(list((tmp_path / "notebooks").glob("*.ipynb"))) == 1


HEAVY = ("jupyter_client", "zmq", "fastapi", "uvicorn", "openai", "nbformat", "jsonschema")

# The command run as `python -m autocoder ...`, saying at exit which of HEAVY it imported.
IMPORTED_AT_EXIT = f"""
import atexit, json, runpy, sys
heavy = {HEAVY!r}
atexit.register(
    lambda: print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy))),
                  file=sys.stderr)
)
sys.argv = ["autocoder", *sys.argv[1:]]
runpy.run_module("autocoder", run_name="__main__")
"""


def imported(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTED_AT_EXIT, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return proc.returncode, json.loads(proc.stderr.strip().splitlines()[-1])


def test_help_answers_without_the_kernel_the_web_or_the_model_libraries(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """`autocoder --help` is as quick as Python's own start allows: none of what serves,
    runs kernels or asks the model is imported to print it."""
    code, heavy = imported(["--help"], cli_env, tmp_path)

    assert code == 0
    assert heavy == []


def test_a_one_shot_run_never_imports_the_web_server_or_the_notebook_validator(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Its notebook is written without nbformat (whose validator compiles a grammar at import),
    and still validates."""
    llm.script(fenced("print('hello')"))
    code, heavy = imported(["run", "--json", "-q", "say hello"], cli_env, tmp_path)

    assert code == 0
    assert heavy == ["jupyter_client", "openai", "zmq"]
    notebook = next((tmp_path / "notebooks").glob("*.ipynb"))
    nbformat.validate(nbformat.read(notebook, as_version=4))


def test_a_one_shot_run_names_its_model_as_it_starts(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(fenced("print('hello')"))
    proc = run_cli(["run", "say hello"], cli_env, tmp_path)

    assert proc.returncode == 0, proc.stderr
    said = proc.stderr.splitlines()
    assert said[:2] == [
        "autocoder: using the openai model scripted-model",
        "autocoder: attempt 1/5: generating…",
    ]
