"""A prompt's own examples are checks: a program that runs cleanly but gets them wrong has failed.

The user who writes `longest(['a', 'bb']) should return 'bb'` has said what a right answer
does; a small model's function that returns 'a' runs cleanly, and its candidates may all agree
(a function prints nothing), so without the check the run would be a confident wrong answer.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest

from autocoder import examples
from autocoder.config import Settings
from autocoder.notebook import record_path
from autocoder.prompts import POLICIES
from autocoder.records import ErrorKind, RunResult
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer, autocoder_cmd
from tests.test_api import make_settings
from tests.test_candidates import by_candidate, seeds

pytestmark = pytest.mark.timeout(120)

LONGEST = """\
Write a Python function `longest(words)` that returns the longest of the words, the first one
when several are as long, and None for an empty list. For example:

    longest(['a', 'bb', 'cc']) should return 'bb'.
    longest([]) -> None
"""

FIRST = "def longest(words):\n    return words[0] if words else None\n"
RIGHT = "def longest(words):\n    return max(words, key=len) if words else None\n"


# --- What counts as an example ------------------------------------------------------------------


def test_examples_are_read_as_doctests_and_as_one_line_equations() -> None:
    prompt = '''
def add(a, b):
    """Add two numbers.
    >>> add(1, 2)
    3
    >>> add(-1, 1.5)
    0.5
    >>> add(2, 2) == 4
    True
    >>> nothing()

    >>> round(mean([1, 2]), 1)  # wrapped in a builtin that only computes
    1.5
    >>> count([]) == 0
    """
Also: add(10, 5) == 15, and
- is_even(4) => true
- is_even(3) ➞ False
words("a b") should return ["a", "b"].
'''
    found = [str(e) for e in examples.find(prompt)]
    assert found == [
        "add(1, 2) == 3",
        "add(-1, 1.5) == 0.5",
        "add(2, 2) == 4",
        "nothing() == None",  # doctest's blank result: the call returns None
        "round(mean([1, 2]), 1) == 1.5",
        "count([]) == 0",
        "add(10, 5) == 15",
        "is_even(4) == True",
        "is_even(3) == False",
        "words('a b') == ['a', 'b']",
    ]
    prose = "Write double(x): for example double(2) == 4 and double(-1) is -2."
    assert [str(e) for e in examples.find(prose)] == ["double(2) == 4", "double(-1) == -2"]


def test_only_what_can_be_checked_without_guessing_is_taken() -> None:
    prompt = """
The total is sum(values) = 10 for the sample data.
print(f(3)) == 9
f(x) == 9
f(3) -> 3 - 1 = 2
>>> f(1,
...   2)
3
>>> x = 5
fit(data) returns a trained model
step(1) is 1 of the steps
open('data.txt').read() == 'x'
f(g(1)) == 2
"""
    # A builtin, a non-literal argument or result, a statement, a call over several lines,
    # a call of two functions: none says what one call of the task's function returns.
    assert examples.find(prompt) == ()


def test_the_check_reports_what_came_back() -> None:
    found = examples.find(LONGEST)
    program = "print('other output')\n" + FIRST + examples.check_code(found)
    ran = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    result = examples.read(ran.stdout)
    assert result is not None and result.checked == 2
    assert examples.error(result) == (
        "The code ran, but 1 of the task's 2 examples does not hold:\n"
        "  longest(['a', 'bb', 'cc']) returned 'a', where the task says 'bb'"
    )
    assert examples.read("no report here") is None


# --- The engine ---------------------------------------------------------------------------------


async def test_a_function_that_gets_the_prompts_example_wrong_is_retried(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(fenced(FIRST), fenced("print('checking')\n" + RIGHT))
    result = await runner.run(LONGEST, candidates=1)

    assert result.status == "success", result.error
    first, second = result.attempts
    assert first.status == "error" and first.error_kind is ErrorKind.EXAMPLE
    assert "longest(['a', 'bb', 'cc']) returned 'a', where the task says 'bb'" in first.error
    # The retry was told which example failed and what came back.
    told = llm.requests[1]["messages"][-1]["content"]
    assert "returned 'a', where the task says 'bb'" in told
    assert second.examples == 2
    # The check's calls print nothing of their own: the output is the code's.
    assert result.output == "checking\n"

    record = RunResult.model_validate_json(
        record_path(runner.settings.notebooks_dir, result.run_id).read_text()
    )
    assert record.attempts[0].error_kind is ErrorKind.EXAMPLE and record.attempts[1].examples == 2
    nb = nbformat.read(result.notebook, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "the prompt's 2 examples hold" in text
    assert "failed (example)" in text


def test_the_cli_says_which_example_failed_and_that_the_next_held(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.script(fenced(FIRST), fenced(RIGHT))
    proc = subprocess.run(
        [*autocoder_cmd(), "run", "--candidates", "1", LONGEST],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "attempt 1: failed (example: The code ran, but 1 of the task's 2 examples" in proc.stderr
    assert "attempt 2: succeeded" in proc.stderr and "(the prompt's 2 examples hold)" in proc.stderr
    assert "\nthe prompt's 2 examples hold\n" in proc.stdout

    llm.script(*[fenced(FIRST)] * 2)
    proc = subprocess.run(
        [*autocoder_cmd(), "run", "--candidates", "1", "--attempts", "2", LONGEST],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "longest(['a', 'bb', 'cc']) returned 'a', where the task says 'bb'" in proc.stdout


async def test_candidates_that_agree_on_a_wrong_function_do_not_answer(
    runner: Runner, llm: ScriptedLLM
) -> None:
    other_right = "def longest(words):\n    return sorted(words, key=len, reverse=True)[0] if words else None\n"
    llm.responder = by_candidate({(1, 1): FIRST, (1, 2): FIRST, (2, 1): RIGHT, (2, 2): other_right})
    result = await runner.run(LONGEST, candidates=4)

    # Two programs that print nothing agree, and the examples show both are wrong: the
    # attempt failed, and the retry's two agree and pass them.
    assert result.status == "success", result.error
    first, second = result.attempts
    assert first.error_kind is ErrorKind.EXAMPLE
    assert [o.error_kind for o in first.others] == [ErrorKind.EXAMPLE]
    assert (result.candidates, result.agreement) == (2, 2) and second.examples == 2
    assert seeds(llm) == [(1, 1), (1, 2), (2, 1), (2, 2)]


async def test_a_candidate_the_examples_vouch_for_needs_no_second_vote(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.responder = by_candidate({(1, 1): FIRST, (1, 2): RIGHT})
    result = await runner.run(LONGEST, candidates=5)

    assert result.status == "success", result.error
    assert result.attempts[0].candidate == 2 and result.code.endswith(RIGHT)
    assert (result.candidates, result.agreement) == (2, 1)
    assert result.attempts[0].others[0].error_kind is ErrorKind.EXAMPLE
    assert seeds(llm) == [(1, 1), (1, 2)]  # settled: no third candidate was drawn


async def test_dropping_a_wrong_assert_is_no_fault_when_the_examples_hold(
    runner: Runner, llm: ScriptedLLM
) -> None:
    """The model's own assert expected the wrong thing; the retry drops it. Without examples
    that run would be `unchecked` (nothing shows it is right); here the user's examples do."""
    own_wrong_assert = RIGHT + "assert longest(['a', 'bb', 'cc']) == 'cc'\n"
    llm.script(fenced(own_wrong_assert), fenced(RIGHT))
    result = await runner.run(LONGEST, candidates=1)

    assert result.status == "success", result.error
    assert result.attempts[0].ename == "AssertionError"
    assert result.attempts[1].examples == 2


@pytest.mark.parametrize("policy", ["conversation", "reconsider"])
async def test_a_failed_assert_of_the_codes_own_is_weighed_against_the_prompts_examples(
    settings: Settings, llm: ScriptedLLM, policy: str
) -> None:
    """The function is right on the user's examples and fails the model's own assert: the
    retry hears that the assert is the likelier mistake, and is shown the code to keep (the
    small model's `reconsider` policy otherwise starts afresh). A function wrong on the
    examples hears nothing of the kind."""
    own_wrong_assert = RIGHT + "assert longest(['a', 'bb', 'cc']) == 'cc'\n"
    wrong_function = FIRST + "assert longest(['a', 'bb']) == 'bb'\n"
    llm.script(fenced(wrong_function), fenced(own_wrong_assert), fenced(RIGHT))
    runner = Runner(settings, policy=POLICIES[policy]())
    try:
        result = await runner.run(LONGEST, candidates=1)
    finally:
        await runner.close()

    assert result.status == "success", result.error
    wrong, right_but_checked_wrong, _ = result.attempts
    assert wrong.ename == "AssertionError" and wrong.examples == 0
    assert "program's own" not in llm.requests[1]["messages"][-1]["content"]
    assert right_but_checked_wrong.error_kind is ErrorKind.EXCEPTION
    assert right_but_checked_wrong.examples == 2
    retry = llm.requests[2]["messages"]
    assert "give exactly what the task's own examples say (2 checked" in retry[-1]["content"]
    assert "the assert that failed is the program's own" in retry[-1]["content"]
    # Shown the code whose functions to keep, last before the request.
    assert retry[-2]["role"] == "assistant" and "max(words, key=len)" in retry[-2]["content"]
    # The check's calls printed nothing into the failed attempt's output.
    assert right_but_checked_wrong.output == ""


async def test_when_no_candidate_runs_cleanly_the_one_right_on_the_examples_is_shown_back(
    settings: Settings, llm: ScriptedLLM
) -> None:
    own_wrong_assert = RIGHT + "assert longest(['a', 'bb', 'cc']) == 'cc'\n"
    wrong_function = FIRST + "assert longest(['a', 'bb']) == 'bb'\n"
    llm.responder = by_candidate(
        {(1, 1): wrong_function, (1, 2): own_wrong_assert, (2, 1): RIGHT, (2, 2): RIGHT}
    )
    runner = Runner(settings, policy=POLICIES["reconsider"]())
    try:
        result = await runner.run(LONGEST, candidates=2)
    finally:
        await runner.close()

    assert result.status == "success", result.error
    first = result.attempts[0]
    assert first.candidate == 2 and first.examples == 2  # the attempt's face is candidate 2
    assert [o.candidate for o in first.others] == [1]
    retry = next(r for r in llm.requests if r["seed"] == 201)["messages"]
    assert retry[-2]["role"] == "assistant" and "max(words, key=len)" in retry[-2]["content"]


async def test_code_that_shadows_builtins_is_still_checked_fairly(
    runner: Runner, llm: ScriptedLLM
) -> None:
    # Names the check itself uses; the code's own function does not use them.
    shadows = RIGHT + "def eval(text):\n    return 0\ncallable = isinstance = print = None\n"
    llm.script(fenced(shadows))
    result = await runner.run(LONGEST, candidates=1)

    assert result.status == "success", result.error
    assert result.attempts[0].examples == 2


async def test_a_function_the_prompt_does_not_name_is_not_checked(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(fenced("def first(words):\n    return words[0]\nprint(first(['a', 'bb']))"))
    result = await runner.run(LONGEST, candidates=1)

    assert result.status == "success" and result.attempts[0].examples == 0


async def test_an_example_that_never_returns_or_exits_fails(
    runner: Runner, llm: ScriptedLLM
) -> None:
    hangs = "def longest(words):\n    while True:\n        pass\n"
    llm.script(*[fenced(hangs)] * runner.settings.max_attempts)
    result = await runner.run(LONGEST, candidates=1, max_attempts=1, timeout=2)

    assert result.status == "error" and result.error_kind is ErrorKind.EXAMPLE
    assert "did not finish within 2 s" in result.error

    leaves = "import sys\ndef longest(words):\n    sys.exit(3)\n"
    llm.script(fenced(leaves))
    result = await runner.run(LONGEST, candidates=1, max_attempts=1)
    assert result.status == "error" and result.error_kind is ErrorKind.EXAMPLE
    assert "failed (exception: SystemExit)" in result.error


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM
) -> Iterator[httpx.Client]:
    settings = make_settings(tmp_path_factory.mktemp("examples"), llm_server)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_a_session_calls_nothing_the_code_did_not(client: httpx.Client, llm: ScriptedLLM) -> None:
    """A session's kernel keeps state the next prompt sees: the check would call the user's
    functions there (with whatever they do), so a session's runs are not checked."""
    sid = client.post("/sessions").json()["session_id"]
    try:
        llm.script(fenced("calls = []\ndef longest(words):\n    calls.append(words)\n"))
        r = client.post(f"/sessions/{sid}/run", json={"prompt": LONGEST})
        assert r.json()["status"] == "success" and r.json()["attempts"][0]["examples"] == 0

        llm.script(fenced("print(calls)"))
        r = client.post(f"/sessions/{sid}/run", json={"prompt": "show calls"})
        assert r.json()["output"] == "[]\n"
    finally:
        client.delete(f"/sessions/{sid}")
