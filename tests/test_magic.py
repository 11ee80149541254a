"""`%autocoder` in a real kernel started by jupyter_client, and in a notebook run by nbclient.

The model is the scripted server on 127.0.0.1 (the kernel finds it through OPENAI_BASE_URL, as
a user's kernel would); everything else is real: the kernel, its namespace, its interrupts.

Run `python -m tests.test_magic` to execute notebooks/example_magic.ipynb again and save it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import SECRET

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "notebooks" / "example_magic.ipynb"
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]


def kernel_env(base_url: str, home: Path) -> dict[str, str]:
    """What a user's kernel would have: the endpoint in the environment, nothing else of ours
    (and a home of the test's own, where the magic remembers cells)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
    env.update(
        OPENAI_BASE_URL=base_url,
        OPENAI_API_KEY=SECRET,
        AUTOCODER_LLM_RETRIES="0",
        AUTOCODER_TIMEOUT="5",
        AUTOCODER_HOME=str(home),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


def kernel_manager(runtime: Path) -> KernelManager:
    """A python3 kernel whose connection file lives in /tmp/ac-*, where conftest looks for leaks."""
    return KernelManager(
        kernel_name="python3",
        transport="ipc",
        ip=str(runtime / "k"),
        connection_file=str(runtime / "kernel.json"),
    )


@dataclass
class Cell:
    """One executed cell: its execute_reply content and its outputs, display updates applied."""

    reply: dict[str, Any]
    outputs: list[dict[str, Any]]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.reply["status"] == "ok"

    @property
    def text(self) -> str:
        parts = []
        for out in self.outputs:
            if out["output_type"] == "stream":
                parts.append(out["text"])
            elif out["output_type"] == "error":
                parts.append(f"{out['ename']}: {out['evalue']}\n")
            else:
                parts.append(out["data"].get("text/plain", "") + "\n")
        return "".join(parts)

    @property
    def statuses(self) -> list[str]:
        return [
            out["data"]["text/plain"]
            for out in self.outputs
            if out["output_type"] == "display_data"
            and out["data"].get("text/plain", "").startswith("autocoder · ")
        ]

    @property
    def result(self) -> dict[str, Any]:
        results = [o for o in self.outputs if o["output_type"] == "execute_result"]
        assert results, f"no execute_result in {self.outputs}"
        return results[-1]["data"]


class Kernel:
    def __init__(self, km: KernelManager) -> None:
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=30)

    def run(self, code: str, timeout: float = 30, cell_id: str | None = None) -> Cell:
        """Execute `code` as a front end would; with `cell_id`, as JupyterLab sends a cell."""
        start = time.monotonic()
        deadline = start + timeout
        if cell_id is None:
            msg_id = self.kc.execute(code)
        else:
            content = {"code": code, "silent": False, "store_history": True}
            content.update(user_expressions={}, allow_stdin=False, stop_on_error=True)
            msg = self.kc.session.msg("execute_request", content, metadata={"cellId": cell_id})
            self.kc.shell_channel.send(msg)
            msg_id = msg["header"]["msg_id"]
        outputs: list[dict[str, Any]] = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "update_display_data":
                display_id = content["transient"]["display_id"]
                for out in outputs:
                    if out.get("display_id") == display_id:
                        out["data"] = content["data"]
            elif kind in {"stream", "display_data", "execute_result", "error"}:
                out = {"output_type": kind, **content}
                out["display_id"] = content.get("transient", {}).get("display_id")
                outputs.append(out)
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                return Cell(reply["content"], outputs, time.monotonic() - start)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="magic-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def kernel(llm_server: ScriptedLLM, workdir: Path) -> Iterator[Kernel]:
    """One kernel for the module (starting one costs a second or two); tests use own names."""
    runtime = Path(tempfile.mkdtemp(prefix="ac-"))
    km = kernel_manager(runtime)
    k: Kernel | None = None
    try:
        km.start_kernel(
            extra_arguments=KERNEL_ARGS,
            env=kernel_env(llm_server.base_url, runtime / "home"),
            cwd=str(workdir),
        )
        k = Kernel(km)
        assert k.run("%load_ext autocoder").ok
        yield k
    finally:
        if k is not None:
            k.close()
        elif km.has_kernel:
            km.shutdown_kernel(now=True)
        shutil.rmtree(runtime, ignore_errors=True)


def test_the_extension_only_registers_magics(kernel: Kernel) -> None:
    count_hooks = "sum(len(v) for v in get_ipython().events.callbacks.values())"
    before = kernel.run(count_hooks).result["text/plain"]
    assert kernel.run("%reload_ext autocoder").ok
    assert kernel.run(count_hooks).result["text/plain"] == before
    magics = kernel.run(
        "m = get_ipython().magics_manager.magics\n"
        "sorted(n for n in m['line'] if n.startswith('autocoder')), "
        "sorted(n for n in m['cell'] if n.startswith('autocoder'))"
    )
    assert magics.result["text/plain"] == "(['autocoder', 'autocoder_config'], ['autocoder'])"


def test_line_magic_runs_the_code_in_the_users_namespace(kernel: Kernel, llm: ScriptedLLM) -> None:
    code = "squares = [n * n for n in range(5)]\nprint('sum of squares:', sum(squares))"
    llm.script(fenced(code))
    cell = kernel.run("%autocoder make a list of the first five squares and print their sum")

    assert cell.ok, cell.text
    assert "sum of squares: 30\n" in cell.text
    assert cell.statuses == [
        "autocoder · attempt 1/5 ✓ succeeded in " + cell.statuses[0].split(" in ")[-1]
    ]
    # The final code in full is the cell's result, and the next cell's input.
    assert cell.result["text/plain"] == code
    assert cell.result["text/markdown"] == f"```python\n{code}\n```"
    assert cell.reply["payload"] == [{"source": "set_next_input", "text": code, "replace": False}]
    assert kernel.run("print(squares)").text == "[0, 1, 4, 9, 16]\n"


def test_cell_magic_with_options_shows_rich_output(kernel: Kernel, llm: ScriptedLLM) -> None:
    code = (
        "from IPython.display import HTML, display\n"
        "display(HTML('<table><tr><td>1</td><td>1</td></tr><tr><td>2</td><td>4</td></tr></table>'))\n"
        "print('shown')\n"
        "6 * 7"
    )
    llm.script(fenced(code))
    cell = kernel.run(
        "%%autocoder --attempts 2 --timeout 3 --model scripted-model\nshow a table\nof squares"
    )

    assert cell.ok, cell.text
    html = [o for o in cell.outputs if "text/html" in o.get("data", {})]
    assert html and "<td>4</td>" in html[0]["data"]["text/html"]
    assert "shown\n" in cell.text
    # The code's own last value is shown; the cell's one result (one Out[n]) is the code.
    values = [o["data"]["text/plain"] for o in cell.outputs if o["output_type"] == "execute_result"]
    assert values == [code]
    shown = [
        o["data"].get("text/plain") for o in cell.outputs if o["output_type"] == "display_data"
    ]
    assert "42" in shown
    assert cell.statuses[0].startswith("autocoder · attempt 1/2 ✓")
    request = llm.requests[0]
    assert request["model"] == "scripted-model"
    assert request["messages"][-1]["content"].endswith("show a table\nof squares")


def test_the_result_can_be_kept(kernel: Kernel, llm: ScriptedLLM) -> None:
    llm.script(fenced("answer = 6 * 7\nanswer"))
    cell = kernel.run("kept = %autocoder compute the answer")
    assert cell.ok, cell.text
    check = kernel.run("kept.value, kept.run.status, str(kept).strip(), answer")
    assert check.result["text/plain"] == "(42, 'success', 'answer = 6 * 7\\nanswer', 42)"


COUNTING = "ran = globals().get('ran', 0) + 1\nprint('ran', ran)"


def test_running_the_cell_again_asks_the_model_once(kernel: Kernel, llm: ScriptedLLM) -> None:
    """Run All in JupyterLab runs the magic cell again, and then the code it put below."""
    llm.script(fenced(COUNTING), fenced("print('a second reply')"))
    first = kernel.run("%autocoder count the runs, once")
    again = kernel.run("%autocoder count the runs, once")

    assert first.ok and again.ok, again.text
    assert len(llm.requests) == 1
    assert "ran 1\n" in first.text
    # Not run again, not inserted again: the cell below holds the code and runs it.
    assert "ran 1" not in again.text and "ran 2" not in again.text
    assert again.statuses == [
        "autocoder · this prompt's code is the one generated earlier in this session, "
        "not run again (--again asks the model anew)"
    ]
    assert first.reply["payload"] == [
        {"source": "set_next_input", "text": COUNTING, "replace": False}
    ]
    assert again.reply["payload"] == []
    # The same one result: the code, once.
    assert again.result == first.result
    assert [o["output_type"] for o in again.outputs].count("execute_result") == 1
    assert kernel.run("print(ran)").text == "1\n"


def test_again_asks_the_model_anew(kernel: Kernel, llm: ScriptedLLM) -> None:
    llm.script(fenced(COUNTING.replace("ran", "ran_again")), fenced("print('second', ran_again)"))
    first = kernel.run("%autocoder count these runs")
    again = kernel.run("%autocoder --again count these runs")

    assert first.ok and again.ok, again.text
    assert len(llm.requests) == 2
    assert "second 1\n" in again.text
    assert again.reply["payload"][0]["text"] == "print('second', ran_again)"


def test_restart_and_run_all_asks_the_model_once(kernel: Kernel, llm: ScriptedLLM) -> None:
    """JupyterLab sends each cell's id; the cell is remembered across a kernel restart, so the
    code is not asked for, nor put below, a second time."""
    prompt = "%autocoder say hello from a remembered cell"
    llm.script(fenced("print('hello')"), fenced("print('a second reply')"))
    first = kernel.run(prompt, cell_id="cell-7")
    assert first.ok, first.text
    assert first.reply["payload"][0]["text"] == "print('hello')"

    kernel.km.restart_kernel(now=True)
    kernel.kc.wait_for_ready(timeout=30)
    assert kernel.run("%load_ext autocoder").ok
    again = kernel.run(prompt, cell_id="cell-7")

    assert again.ok, again.text
    assert len(llm.requests) == 1
    assert again.reply["payload"] == []
    assert "hello" not in again.text
    assert again.statuses == [
        "autocoder · this cell's code was put in the cell below when it first ran; "
        "that cell runs it (--again asks the model anew)"
    ]
    # Another cell with the same prompt is a new cell: it asks.
    other = kernel.run(prompt, cell_id="cell-8")
    assert other.ok and len(llm.requests) == 2, other.text


def test_a_changed_prompt_asks_the_model_anew(kernel: Kernel, llm: ScriptedLLM) -> None:
    llm.script(fenced("print('tens')"), fenced("print('hundreds')"))
    first = kernel.run("%%autocoder\ncount in tens")
    changed = kernel.run("%%autocoder\ncount in hundreds")

    assert first.ok and changed.ok, changed.text
    assert len(llm.requests) == 2
    assert "tens\n" in first.text and "hundreds\n" in changed.text


def test_a_failed_run_is_not_remembered(kernel: Kernel, llm: ScriptedLLM) -> None:
    llm.script(fenced("print(never_defined)"), fenced("print('fixed later')"))
    failed = kernel.run("%autocoder --attempts 1 fail the first time")
    retried = kernel.run("%autocoder --attempts 1 fail the first time")

    assert failed.reply["ename"] == "RunFailed"
    assert retried.ok and "fixed later\n" in retried.text
    assert len(llm.requests) == 2


def test_a_name_error_is_fixed_with_an_existing_variable(kernel: Kernel, llm: ScriptedLLM) -> None:
    setup = kernel.run(
        "prices = [3, 4, 5]\nimport json\n_private = 1\ndef helper():\n    return 1\nclass Basket: pass"
    )
    assert setup.ok
    llm.script(fenced("print(sum(price))"), fenced("total = sum(prices)\nprint('total:', total)"))
    cell = kernel.run("%autocoder add up the prices")

    assert cell.ok, cell.text
    assert "total: 12\n" in cell.text
    first, second = cell.statuses
    assert first == "autocoder · attempt 1/5 ✗ NameError: name 'price' is not defined — retrying"
    assert second.startswith("autocoder · attempt 2/5 ✓")
    assert not [o for o in cell.outputs if o["output_type"] == "error"], "no traceback in the cell"
    # The model was told the names and types of what exists, and never the values.
    system, task = llm.requests[0]["messages"]
    assert "user's own IPython session" in system["content"]
    told = task["content"]
    for line in ("- prices: list, 3 items", "- helper: function", "- Basket: class"):
        assert line in told
    for absent in ("[3, 4, 5]", "json", "_private", "In:", "Out:", "get_ipython", "exit"):
        assert absent not in told
    assert told.endswith("Task:\nadd up the prices")
    assert "NameError: name 'price' is not defined" in json.dumps(llm.requests[1]["messages"])
    assert kernel.run("print(total)").text == "12\n"


def test_a_timeout_interrupts_only_the_generated_code(kernel: Kernel, llm: ScriptedLLM) -> None:
    assert kernel.run("keep = {'a': 1}").ok
    llm.script(
        fenced("import time\ntime.sleep(60)"),
        fenced("while True:\n    pass"),
        fenced("print('done', keep['a'])"),
    )
    cell = kernel.run("%autocoder --timeout 1 --attempts 3 wait for it")

    assert cell.ok, cell.text
    assert cell.seconds < 15
    assert [s.split(" ✗ ")[-1] for s in cell.statuses[:2]] == ["timed out after 1 s — retrying"] * 2
    assert "timed out after 1 s" in llm.requests[1]["messages"][-1]["content"]
    assert "done 1\n" in cell.text
    # The kernel, and the user's variables, survived both interrupts.
    assert kernel.run("print(keep)").text == "{'a': 1}\n"


def test_an_interrupt_from_the_user_stops_the_whole_run(kernel: Kernel, llm: ScriptedLLM) -> None:
    assert kernel.run("still_here = True").ok
    llm.script(fenced("import time\ntime.sleep(60)"), fenced("print('never')"))
    timer = threading.Timer(1.0, kernel.km.interrupt_kernel)
    timer.start()
    try:
        cell = kernel.run("%autocoder --timeout 30 wait a long time")
    finally:
        timer.cancel()

    assert cell.reply["status"] == "error" and cell.reply["ename"] == "KeyboardInterrupt"
    assert cell.seconds < 15
    assert len(llm.requests) == 1
    assert cell.statuses == ["autocoder · attempt 1/5 ✗ the run was cancelled"]
    assert kernel.run("print(still_here)").text == "True\n"


def test_an_output_flood_is_cut_and_kept_from_the_cell(kernel: Kernel, llm: ScriptedLLM) -> None:
    llm.script(fenced("print('x' * 3_000_000)\nprint('never')"), fenced("print('small')"))
    cell = kernel.run("%autocoder print a lot")

    assert cell.ok, cell.text[:300]
    assert "✗ output exceeded 1,000,000 bytes" in cell.statuses[0]
    assert len(cell.text) < 10_000 and "never" not in cell.text
    assert "small\n" in cell.text


def test_every_attempt_failing_fails_the_cell(kernel: Kernel, llm: ScriptedLLM) -> None:
    llm.script(fenced("print(undefined_one)"), fenced("print(undefined_two)"))
    cell = kernel.run("%autocoder --attempts 2 try something")

    assert cell.reply["status"] == "error" and cell.reply["ename"] == "RunFailed"
    assert cell.reply["traceback"][0] == (
        "RunFailed: no working code after 2 attempt(s): NameError: name 'undefined_two' is not defined"
    )
    assert "    print(undefined_two)" in cell.reply["traceback"]
    assert cell.reply["payload"] == []


def test_help_and_bad_input(kernel: Kernel, llm: ScriptedLLM) -> None:
    help_ = kernel.run("%autocoder --help")
    assert help_.ok
    assert help_.text.lstrip().startswith("%autocoder [-h] [--attempts N] [--timeout S]")
    assert "code that ignores KeyboardInterrupt" in help_.text
    assert kernel.run("%autocoder_config -h").text.lstrip().startswith("%autocoder_config [")

    for bad in (
        "%autocoder --attempts zero do it",
        "%autocoder --attempts 0 do it",
        "%autocoder --timeout -1 do it",
        "%autocoder --no-such-option do it",
        "%autocoder",
        "%%autocoder --attempts 2\n  ",
        "%autocoder_config --timeout nothing",
        "%autocoder_config --endpoint",
    ):
        cell = kernel.run(bad)
        assert cell.reply["status"] == "error" and cell.reply["ename"] == "UsageError", bad
    assert llm.requests == []


def test_config_shows_and_sets_the_session_settings(
    kernel: Kernel, llm: ScriptedLLM, llm_server: ScriptedLLM
) -> None:
    shown = kernel.run("%autocoder_config")
    assert shown.ok
    assert f"endpoint  {llm_server.base_url}" in shown.text
    assert "api key   set (OPENAI_API_KEY)" in shown.text
    assert "timeout   5 s per attempt" in shown.text  # AUTOCODER_TIMEOUT in the kernel's env
    assert SECRET not in shown.text

    try:
        changed = kernel.run("%autocoder_config --attempts 1 --timeout 2.5 --model scripted-model")
        assert "attempts  1\n" in changed.text and "timeout   2.5 s" in changed.text
        assert "model     scripted-model" in changed.text
        llm.script(fenced("print(not_defined)"), fenced("print('unused')"))
        failed = kernel.run("%autocoder fail once")
        assert failed.reply["ename"] == "RunFailed"
        assert failed.statuses == [
            "autocoder · attempt 1/1 ✗ NameError: name 'not_defined' is not defined"
        ]
        assert len(llm.requests) == 1
    finally:
        reset = kernel.run("%autocoder_config --reset")
    assert "attempts  5\n" in reset.text


def test_record_saves_the_run_as_a_notebook(
    kernel: Kernel, llm: ScriptedLLM, workdir: Path
) -> None:
    llm.script(fenced("recorded = 'yes'\nprint(recorded)"))
    cell = kernel.run("%autocoder --record record this")

    assert cell.ok, cell.text
    saved = Path(cell.statuses[-1].removeprefix("autocoder · recorded in "))
    assert saved.is_absolute() and saved.parent == (workdir / "notebooks").resolve()
    assert saved.name.endswith(".ipynb") and "-record-this-" in saved.name
    nb = nbformat.read(saved, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.autocoder.status == "success"
    # Titled after what the user typed, not the session's names the model was also told.
    assert nb.metadata.autocoder.prompt == "record this"
    assert nb.cells[0].source.startswith("# record this\n")
    code_cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert code_cell.outputs[0]["text"] == "yes\n"


# --- The example notebook ---------------------------------------------------------------------

EXAMPLE_REPLIES = [
    # %autocoder total the amount per region ...
    fenced(
        "totals = {}\n"
        "for row in sales:\n"
        "    totals[row['region']] = totals.get(row['region'], 0) + row['amount']\n"
        "for region, amount in sorted(totals.items(), key=lambda kv: kv[1], reverse=True):\n"
        "    print(f'{region:<6} {amount:8.2f}')"
    ),
    # %%autocoder draw a sine wave: the first reply forgets an import, the second fixes it.
    fenced(
        "points = [(x, 50 - 40 * math.sin(x / 20)) for x in range(0, 301, 5)]\nprint(len(points))"
    ),
    fenced(
        "import math\n"
        "from IPython.display import SVG, display\n\n"
        "points = ' '.join(f'{x},{50 - 40 * math.sin(x / 20):.1f}' for x in range(0, 301, 5))\n"
        "display(SVG(\n"
        '    \'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="100">\'\n'
        '    \'<line x1="0" y1="50" x2="300" y2="50" stroke="#ccc"/>\'\n'
        '    f\'<polyline points="{points}" fill="none" stroke="steelblue" stroke-width="2"/>\'\n'
        "    '</svg>'\n"
        "))"
    ),
    # best = %autocoder the region with the largest total
    fenced("max(totals, key=totals.get)"),
    # %autocoder --timeout 1 ...: the first reply waits forever, the second does not.
    fenced("import time\ntime.sleep(30)\nprint('the service answered')"),
    fenced("print('no service needed:', len(totals), 'regions in totals')"),
]


def execute_example(llm_server: ScriptedLLM, workdir: Path) -> nbformat.NotebookNode:
    """Run notebooks/example_magic.ipynb with nbclient against the scripted model."""
    llm_server.script(*EXAMPLE_REPLIES)
    nb = nbformat.read(EXAMPLE, as_version=4)
    runtime = Path(tempfile.mkdtemp(prefix="ac-"))
    km = kernel_manager(runtime)
    client = NotebookClient(
        nb,
        km=km,
        timeout=60,
        extra_arguments=KERNEL_ARGS,
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute(env=kernel_env(llm_server.base_url, runtime / "home"), cwd=str(workdir))
    finally:
        # nbclient leaves a kernel manager it was handed to its owner.
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        shutil.rmtree(runtime, ignore_errors=True)
    assert not llm_server.replies, "the notebook asked the model fewer times than scripted"
    return nb


def test_the_example_notebook_executes(llm_server: ScriptedLLM, workdir: Path) -> None:
    nb = execute_example(llm_server, workdir)

    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]

    def text(cell: Any) -> str:
        return "".join(
            o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs
        )

    by_source = {c.source.strip().splitlines()[0]: c for c in cells}
    assert "north    162.25" in text(
        by_source["%autocoder total the amount per region in sales, largest first"]
    )
    sine = by_source["%%autocoder --attempts 3"]
    assert any("image/svg+xml" in o.get("data", {}) for o in sine.outputs)
    assert "✗ NameError: name 'math' is not defined — retrying" in text(sine)
    assert "'north'" in text(by_source["best = %autocoder the region with the largest total"])
    assert "('north', 'success', 1)" in text(
        by_source["best.value, best.run.status, len(best.run.attempts)"]
    )
    slow = by_source[
        "%autocoder --timeout 1 --attempts 2 call the slow service, then count the regions"
    ]
    assert "timed out after 1 s" in text(slow) and "no service needed: 3 regions" in text(slow)

    # The notebook in the repository was saved with its outputs, from a run like this one.
    saved = [c for c in nbformat.read(EXAMPLE, as_version=4).cells if c.cell_type == "code"]
    assert [c.source for c in saved] == [c.source for c in cells]
    assert all(c.outputs for c in saved if "autocoder" in c.source and "load_ext" not in c.source)


def main() -> None:
    """Execute the example notebook against the scripted model and save it with its outputs."""
    server = ScriptedLLM().start()
    workdir = Path(tempfile.mkdtemp(prefix="magic-"))
    try:
        nb = execute_example(server, workdir)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    nbformat.write(nb, EXAMPLE)
    print(f"wrote {EXAMPLE}", file=sys.stderr)


if __name__ == "__main__":
    main()


def test_loading_the_extension_imports_no_kernel_client_model_client_or_validator() -> None:
    """`%load_ext autocoder` costs about what IPython's own start does: the model's client is
    imported when the first prompt is asked, and the magic never starts a kernel of its own."""
    heavy = ("jupyter_client", "zmq", "fastapi", "uvicorn", "openai", "nbformat", "jsonschema")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, autocoder.magic\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) & set(heavy) == set()
