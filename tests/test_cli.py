"""The command line as a user types it: `autocoder run "..."`, exit codes, --json, stdin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import autocoder_cmd

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
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), f"kernel outlived the CLI after signal {signum}"
    if signum != signal.SIGKILL:
        assert proc.returncode != 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


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
