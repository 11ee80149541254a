"""What each retry policy asks the model, built from attempts made by hand (no model needed)."""

from __future__ import annotations

import dataclasses

import pytest

from autocoder.config import load_settings
from autocoder.prompts import POLICIES, Conversation, Reconsider, Regenerate, Review, choose_policy
from autocoder.records import Attempt, ErrorKind

SYSTEM = "system prompt"
TASK = "Write add(a, b) and check it."
TRACEBACK = "\n".join(
    [
        "Cell In[1], line 4",
        "      1 def add(a, b):",
        "      2     return a + b",
        "----> 4 assert add(2, 2) == 5",
        "AssertionError: ",
    ]
)


def failed(number: int = 1, error: str = TRACEBACK) -> Attempt:
    return Attempt(
        number=number,
        status="error",
        code="def add(a, b):\n    return a + b\n\nassert add(2, 2) == 5\n",
        reply="```python\ndef add(a, b):\n    return a + b\n\nassert add(2, 2) == 5\n```",
        error=error,
        error_kind=ErrorKind.EXCEPTION,
        ename="AssertionError",
    )


@pytest.fixture
def settings():  # type: ignore[no-untyped-def]
    return load_settings()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_first_attempt_is_the_task_alone_and_greedy(name: str, settings) -> None:  # type: ignore[no-untyped-def]
    messages, temperature = POLICIES[name]().request(TASK, [], settings, SYSTEM)
    assert messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TASK},
    ]
    assert temperature == 0.0


def test_conversation_shows_the_old_reply_and_the_error(settings) -> None:  # type: ignore[no-untyped-def]
    history = [failed(1), failed(2)]
    messages, temperature = Conversation().request(TASK, history, settings, SYSTEM)
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert messages[2]["content"] == history[0].reply
    assert "assert add(2, 2) == 5" in messages[3]["content"]
    assert "corrected program" in messages[-1]["content"]
    assert temperature == Conversation().retry_temperature


def test_regenerate_sends_the_task_and_the_errors_last_lines_not_the_old_code(settings) -> None:  # type: ignore[no-untyped-def]
    policy = Regenerate(hint_lines=2)
    messages, temperature = policy.request(TASK, [failed(1)], settings, SYSTEM)
    assert len(messages) == 2
    content = messages[1]["content"]
    assert content.startswith(TASK)
    assert "----> 4 assert add(2, 2) == 5\nAssertionError:" in content
    assert "return a + b" not in content  # neither the old code nor earlier traceback lines
    assert temperature == 0.8


def test_regenerate_hints_only_at_the_last_attempt(settings) -> None:  # type: ignore[no-untyped-def]
    history = [failed(1, "ZeroDivisionError: first"), failed(2, "KeyError: second")]
    content = Regenerate().request(TASK, history, settings, SYSTEM)[0][1]["content"]
    assert "KeyError: second" in content
    assert "first" not in content


def test_hint_lines_zero_sends_no_error_and_negative_sends_it_all(settings) -> None:  # type: ignore[no-untyped-def]
    none = Regenerate(hint_lines=0).request(TASK, [failed()], settings, SYSTEM)[0][1]["content"]
    assert "AssertionError" not in none and "failed" in none
    full = Regenerate(hint_lines=-1).request(TASK, [failed()], settings, SYSTEM)[0][1]["content"]
    assert "Cell In[1], line 4" in full and "AssertionError" in full


def test_reconsider_says_the_check_itself_may_be_wrong(settings) -> None:  # type: ignore[no-untyped-def]
    messages, temperature = Reconsider().request(TASK, [failed()], settings, SYSTEM)
    content = messages[1]["content"]
    assert len(messages) == 2 and content.startswith(TASK)
    assert "assert add(2, 2) == 5" in content
    assert "expected value is wrong" in content
    assert temperature == Reconsider().retry_temperature


def test_a_policy_is_a_value_that_can_be_tuned(settings) -> None:  # type: ignore[no-untyped-def]
    hot = dataclasses.replace(Regenerate(), retry_temperature=1.0)
    assert hot.request(TASK, [failed()], settings, SYSTEM)[1] == 1.0
    assert Regenerate().retry_temperature == 0.8


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_setting_names_any_policy(name: str) -> None:
    assert choose_policy(load_settings(retry_policy=name), "local").name == name


def test_review_shows_the_last_reply_once_and_asks_which_part_is_wrong(settings) -> None:  # type: ignore[no-untyped-def]
    policy = Review()
    messages, temperature = policy.request(TASK, [failed(1)], settings, SYSTEM)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == TASK
    assert messages[2]["content"] == failed().reply
    assert "assert add(2, 2) == 5" in messages[3]["content"]
    assert "the check that failed" in messages[3]["content"]
    assert temperature == policy.review_temperature


def test_review_then_regenerates_without_the_old_code(settings) -> None:  # type: ignore[no-untyped-def]
    messages, temperature = Review().request(TASK, [failed(1), failed(2)], settings, SYSTEM)
    assert messages == Reconsider().request(TASK, [failed(1), failed(2)], settings, SYSTEM)[0]
    assert temperature == Reconsider().retry_temperature


def test_auto_reconsiders_for_the_embedded_model_and_converses_for_an_endpoint() -> None:
    assert choose_policy(load_settings(retry_policy="auto"), "local").name == "reconsider"
    assert choose_policy(load_settings(retry_policy="auto"), "openai").name == "conversation"


@pytest.mark.parametrize("name", ["regenerate", "reconsider", "review"])
def test_code_that_dropped_its_checks_is_shown_back_to_get_them(name: str) -> None:
    settings = load_settings()
    failed = Attempt(
        number=1,
        status="error",
        code="def f(): return 2\nassert f() == 3",
        reply="```python\ndef f(): return 2\nassert f() == 3\n```",
        error_kind=ErrorKind.EXCEPTION,
        ename="AssertionError",
        error="---> 2 assert f() == 3\n\nAssertionError: f() is 2, but the assert expects 3",
    )
    unchecked = Attempt(
        number=2,
        status="error",
        code="def f(): return 2\nprint(f())",
        reply="```python\ndef f(): return 2\nprint(f())\n```",
        error_kind=ErrorKind.UNCHECKED,
        error="the code has no asserts left; attempt 1's assert failed:\n"
        "---> 2 assert f() == 3\n\nAssertionError: f() is 2, but the assert expects 3",
    )
    messages, temperature = POLICIES[name]().request("task", [failed, unchecked], settings, "sys")

    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == unchecked.reply
    assert "f() is 2, but the assert expects 3" in messages[3]["content"]
    assert "asserts added" in messages[3]["content"]
    assert temperature == 0.2
