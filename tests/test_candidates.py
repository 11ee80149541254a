"""Several candidates per attempt: the answer most of them agree on, and an honest "not sure".

The scripted model answers each candidate by the seed it was asked with (attempt * 100 +
candidate), so a test says what every candidate writes whatever order the requests arrive in.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from autocoder.candidates import SAMPLE_TEMPERATURE, Produced, normalise, produced, tally, values
from autocoder.config import Settings
from autocoder.notebook import record_path
from autocoder.prompts import FROM_SCRATCH
from autocoder.records import ErrorKind, Event, RunResult
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer, autocoder_cmd
from tests.test_api import make_settings

pytestmark = pytest.mark.timeout(120)

# Every candidate's code starts with this: a second candidate in the same kernel would fail it.
OWN_KERNEL = (
    "import builtins\n"
    "assert not hasattr(builtins, 'ran_here'), 'two candidates shared a kernel'\n"
    "builtins.ran_here = True\n"
)


def by_candidate(codes: dict[tuple[int, int], str]) -> Callable[[dict[str, Any]], str]:
    """A responder: (attempt, candidate) -> the code that candidate writes."""

    def respond(body: dict[str, Any]) -> str:
        seed = body["seed"]
        return fenced(OWN_KERNEL + codes[(seed // 100, seed % 100)])

    return respond


def seeds(llm: ScriptedLLM) -> list[tuple[int, int]]:
    return sorted((r["seed"] // 100, r["seed"] % 100) for r in llm.requests)


# --- The rules, as plain functions ----------------------------------------------------------


def test_outputs_that_say_the_same_thing_compare_equal() -> None:
    assert normalise("Total:  42.0\r\n\n") == normalise("total: 42\n")
    assert normalise("np.float64(0.30000000000000004)") == normalise("0.3")
    assert normalise("<object at 0x7f3a2b1c9d80>") == normalise("<object at 0x7f00aa11bb22>")
    assert normalise("42") != normalise("43")
    assert normalise("3.14159") != normalise("3.14")


def test_the_largest_group_answers_and_a_tie_goes_to_the_first_drawn() -> None:
    a, b = Produced("a"), Produced("b")
    two_of_three = tally([a, b, b])
    assert two_of_three.chosen == 1 and two_of_three.agreement == 2 and two_of_three.certain

    tie = tally([a, b, b, a])
    assert tie.chosen == 0 and tie.agreement == 2
    assert not tie.certain  # as many say something else

    c, d = Produced("c"), Produced("d")
    scattered = tally([a, b, c, a, d])
    assert scattered.chosen == 0 and scattered.certain  # the others are wrong each its own way
    assert not tally([a, b, c, d]).certain  # no two agree

    failures_do_not_vote = tally([None, b, None, b])
    assert failures_do_not_vote.chosen == 1 and failures_do_not_vote.certain

    assert tally([a]).certain  # one candidate: as before, running cleanly is all there is
    assert not tally([a, None]).certain and not tally([a, None]).settled()
    assert tally([a, a]).settled() and not tally([a, b]).settled()
    assert tally([None, None]).settled() and tally([None, None]).chosen == 0


def said(text: str, task: str = "", rich: tuple[str, ...] = ()) -> Produced:
    """What a candidate produced that printed `text` for `task`."""
    outputs: list[dict[str, Any]] = [{"output_type": "stream", "name": "stdout", "text": text}]
    outputs += [{"output_type": "display_data", "data": {kind: ""}} for kind in rich]
    return produced(outputs, None, given=frozenset(values(task)))


def test_programs_that_say_the_same_numbers_in_other_words_agree() -> None:
    weekdays = "How many weekdays (Monday to Friday) are there in 2024? Print the number."
    terse, sentence = said("262\n", weekdays), said("There are 262 weekdays in 2024.\n", weekdays)
    assert terse != sentence  # not the same output...
    agreed = tally([terse, sentence])
    assert agreed.certain and agreed.agreement == 2 and agreed.chosen == 0  # ...the same answer

    table = "Print a table converting Celsius to Fahrenheit for -40 °C to 100 °C in steps of 10 °C."
    pipes = said("Celsius | Fahrenheit\n-40 | -40.0\n-30 | -22.0\n-20 | -4.0\n", table)
    arrows = said("-40°C -> -40.00°F\n-30°C -> -22.00°F\n-20°C -> -4.00°F\n", table)
    assert tally([pipes, arrows]).certain
    assert tally([said("North: $3,740.87"), said("north    3740.870000")]).certain


def test_other_numbers_other_words_or_other_outputs_do_not_agree() -> None:
    weekdays = "How many weekdays are there in 2024?"
    assert not tally([said("262", weekdays), said("There are 261 weekdays", weekdays)]).certain
    assert not tally([said("Saturday"), said("The day is Sunday")]).certain
    assert not tally([said("2024", weekdays), said("the year 2024", weekdays)]).certain
    assert not tally([said("mean 4.5", rich=("image/png",)), said("4.5")]).certain


def test_the_same_numbers_said_three_ways_outvote_two_identical_outputs() -> None:
    """Two identical outputs often come from one program drawn twice; three phrasings of one
    number are three programs that agree."""
    same = tally(
        [said("261 days"), said("261 days"), said("262"), said("In all, 262."), said("262 in all")]
    )
    assert same.certain and same.chosen == 2 and same.agreement == 3


# --- The engine --------------------------------------------------------------------------------


async def test_the_answer_most_candidates_agree_on_is_chosen(
    runner: Runner, llm: ScriptedLLM, settings: Settings
) -> None:
    writes = "open('answer.txt', 'w').write('42')\n"
    llm.responder = by_candidate(
        {
            (1, 1): "print(41)",
            (1, 2): writes + "print(42)",
            (1, 3): writes + "print(42.0)",
            (1, 4): writes + "import numpy as np\nnp.float64(42)",
            (1, 5): "1/0",
        }
    )
    result = await runner.run("What is six times seven?", candidates=5)

    assert result.status == "success", result.error
    assert (result.candidates, result.agreement) == (5, 3)
    assert result.output == "42\n"
    (attempt,) = result.attempts
    assert attempt.candidate == 2 and "print(42)" in result.code
    assert Path(result.filename).name == "generated_code_1_2.py"
    assert Path(result.filename).read_text() == result.code
    assert [(o.candidate, o.group) for o in attempt.others] == [(1, 2), (3, 1), (4, 1), (5, 0)]
    # Each ran in a kernel of its own (none failed the OWN_KERNEL check).
    assert [o.error_kind for o in attempt.others] == [None, None, None, ErrorKind.EXCEPTION]
    assert "ZeroDivisionError" in attempt.others[-1].error
    # The first two disagreed, so three more were drawn; each sampled with its own seed.
    assert seeds(llm) == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
    temperatures = {r["seed"] % 100: r["temperature"] for r in llm.requests}
    assert temperatures[1] == 0.0 and all(
        temperatures[c] >= SAMPLE_TEMPERATURE > 0 for c in (2, 3, 4, 5)
    )
    # The answer's files are the run's; the other candidates' directories are gone.
    assert [f.name for f in result.files] == ["answer.txt"]
    assert (Path(result.workdir) / "answer.txt").read_text() == "42"
    work = settings.autofile_dir / ".work"
    assert not work.exists() or list(work.iterdir()) == []

    record = RunResult.model_validate_json(
        record_path(settings.notebooks_dir, result.run_id).read_text()
    )
    assert (record.candidates, record.agreement) == (5, 3)
    assert [o.candidate for o in record.attempts[0].others] == [1, 3, 4, 5]


async def test_two_that_agree_are_enough(runner: Runner, llm: ScriptedLLM) -> None:
    llm.responder = by_candidate({(1, 1): "print(7)", (1, 2): "print( 7 )"})
    result = await runner.run("print seven", candidates=5)

    assert result.status == "success"
    assert (result.candidates, result.agreement) == (2, 2)
    assert seeds(llm) == [(1, 1), (1, 2)]


async def test_two_that_print_the_same_answer_differently_agree(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.responder = by_candidate(
        {(1, 1): "print(262)", (1, 2): "print('There are 262 weekdays in 2024.')"}
    )
    result = await runner.run("How many weekdays are there in 2024?", candidates=5)

    assert result.status == "success", result.error
    assert (result.candidates, result.agreement) == (2, 2)
    assert result.output == "262\n"
    assert seeds(llm) == [(1, 1), (1, 2)]  # settled in the first round


async def test_candidates_that_disagree_make_an_uncertain_run(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.responder = by_candidate(
        {
            (1, 1): "print(1)",
            (1, 2): "print(2)",
            (1, 3): "print(3)\n_ = open('x.csv', 'w').write('a')",
        }
    )
    events: list[Event] = []
    result = await runner.run("pick a number", candidates=3, on_event=events.append)

    assert result.status == "error" and result.error_kind is ErrorKind.UNCERTAIN
    assert (result.candidates, result.agreement) == (3, 1)
    # The chosen answer is still there (a tie goes to the first drawn), the others named.
    assert result.output == "1\n" and "print(1)" in result.code
    assert "only 1 of 3 candidates" in result.error
    assert "candidate 2 printed '2'" in result.error
    assert "candidate 3 printed '3' and made text/csv" in result.error
    assert len(result.attempts) == 1  # no retry: more candidates would not settle it
    finished = [e for e in events if e.type == "attempt_finished"]
    assert finished[0].data["error_kind"] == "uncertain"
    assert [o["candidate"] for o in finished[0].data["others"]] == [2, 3]

    # The notebook runs the chosen code, then fails saying why it is not to be trusted.
    nb = nbformat.read(result.notebook, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Not sure" in text and "Candidate 2" in text and "Candidate 3" in text
    client = NotebookClient(nb, timeout=60, kernel_name="python3")
    with pytest.raises(CellExecutionError, match="uncertain"):
        await client.async_execute()
    answer = [c for c in nb.cells if c.cell_type == "code"][0]
    assert answer.outputs[0]["text"] == "1\n"


async def test_when_no_candidate_runs_cleanly_the_error_feeds_the_retry(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.responder = by_candidate(
        {(1, 1): "1/0", (1, 2): "undefined_name", (2, 1): "print(5)", (2, 2): "print(5.0)"}
    )
    result = await runner.run("print five", candidates=3)

    assert result.status == "success" and result.output == "5\n"
    assert len(result.attempts) == 2
    assert (result.candidates, result.agreement) == (2, 2)
    first = result.attempts[0]
    assert first.candidate == 1 and first.error_kind is ErrorKind.EXCEPTION
    assert [o.candidate for o in first.others] == [2]
    # None ran cleanly, so no third was drawn; the retry was told candidate 1's error.
    assert seeds(llm) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    retry = next(r for r in llm.requests if r["seed"] == 201)
    said = retry["messages"][-1]["content"]
    assert "ZeroDivisionError" in said and FROM_SCRATCH.strip() in said


async def test_a_lone_answer_among_failures_is_not_sure_and_says_what_the_others_hit(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.responder = by_candidate({(1, c): "print(7)" if c == 1 else "1/0" for c in (1, 2, 3)})
    result = await runner.run("print seven", candidates=3)

    assert result.status == "error" and result.error_kind is ErrorKind.UNCERTAIN
    assert len(result.attempts) == 1 and result.output == "7\n"
    assert result.error == (
        "only 1 of 3 candidates produced this answer; candidates 2 and 3 failed "
        "(ZeroDivisionError: division by zero). Check it before relying on it."
    )


async def test_the_notebook_holds_every_candidate_and_run_all_runs_the_answer(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.responder = by_candidate(
        {(1, 1): "print('tea')", (1, 2): "print('coffee')", (1, 3): "print('Coffee')"}
    )
    result = await runner.run("what to drink", candidates=3)
    assert result.status == "success" and (result.candidates, result.agreement) == (3, 2)

    nb = nbformat.read(result.notebook, as_version=4)
    assert nb.metadata.autocoder.candidates == 3 and nb.metadata.autocoder.agreement == 2
    (answer,) = [c for c in nb.cells if c.cell_type == "code"]
    assert "coffee" in answer.source and answer.metadata.autocoder.candidate == 2
    others = [c for c in nb.cells if "the others of attempt 1" in c.source]
    assert len(others) == 1
    assert "Candidate 1" in others[0].source and "Candidate 3" in others[0].source
    assert "same result as the answer" in others[0].source
    assert "2 of 3 candidates agree" in nb.cells[0].source

    client = NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=False)
    await client.async_execute()
    (answer,) = [c for c in nb.cells if c.cell_type == "code"]
    assert answer.outputs[0]["text"] == "coffee\n"


# --- The doors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("candidates"), llm_server, candidates=3, max_request_candidates=4
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def test_run_says_how_many_candidates_agree(client: httpx.Client, llm: ScriptedLLM) -> None:
    llm.responder = by_candidate({(1, 1): "print(2)", (1, 2): "print(3)", (1, 3): "print(3)"})
    r = client.post("/run", json={"prompt": "one plus two"})  # AUTOCODER_CANDIDATES=3

    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "success" and body["output"] == "3\n"
    assert (body["candidates"], body["agreement"]) == (3, 2)
    stored = client.get(f"/runs/{body['run_id']}").json()
    assert (stored["candidates"], stored["agreement"]) == (3, 2)
    assert [o["group"] for o in stored["attempts"][0]["others"]] == [2, 1]

    llm.script(fenced("print(1)"))
    form = {"prompt": (None, "one"), "candidates": (None, "1")}
    r = client.post("/run", files=form)  # a form asks for one
    assert r.json()["candidates"] == 1 and "seed" not in llm.requests[0]

    r = client.post("/run", json={"prompt": "x", "candidates": 5})
    assert r.status_code == 422 and "AUTOCODER_MAX_REQUEST_CANDIDATES" in r.text


def test_a_session_draws_one_candidate(client: httpx.Client, llm: ScriptedLLM) -> None:
    sid = client.post("/sessions").json()["session_id"]
    try:
        r = client.post(f"/sessions/{sid}/run", json={"prompt": "x", "candidates": 3})
        assert r.status_code == 422 and "keeps state" in r.text

        llm.script(fenced("n = 4\nprint(n)"))
        r = client.post(f"/sessions/{sid}/run", json={"prompt": "set n"})
        assert r.json()["status"] == "success"
        assert r.json()["candidates"] == 1 and len(llm.requests) == 1
    finally:
        client.delete(f"/sessions/{sid}")


def test_the_cli_says_how_sure_it_is(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    llm.responder = by_candidate({(1, 1): "print('a')", (1, 2): "print('a')"})
    proc = subprocess.run(
        [*autocoder_cmd(), "run", "--candidates", "4", "--json", "-q", "say a"],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["candidates"], data["agreement"]) == (2, 2)

    llm.requests.clear()
    llm.responder = by_candidate({(1, 1): "print('a')", (1, 2): "print('b')", (1, 3): "print('c')"})
    proc = subprocess.run(
        [*autocoder_cmd(), "run", "--candidates", "3", "say a letter"],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "output (not sure of it)" in proc.stdout and "\na\n" in proc.stdout
    assert "1 of 3 candidates agree" in proc.stdout
    assert "candidate 2 printed 'b'" in proc.stdout
    assert "attempt 1, candidate 3:" in proc.stderr
    assert "attempt 1: not sure: the candidates disagree" in proc.stderr


async def test_a_cancelled_run_keeps_its_candidates_and_frees_their_kernels(
    runner: Runner, llm: ScriptedLLM, settings: Settings
) -> None:
    sleepy = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    llm.responder = by_candidate({(1, 1): sleepy, (1, 2): sleepy})
    outputs: list[Event] = []
    both_running = asyncio.Event()

    def on_event(event: Event) -> None:
        outputs.append(event)
        if sum(e.type == "code_generated" for e in outputs) == 2:
            both_running.set()

    run = asyncio.create_task(runner.run("sleep", candidates=2, on_event=on_event))
    await asyncio.wait_for(both_running.wait(), 60)
    await asyncio.sleep(0.5)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    run_id = outputs[0].run_id
    record = RunResult.model_validate_json(record_path(settings.notebooks_dir, run_id).read_text())
    (attempt,) = record.attempts
    assert record.error_kind is ErrorKind.CANCELLED and attempt.candidate == 1
    assert [(o.candidate, o.error_kind) for o in attempt.others] == [(2, ErrorKind.CANCELLED)]
    assert record.candidates == 2 and record.agreement == 0
    work = settings.autofile_dir / ".work"
    assert not work.exists() or list(work.iterdir()) == []


def test_a_plots_own_repr_is_no_answer_of_its_own() -> None:
    """Two programs drawing the same plot agree whether or not IPython echoed the figure."""
    from autocoder.candidates import normalise

    echoed = "<Figure size 640x480 with 1 Axes>\n[<matplotlib.lines.Line2D at 0x7f3a2b1c0d90>]\n"
    assert normalise(echoed) == normalise("") == ""
    assert normalise("Text(0.5, 1.0, 'Sine wave')\nmax 1.0\n") == "max 1"
    assert normalise("<Figure is my word>\n") != ""  # only the repr's own shapes go


def test_between_equal_groups_a_program_that_produced_nothing_does_not_answer() -> None:
    from autocoder.candidates import Produced, tally

    silent, plot = Produced(""), Produced("", ("image/png",))
    assert tally([None, silent, None, None, plot]).chosen == 4
    assert tally([None, plot, None, None, silent]).chosen == 1
    assert tally([silent, silent, plot]).chosen == 0  # the larger group still wins
