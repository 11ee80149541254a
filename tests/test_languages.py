"""A user asks for Bash, JavaScript/TypeScript (Deno) or R instead of Python.

Real kernels under the real sandbox, the scripted model. Per language: a success that sees
no network and no secret, whose notebook names that kernel and runs again under it; a
runtime error retried with its traceback after Python sent by mistake was caught by the
syntax check; an endless loop stopped by the timeout. Languages whose kernel is not
installed here are skipped (`./install.sh --languages` installs them all).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from autocoder import languages
from autocoder.config import Settings
from autocoder.kernel.client import Kernel
from autocoder.kernel.leftovers import sweep_leftovers
from autocoder.kernel.pool import KernelSource, new_kernel
from autocoder.records import ErrorKind
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM
from tests.conftest import SANDBOX, SECRET, LiveServer, autocoder_cmd

pytestmark = pytest.mark.timeout(240)


@dataclass
class Case:
    """What a user of one language would write, good and bad."""

    language: str
    fence: str
    confined: str  # prints key=<OPENAI_API_KEY or none> net=<yes|no>
    runtime_error: str
    error_says: str  # what the traceback sent back must contain
    fixed: str
    fixed_prints: str
    endless: str  # ignores interrupts where the language lets it


CASES = [
    Case(
        "bash",
        "bash",
        'echo "key=${OPENAI_API_KEY:-none}"\n'
        "if (exec 3<>/dev/tcp/1.1.1.1/80) 2>/dev/null; then echo net=yes; else echo net=no; fi",
        "cat missing.txt\necho never",
        "exit status 1",
        'printf "%s\\n" a b c | wc -l',
        "3",
        "trap '' INT\nwhile :; do :; done",
    ),
    Case(
        "typescript",
        "typescript",
        'const key: string = Deno.env.get("OPENAI_API_KEY") ?? "none";\n'
        'let net = "no";\n'
        "try {\n"
        '  const c = await Deno.connect({ hostname: "1.1.1.1", port: 80 });\n'
        '  c.close(); net = "yes";\n'
        "} catch { /* no network */ }\n"
        "console.log(`key=${key}`); console.log(`net=${net}`);",
        "const o: any = null;\nconsole.log(o.field);",
        "TypeError",
        "const xs: number[] = [1, 2];\nconsole.log(xs.length + 1);",
        "3",
        "while (true) {}",
    ),
    Case(
        "javascript",
        "js",
        'const key = Deno.env.get("OPENAI_API_KEY") ?? "none";\n'
        'let net = "no";\n'
        'try { (await Deno.connect({ hostname: "1.1.1.1", port: 80 })).close(); net = "yes"; }\n'
        "catch { /* no network */ }\n"
        "console.log(`key=${key}`); console.log(`net=${net}`);",
        'throw new RangeError("out of range");',
        "RangeError: out of range",
        "console.log([1, 2].length + 1);",
        "3",
        "for (;;) {}",
    ),
    Case(
        "r",
        "r",
        'key <- Sys.getenv("OPENAI_API_KEY", "none")\n'
        'if (key == "") key <- "none"\n'
        "net <- tryCatch({\n"
        '  con <- socketConnection("1.1.1.1", 80, timeout = 2); close(con); "yes"\n'
        '}, error = function(e) "no", warning = function(w) "no")\n'
        'cat(sprintf("key=%s\\nnet=%s\\n", key, net))',
        'f <- function() stop("no such column")\nf()',
        "no such column",
        'cat(length(c(1, 2)) + 1, "\\n")',
        "3",
        "repeat tryCatch(repeat {}, interrupt = function(e) NULL)",
    ),
]

# The kernels that ignore the interrupt above, and so are replaced (Deno's cannot: V8
# terminates the loop however it is written).
IGNORES_INTERRUPT = {"bash", "r"}


def reply(case: Case, code: str) -> str:
    return f"Here it is:\n\n```{case.fence}\n{code}\n```\n"


def _needs(case: Case, settings: Settings) -> None:
    for found in languages.availability(settings):
        if found.language == case.language and not found.available:
            pytest.skip(f"{case.language}: {found.reason}")


class Remembering(KernelSource):
    """Starts kernels on demand, as the runner's own provider does, and keeps them to look at."""

    def __init__(self, settings: Settings, language: str) -> None:
        super().__init__(settings, language)
        self.sessions: list[Kernel] = []

    async def acquire(self) -> Kernel:
        session = await super().acquire()
        self.sessions.append(session)
        return session


@pytest.fixture(params=CASES, ids=[c.language for c in CASES])
def case(request: pytest.FixtureRequest, settings: Settings) -> Case:
    c: Case = request.param
    _needs(c, settings)
    return c


async def test_a_success_is_confined_and_its_notebook_runs_again_under_that_kernel(
    case: Case, runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(reply(case, case.confined))
    result = await runner.run("is the sandbox tight?", language=case.language)
    assert result.status == "success", result.error
    assert result.language == case.language
    assert "key=none" in result.output and SECRET not in result.output
    if SANDBOX == "bwrap":
        assert "net=no" in result.output
    system = llm.requests[0]["messages"][0]["content"]
    assert languages.get(case.language).title in system
    assert result.filename.endswith(languages.get(case.language).suffix)

    nb = nbformat.read(result.notebook, as_version=4)
    lang = languages.get(case.language)
    assert nb.metadata.kernelspec["name"] == lang.kernelspec["name"]
    assert nb.metadata.kernelspec["language"] == lang.kernelspec["language"]
    assert nb.metadata.language_info["name"] == lang.language_info["name"]
    assert nb.metadata.autocoder["language"] == case.language
    try:
        KernelSpecManager().get_kernel_spec(lang.kernelspec["name"])
    except NoSuchKernel:
        pytest.skip(f"the {lang.kernelspec['name']} kernelspec is not installed for Jupyter")
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.source for c in code_cells] == [case.confined]
    # Deno publishes console output after its idle status (`late_output`); Jupyter's own
    # client, which stops listening at idle, then shows the cell without it now and again on a
    # loaded machine. The cell runs without error every time; its output shows in one of three.
    for _ in range(3 if lang.late_output else 1):
        NotebookClient(nb, timeout=60, allow_errors=False).execute()
        outputs = nb.cells[-1].outputs
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        if "key=" in text:
            break
    assert "key=" in text


async def test_wrong_language_is_caught_before_running_and_a_traceback_is_sent_back(
    case: Case, runner: Runner, llm: ScriptedLLM
) -> None:
    python = "def main():\n    print(sum([1, 2]))\n\nmain()"
    llm.script(
        reply(case, python).replace(f"```{case.fence}", "```python"),
        reply(case, case.runtime_error),
        reply(case, case.fixed),
    )
    result = await runner.run("count to three", language=case.language, max_attempts=3)
    first, second, third = result.attempts
    assert first.error_kind is ErrorKind.SYNTAX and first.exec_duration == 0
    assert second.error_kind is ErrorKind.EXCEPTION
    assert result.status == "success" and case.fixed_prints in result.output
    title = languages.get(case.language).title
    assert f"not valid {title}" in llm.requests[1]["messages"][-1]["content"]
    said = "\n".join(m["content"] for m in llm.requests[2]["messages"])
    assert case.error_says in said


async def test_an_endless_loop_is_stopped_by_the_timeout(
    case: Case, settings: Settings, runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(reply(case, case.endless), reply(case, case.fixed))
    provider = Remembering(settings, case.language)
    result = await runner.run(
        "loop", language=case.language, timeout=2, max_attempts=2, kernels=provider
    )
    first, second = result.attempts
    assert first.error_kind is ErrorKind.TIMEOUT
    assert result.status == "success" and case.fixed_prints in result.output
    (session,) = provider.sessions
    expected = 1 if case.language in IGNORES_INTERRUPT else 0
    # R's and Bash's retries reuse the kernel; Deno's reset is nothing; so restarts are the
    # escalation's own.
    assert session.restarts == expected


def test_an_unknown_or_missing_language_is_refused_naming_those_installed(
    settings: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    done = subprocess.run(
        [*autocoder_cmd(), "run", "--language", "cobol", "hello"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown language 'cobol'" in done.stderr and "python" in done.stderr
    only_python = subprocess.run(
        [*autocoder_cmd(), "run", "--language", "r", "hello"],
        env={**cli_env, "AUTOCODER_LANGUAGES": "python"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert only_python.returncode == 2 and "AUTOCODER_LANGUAGES" in only_python.stderr
    listed = subprocess.run(
        [*autocoder_cmd(), "kernels", "list"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and listed.stdout.startswith("python")
    for found in languages.availability(settings):
        assert found.language in listed.stdout

    with LiveServer(settings.model_copy(update={"pool_size": 0})) as live:
        langs = httpx.get(f"{live.url}/languages", timeout=30).json()
        assert {x["language"] for x in langs} == set(languages.NAMES)
        assert all(x["reason"] for x in langs if not x["available"])
        bad = httpx.post(f"{live.url}/run", json={"prompt": "hi", "language": "cobol"}, timeout=30)
        assert bad.status_code == 422
        assert "python" in bad.text and "cobol" in bad.text


def test_kernels_install_puts_what_notebooks_name_where_a_jupyter_outside_finds_it(
    case: Case, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A JupyterLab outside autocoder's environment reads the user's (or the system's) data
    dir, not the venv's: there it finds the notebook's kernelspec, and it runs the code."""
    data = tmp_path / "jupyter-data"
    done = subprocess.run(
        [*autocoder_cmd(), "kernels", "install", "--user", "--notebooks"],
        env={**cli_env, "JUPYTER_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    name = languages.get(case.language).kernelspec["name"]
    assert done.returncode == 0, done.stderr
    assert f"{name:<8} {data / 'kernels' / name}" in done.stdout.splitlines()
    assert "python3  not installed: each Jupyter has its own" in done.stdout

    # That Jupyter: only the user's data dir, and a PATH without this environment's bin.
    outside = KernelManager(
        kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(data / "kernels")])
    )
    lang = languages.get(case.language)
    # Deno prints after it says it is idle, which nbclient does not wait for: it writes instead.
    code = 'Deno.writeTextFileSync("printed", String(1 + 2))' if lang.late_output else case.fixed
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata.kernelspec = dict(lang.kernelspec)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    try:
        NotebookClient(nb, km=outside, timeout=60, startup_timeout=60).execute(
            env=env, cwd=tmp_path
        )
    finally:
        # nbclient leaves a kernel manager it was given running: later tests would find it.
        if outside.has_kernel:
            outside.shutdown_kernel(now=True)
    if lang.late_output:
        printed = (tmp_path / "printed").read_text()
    else:
        printed = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert printed.strip() == case.fixed_prints, nb.cells[0].outputs


@pytest.mark.parametrize("language", ["python", "r"])
async def test_a_sweep_by_another_autocoder_leaves_a_running_kernel_alone(
    settings: Settings, language: str
) -> None:
    """bwrap's child, and bwrap under a resident launcher (R's forwards interrupts), have a
    parent that is not the server: a sweep for what a dead server left must see them alive."""
    if language == "r":
        _needs(CASES[-1], settings)
    async with new_kernel(settings, language=language) as session:
        assert sweep_leftovers().processes == 0
        code = "print(1 + 1)" if language == "python" else "cat(1 + 1)"
        result = await session.execute(code, timeout=30)
        assert result.ok and result.text.strip() == "2"
