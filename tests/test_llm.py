"""Code extraction, traceback cleaning and the model client against the scripted server."""

from __future__ import annotations

import pytest

from autocoder import languages
from autocoder.errors import ConfigError, LLMError
from autocoder.llm import OpenAIChat, clean_traceback, connect, cut_middle, extract_code
from autocoder.testing import Reply, ScriptedLLM


def test_extracts_the_python_block_from_prose() -> None:
    reply = "Sure!\n\n```python\nprint('hi')\n```\n\nThis prints hi."
    assert extract_code(reply) == "print('hi')\n"


def test_joins_several_python_blocks_in_order() -> None:
    reply = "```python\nx = 1\n```\nthen\n```py\nprint(x)\n```"
    assert extract_code(reply) == "x = 1\n\nprint(x)\n"


def test_prefers_python_blocks_over_other_languages() -> None:
    reply = "```bash\npip install numpy\n```\n```python\nimport numpy\n```"
    assert extract_code(reply) == "import numpy\n"


def test_another_language_takes_its_own_fence_and_any_other_last() -> None:
    r_fences = languages.R.fences
    reply = "```python\nprint(1)\n```\n```r\ncat(2)\n```"
    assert extract_code(reply, r_fences, any_fence=True) == "cat(2)\n"
    # Python sent for R still reaches R's syntax check, which says what is wrong.
    assert extract_code("```python\nimport os\n```", r_fences, any_fence=True) == "import os\n"


def test_an_unlabelled_fence_is_code() -> None:
    assert extract_code("```\nprint(2)\n```") == "print(2)\n"


def test_an_unclosed_fence_still_gives_its_code() -> None:
    assert extract_code("```python\nprint(3)\n") == "print(3)\n"


def test_a_reply_without_fences_is_taken_whole_when_it_is_code() -> None:
    assert extract_code("print(1 + 1)") == "print(1 + 1)\n"


def test_a_reply_that_is_only_prose_has_no_code() -> None:
    assert extract_code("I cannot help with that request, sorry about it.") == ""
    assert extract_code("   ") == ""


def test_a_reply_that_is_only_a_value_has_no_code() -> None:
    """The model answered instead of writing a program: nothing was computed."""
    assert (
        extract_code("4") == "" and extract_code("-2.5") == "" and extract_code("'Saturday'") == ""
    )
    assert extract_code("```python\n4\n```") == "4\n"  # fenced, it is what the model wrote as code
    assert extract_code("2 + 2") == "2 + 2\n"


def test_clean_traceback_strips_ansi_colours() -> None:
    tb = [
        "\x1b[0;31m---------------------------------------------------------------------------\x1b[0m",
        "\x1b[0;31mZeroDivisionError\x1b[0m                         Traceback (most recent call last)",
        "Cell \x1b[0;32mIn[1], line 1\x1b[0m\n\x1b[0;32m----> 1\x1b[0m \x1b[38;5;28mprint\x1b[39m(1/0)\n",
        "\x1b[0;31mZeroDivisionError\x1b[0m: division by zero",
    ]
    text = clean_traceback(tb)
    assert "\x1b" not in text
    assert text.startswith("ZeroDivisionError")
    assert "----> 1 print(1/0)" in text
    assert text.endswith("ZeroDivisionError: division by zero")


def test_cut_middle_keeps_head_and_tail() -> None:
    text = "HEAD" + "x" * 10_000 + "TAIL"
    cut = cut_middle(text, 1000)
    assert cut.startswith("HEAD") and cut.endswith("TAIL")
    assert "characters cut" in cut
    assert len(cut) < 1100
    assert cut_middle("short", 1000) == "short"


async def test_transport_errors_are_retried(llm: ScriptedLLM, settings) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(status=503), Reply(status=429), "```python\nprint(1)\n```")
    chat = OpenAIChat(
        base_url=llm.base_url,
        api_key="k",
        model=None,
        settings=settings.model_copy(update={"llm_retries": 2}),
    )
    try:
        reply = await chat.complete(
            [{"role": "user", "content": "x"}], temperature=0, max_tokens=50
        )
    finally:
        await chat.close()
    assert reply.text.startswith("```python")
    assert len(llm.requests) == 3


async def test_the_model_name_comes_from_the_server_when_unset(llm: ScriptedLLM, settings) -> None:  # type: ignore[no-untyped-def]
    chat = await connect(settings)
    try:
        assert await chat.resolve_model() == "scripted-model"
    finally:
        await chat.close()


async def test_an_unknown_model_names_the_setting(llm: ScriptedLLM, settings) -> None:  # type: ignore[no-untyped-def]
    chat = await connect(settings.model_copy(update={"model": "no-such-model"}))
    try:
        with pytest.raises(ConfigError, match="AUTOCODER_MODEL"):
            await chat.complete([{"role": "user", "content": "x"}], temperature=0, max_tokens=5)
    finally:
        await chat.close()


async def test_an_unreachable_endpoint_names_the_setting(settings) -> None:  # type: ignore[no-untyped-def]
    down = settings.model_copy(update={"openai_base_url": "http://127.0.0.1:9/v1", "model": "m"})
    chat = await connect(down)
    try:
        with pytest.raises(LLMError, match="OPENAI_BASE_URL"):
            await chat.complete([{"role": "user", "content": "x"}], temperature=0, max_tokens=5)
    finally:
        await chat.close()


async def test_a_remote_endpoint_without_a_key_is_refused(settings) -> None:  # type: ignore[no-untyped-def]
    remote = settings.model_copy(
        update={"openai_base_url": "https://llm.example.invalid/v1", "openai_api_key": None}
    )
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        await connect(remote)
