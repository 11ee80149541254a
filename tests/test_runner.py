"""The engine's story: a prompt goes to the model, the code runs in a real kernel, failures retry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from autocoder.records import ErrorKind, Event
from autocoder.runner import Runner
from autocoder.testing import Reply, ScriptedLLM, fenced

pytestmark = pytest.mark.timeout(120)

FIB = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nprint(fib(10))"


async def test_success_on_the_first_attempt(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(fenced(FIB))
    result = await runner.run(
        "Write a function that returns the n-th Fibonacci number and print fib(10)"
    )

    assert result.status == "success"
    assert result.output == "55\n"
    assert result.error == ""
    assert result.code.strip() == FIB
    assert len(result.attempts) == 1
    assert Path(result.filename).read_text() == result.code
    assert Path(result.filename).name == "generated_code_1.py"
    assert Path(result.filename).parent.name == result.run_id
    # Named after the prompt, and a path a reader finds from anywhere.
    notebook = Path(result.notebook)
    assert notebook.is_absolute() and Path(result.filename).is_absolute()
    stamp, short_id = result.run_id[:15], result.run_id[16:]
    assert notebook.name == (
        f"{stamp}-write-a-function-that-returns-the-n-th-fibonacci-{short_id}.ipynb"
    )
    nb = nbformat.read(result.notebook, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.metadata.autocoder.run_id == result.run_id
    assert nb.metadata.autocoder.status == "success"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells[-1].outputs[0]["text"] == "55\n"
    assert code_cells[-1].metadata.autocoder.attempt == 1
    # The model was told the code runs in a fresh kernel and that stdout is the answer.
    system = llm.requests[0]["messages"][0]["content"]
    assert "fresh" in system and "print" in system


async def test_a_traceback_goes_back_to_the_model(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(fenced("x = [1, 2]\nprint(sum(x) / 0)"), fenced("print(3 / 1)"))
    result = await runner.run("divide")

    assert result.status == "success"
    assert result.output == "3.0\n"
    first, second = result.attempts
    assert first.error_kind is ErrorKind.EXCEPTION
    assert first.ename == "ZeroDivisionError"
    sent = json.dumps(llm.requests[1]["messages"])
    assert "ZeroDivisionError: division by zero" in sent
    assert "print(sum(x) / 0)" in sent
    assert "\\u001b[" not in sent
    assert Path(first.filename).name == "generated_code_1.py"
    assert Path(result.filename).name == "generated_code_2.py"


NO_SOURCE = "Could not get source"


async def test_a_traceback_through_pandas_carries_no_could_not_get_source_lines(
    runner: Runner, llm: ScriptedLLM
) -> None:
    """IPython stands that line in for each compiled (Cython) frame: it says nothing, so
    neither the page (the outputs), the notebook nor the model gets it; the frames stay."""
    pytest.importorskip("pandas")
    llm.script(
        fenced("import pandas as pd\ndf = pd.DataFrame({'a': [1]})\nprint(df['b'])"),
        fenced("print('no b')"),
    )
    result = await runner.run("print column b")

    first = result.attempts[0]
    assert first.ename == "KeyError" and "KeyError: 'b'" in first.error
    assert "index.pyx" in first.error  # the compiled frame is still named
    assert NO_SOURCE not in first.error
    assert NO_SOURCE not in json.dumps(first.outputs)
    assert NO_SOURCE not in json.dumps(llm.requests[1]["messages"])
    assert NO_SOURCE not in Path(result.notebook).read_text()


async def test_a_syntax_error_never_reaches_the_kernel(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(fenced("open('ran.txt', 'w').write('x')\nprint('oops'"), fenced("print('fixed')"))
    result = await runner.run("print something")

    first = result.attempts[0]
    assert first.error_kind is ErrorKind.SYNTAX
    assert first.exec_duration == 0.0
    assert "SyntaxError" in first.error
    assert "was never closed" in llm.requests[1]["messages"][-1]["content"]
    assert result.status == "success" and result.output == "fixed\n"
    assert not Path(result.workdir or "/nonexistent", "ran.txt").exists()


async def test_an_endless_loop_is_stopped_within_the_timeout(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(fenced("while True:\n    pass"), fenced("print('done')"))
    result = await runner.run("loop", timeout=2)

    first = result.attempts[0]
    assert first.error_kind is ErrorKind.TIMEOUT
    assert first.exec_duration < 2 + 10
    assert "timed out after 2 s" in llm.requests[1]["messages"][-1]["content"]
    assert result.status == "success" and result.output == "done\n"


async def test_code_that_swallows_interrupts_is_stopped_by_a_restart(
    runner: Runner, llm: ScriptedLLM
) -> None:
    stubborn = (
        "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
        "    except KeyboardInterrupt:\n        pass"
    )
    llm.script(fenced(stubborn), fenced("print('recovered')"))
    result = await runner.run("loop forever", timeout=2)

    assert result.attempts[0].error_kind is ErrorKind.TIMEOUT
    assert result.status == "success" and result.output == "recovered\n"


async def test_a_dying_kernel_is_reported_and_replaced(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(fenced("import os\nos._exit(1)"), fenced("print('alive')"))
    result = await runner.run("exit")

    first = result.attempts[0]
    assert first.error_kind is ErrorKind.KERNEL_DIED
    assert "kernel died" in llm.requests[1]["messages"][-1]["content"]
    assert result.status == "success" and result.output == "alive\n"


async def test_a_50_mb_print_is_cut_without_harm(
    runner: Runner, llm: ScriptedLLM, settings
) -> None:  # type: ignore[no-untyped-def]
    llm.script(fenced("print('A' * 50_000_000)\nprint('never')"), fenced("print('small')"))
    result = await runner.run("flood")

    first = result.attempts[0]
    assert first.error_kind is ErrorKind.OUTPUT_LIMIT
    assert first.truncated
    assert len(first.output) <= settings.max_output_bytes + 1000
    assert "bytes of output cut" in first.output
    assert result.status == "success"
    assert Path(result.notebook).stat().st_size < 3 * settings.max_output_bytes


async def test_every_attempt_failing_gives_an_error_result(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(*[fenced("raise ValueError('nope')")] * 3)
    result = await runner.run("fail", max_attempts=3)

    assert result.status == "error"
    assert len(result.attempts) == 3
    assert result.error_kind is ErrorKind.EXCEPTION
    assert "ValueError: nope" in result.error
    assert Path(result.filename).name == "generated_code_3.py"
    assert nbformat.read(result.notebook, as_version=4).metadata.autocoder.status == "error"


async def test_a_reply_without_code_is_an_empty_attempt(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script("I am not able to do that, but here is some advice instead.", fenced("print(1)"))
    result = await runner.run("x")

    assert result.attempts[0].error_kind is ErrorKind.EMPTY
    assert "no Python code" in llm.requests[1]["messages"][-1]["content"]
    assert result.status == "success"
    nbformat.validate(nbformat.read(result.notebook, as_version=4))


async def test_each_attempt_starts_from_a_clean_namespace(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(
        fenced("leftover = 42\nraise RuntimeError('first')"),
        fenced("print(leftover)"),
        fenced("print('clean')"),
    )
    result = await runner.run("x")

    assert result.attempts[1].ename == "NameError"
    assert result.output == "clean\n"


async def test_nothing_an_attempt_leaves_reaches_the_next(runner: Runner, llm: ScriptedLLM) -> None:
    """Not its results as IPython caches them, nor a name it rebound; asserts still explain."""
    llm.script(
        fenced("import json, sys\nsys.displayhook('attempt 1')\nget_ipython = None\nraise OSError"),
        fenced(
            "print('attempt 1' in globals().values(), len(Out), 'json' in dir(), get_ipython is None)\nassert 1 + 1 == 3"
        ),
    )
    result = await runner.run("x", max_attempts=2)

    first, second = result.attempts
    assert first.output == "'attempt 1'\n" and first.ename == "OSError"
    assert second.output == "False 0 False False\n"
    assert "1 + 1 is 2, but the assert expects 3" in second.error


async def test_files_the_code_writes_stay_with_the_run(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(fenced("open('answer.txt', 'w').write('42')\nprint('written')"))
    result = await runner.run("write a file")

    assert Path(result.workdir, "answer.txt").read_text() == "42"
    assert Path(result.workdir).parent.name == result.run_id


async def test_rich_outputs_are_recorded(runner: Runner, llm: ScriptedLLM) -> None:
    code = (
        "from IPython.display import HTML, display\n"
        "display(HTML('<b>bold</b>'))\n"
        "import sys\nprint('to stderr', file=sys.stderr)\n"
        "6 * 7"
    )
    llm.script(fenced(code))
    result = await runner.run("rich")

    assert result.status == "success"
    kinds = [o["output_type"] for o in result.attempts[0].outputs]
    assert kinds == ["display_data", "stream", "execute_result"]
    assert result.attempts[0].outputs[0]["data"]["text/html"] == "<b>bold</b>"
    assert result.attempts[0].stderr == "to stderr\n"
    assert result.output.endswith("42\n")


async def test_the_model_endpoint_down_ends_the_run_with_an_error(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(Reply(status=500, content="overloaded"))
    result = await runner.run("anything")

    assert result.status == "error"
    assert result.error_kind is ErrorKind.LLM
    assert "HTTP 500" in result.error
    assert Path(result.notebook).exists()


async def test_events_tell_the_story_of_a_run(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(fenced("1/0"), fenced("print('ok')"))
    events: list[Event] = []
    await runner.run("x", on_event=events.append)

    types = [e.type for e in events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert types.count("attempt_started") == 2
    assert types.count("attempt_finished") == 2
    assert "output" in types


async def test_the_notebook_re_executes_with_nbclient(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(
        fenced("1/0"),
        fenced("import json, decimal\nprint(json.dumps({'v': str(decimal.Decimal('0.1') * 3)}))"),
    )
    result = await runner.run("x")

    nb = nbformat.read(result.notebook, as_version=4)
    client = NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=False)
    await client.async_execute()
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert last.outputs[0]["text"] == '{"v": "0.3"}\n'


async def test_a_failing_assert_says_what_the_values_were(runner: Runner, llm: ScriptedLLM) -> None:
    wrong = "def double(x):\n    return x * 3\n\nfor n, want in [(1, 2), (2, 4)]:\n    assert double(n) == want"
    right = "def double(x):\n    return x * 2\n\nassert double(2) == 4\nprint(double(21))"
    llm.script(fenced(wrong), fenced(right))
    result = await runner.run("write double(x) and check it")

    assert result.status == "success"
    assert result.output == "42\n"
    first = result.attempts[0]
    assert first.ename == "AssertionError"
    assert "double(n) is 3, but want is 2 (where n = 1)" in first.error
    assert "double(n) is 3, but want is 2 (where n = 1)" in json.dumps(llm.requests[1])
    # What is saved is the code the model wrote, not the rewritten one.
    assert Path(first.filename).read_text().strip() == wrong


async def test_asserts_inside_functions_keep_their_own_behaviour(
    runner: Runner, llm: ScriptedLLM
) -> None:
    code = (
        "def check(x):\n    assert x > 0\n    return x\n\n"
        "try:\n    check(-1)\nexcept AssertionError as e:\n    print(repr(str(e)))"
    )
    llm.script(fenced(code))
    result = await runner.run("show an empty assertion message")

    assert result.status == "success"
    assert result.output == "''\n"


async def test_a_retry_that_drops_every_check_is_not_a_success(
    runner: Runner, llm: ScriptedLLM
) -> None:
    checked = "def inc(x):\n    return x + 2\n\nassert inc(1) == 2"
    unchecked = "def inc(x):\n    return x + 2\n\nprint(inc(1))"
    fixed = "def inc(x):\n    return x + 1\n\nassert inc(1) == 2\nprint(inc(1))"
    llm.script(fenced(checked), fenced(unchecked), fenced(fixed))
    result = await runner.run("write inc(x) and check it", max_attempts=3)

    assert result.status == "success"
    assert result.output == "2\n"
    kinds = [a.error_kind for a in result.attempts]
    assert kinds == [ErrorKind.EXCEPTION, ErrorKind.UNCHECKED, None]
    second = result.attempts[1]
    assert second.output == "3\n"
    assert "attempt 1's assert failed" in second.error
    told = llm.requests[2]["messages"][-1]["content"]
    assert "no longer checks anything" in told
    assert "inc(1) is 3, but the assert expects 2" in told
    nb = nbformat.read(result.notebook, as_version=4)
    history = [c for c in nb.cells if c.metadata.get("autocoder", {}).get("status") == "error"]
    assert [c.cell_type for c in history] == ["markdown", "markdown"]
    assert history[1].metadata.autocoder.error_kind == "unchecked"
    assert [c.source for c in nb.cells if c.cell_type == "code"] == [fixed]


async def test_dropping_checks_on_the_last_attempt_ends_in_an_error(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(fenced("assert 1 + 1 == 3"), fenced("print(1 + 1)"))
    result = await runner.run("add and check", max_attempts=2)

    assert result.status == "error"
    assert result.error_kind is ErrorKind.UNCHECKED
    assert result.output == "2\n"
    assert "no asserts left" in result.error


@pytest.mark.parametrize(
    "story",
    ["success", "retried", "timeout", "failed"],
)
async def test_run_all_runs_only_the_answer(runner: Runner, llm: ScriptedLLM, story: str) -> None:
    """nbclient executes every cell, honouring no skip tags, as JupyterLab's Run All does."""
    scripts = {
        "success": [fenced("print('answer')")],
        "retried": [fenced("1/0"), fenced("print('answer')")],
        "timeout": [fenced("while True: pass"), fenced("while True: pass")],
        "failed": [fenced("1/0"), fenced("raise ValueError('nope')")],
    }[story]
    llm.script(*scripts)
    result = await runner.run(f"tell a {story} story", max_attempts=2, timeout=1.0)

    nb = nbformat.read(result.notebook, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    code = [c for c in nb.cells if c.cell_type == "code"]
    client = NotebookClient(nb, timeout=20, kernel_name="python3", allow_errors=False)
    if result.status == "success":
        assert [c.source for c in code] == [result.code.rstrip("\n")]
        assert code[0].execution_count == 1
        language_info = dict(nb.metadata.language_info)
        await client.async_execute()
        assert code[0].outputs[0]["text"] == result.output == "answer\n"
        # What the kernel reports about itself was there already: opening and running the
        # notebook leaves it unmodified (JupyterLab shows no unsaved changes).
        assert nb.metadata.language_info == language_info
        assert_prompt_numbers_agree(nb)
    else:
        assert len(code) == 1 and code[0].source.startswith("raise RuntimeError(")
        with pytest.raises(CellExecutionError, match="failed"):
            await client.async_execute()
    summary = nb.cells[0].source
    assert summary.startswith(f"# tell a {story} story")
    if story == "timeout":
        assert "stopped after 1 s (timeout)" in summary
        assert "KeyboardInterrupt" not in nbformat.writes(nb).split("<details>")[0]


def assert_prompt_numbers_agree(nb: nbformat.NotebookNode) -> None:
    """No `[ ]:` with outputs, and no `Out[n]` under another `In[m]`."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs:
            assert cell.execution_count is not None, cell.source
        for out in cell.outputs:
            if out.output_type == "execute_result":
                assert out.execution_count == cell.execution_count, cell.source


async def test_prompt_numbers_agree_after_a_retry(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(fenced("1/0"), fenced("print('shown')\n6 * 7"))
    result = await runner.run("retry then answer")

    nb = nbformat.read(result.notebook, as_version=4)
    assert_prompt_numbers_agree(nb)
    (answer,) = [c for c in nb.cells if c.cell_type == "code"]
    assert answer.execution_count == 1
    assert [o.get("execution_count") for o in answer.outputs] == [None, 1]


async def test_a_deep_recursion_stays_a_short_notebook(runner: Runner, llm: ScriptedLLM) -> None:
    deep = (
        "def down(n):\n    if n == 0:\n        raise ValueError('bottom')\n"
        "    return down(n - 1)\n\ndown(970)"
    )
    llm.script(fenced(deep), fenced("print('flat')"))
    result = await runner.run("recurse", timeout=60)

    assert result.attempts[0].ename == "ValueError", result.attempts[0].error
    nb = nbformat.read(result.notebook, as_version=4)
    (history,) = [c for c in nb.cells if "<details>" in c.source]
    # Folded by the kernel's own traceback, or by the notebook: a few frames, not 970.
    assert re.search(r"skipping similar frames|more frames of the same recursion", history.source)
    assert history.source.count("in down(n)") < 10
    assert len(history.source.splitlines()) < 150
    assert "ValueError: bottom" in history.source
    assert_prompt_numbers_agree(nb)


async def test_the_reply_streams_as_token_events_before_its_code(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(fenced("print('written as it streams')"))
    events: list[Event] = []
    result = await runner.run("stream the reply", on_event=events.append)
    names = [e.type for e in events]
    tokens = [e for e in events if e.type == "token"]
    assert len(tokens) > 3 and all(e.attempt == 1 for e in tokens)
    assert names.index("attempt_started") < names.index("token") < names.index("code_generated")
    assert max(i for i, n in enumerate(names) if n == "token") < names.index("code_generated")
    assert "".join(e.data["text"] for e in tokens) == result.attempts[0].reply
    assert result.attempts[0].tokens > 0 and result.output == "written as it streams\n"
    assert llm.requests[-1]["stream"] is True
    # Nobody listening: the model is asked for the whole reply at once.
    llm.script(fenced("print(1)"))
    await runner.run("no listener")
    assert "stream" not in llm.requests[-1]


async def test_a_timeout_is_no_keyboard_interrupt_and_no_frame_of_ours_reaches_anyone(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(
        fenced("print('spinning', flush=True)\nwhile True:\n    pass"),
        # Code that interrupts itself: its KeyboardInterrupt is its own error, and it is raised
        # from the output cap's signal handler inside the kernel, which must not show.
        fenced("import os, signal\nos.kill(os.getpid(), signal.SIGINT)"),
        fenced("print('done')"),
    )
    events: list[Event] = []
    result = await runner.run("spin", max_attempts=3, timeout=1, on_event=events.append)
    timed_out, interrupted, done = result.attempts
    assert timed_out.error_kind is ErrorKind.TIMEOUT and done.status == "success"
    # The interrupt that stopped the code at its time limit is ours: neither streamed nor kept.
    assert [e.data["output_type"] for e in events if e.type == "output" and e.attempt == 1] == [
        "stream"
    ]
    assert [o["output_type"] for o in timed_out.outputs] == ["stream"]
    assert interrupted.ename == "KeyboardInterrupt" and "os.kill" in interrupted.error
    seen = json.dumps([e.model_dump(mode="json") for e in events]) + result.model_dump_json()
    told = json.dumps(llm.requests)
    nb = Path(result.notebook).read_text()
    for text in (seen, told, nb):
        assert "<autocoder " not in text and "on_sigint" not in text and "SendGuard" not in text


def test_frames_of_autocoders_own_kernel_code_are_dropped_from_any_traceback() -> None:
    from autocoder.kernel.output import without_own_frames

    ipython = [
        "KeyboardInterrupt     Traceback (most recent call last)",
        "Cell In[1], line 2\n----> 2 os.kill(os.getpid(), signal.SIGINT)",
        "File \x1b[0;32m<autocoder output cap>:260\x1b[0m, in SendGuard.on_sigint(self)\n"
        "--> 260 raise KeyboardInterrupt",
        "KeyboardInterrupt: ",
    ]
    assert without_own_frames(ipython) == [ipython[0], ipython[1], ipython[3]]
    plain = (
        "Traceback (most recent call last):\n"
        '  File "<stdin>", line 1, in <module>\n'
        "    work()\n"
        '  File "<autocoder asserts>", line 40, in explain\n'
        "    raise AssertionError(message)\n"
        "AssertionError: f(3) is 4"
    )
    assert without_own_frames([plain]) == [
        "Traceback (most recent call last):\n"
        '  File "<stdin>", line 1, in <module>\n'
        "    work()\n"
        "AssertionError: f(3) is 4"
    ]
    # The syntax check's label for the user's own code is not a frame of ours.
    assert without_own_frames(['  File "<autocoder>", line 3']) == ['  File "<autocoder>", line 3']


async def test_a_retry_is_told_it_starts_from_scratch(runner: Runner, llm: ScriptedLLM) -> None:
    llm.script(
        fenced("import math\nx = 2\n1 / 0"), fenced("print(math.sqrt(x))"), fenced("print(1)")
    )
    await runner.run("x")

    said = llm.requests[1]["messages"][-1]["content"]
    assert "nothing the failed program defined or imported is kept" in said


async def test_the_same_error_twice_starts_afresh_from_the_task(
    runner: Runner, llm: ScriptedLLM
) -> None:
    """Another patch of a program that keeps failing the same way would likely fail again."""
    llm.script(
        fenced("print(total)"),
        fenced("print(total + 0)"),
        fenced("total = 3\nprint(total)"),
    )
    result = await runner.run("print the total")

    assert result.status == "success" and len(result.attempts) == 3
    third = llm.requests[2]
    assert [m["role"] for m in third["messages"]] == ["system", "user"]
    asked = third["messages"][-1]["content"]
    assert asked.startswith("print the total\n\n")
    assert "kept failing" in asked and "NameError: name 'total' is not defined" in asked
    assert "print(total + 0)" not in asked  # no earlier code to patch
    assert third["temperature"] > 0
