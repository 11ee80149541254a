"""A flood is cut inside the kernel, before it is sent; output the kernel could not send is an error.

The in-kernel cap is checked on the iopub messages a client of a real kernel receives; the
engine's view of the same cases goes through a Runner with the scripted model.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from autocoder.config import Settings
from autocoder.inside import output_cap
from autocoder.kernel.client import Kernel
from autocoder.kernel.output import OutputCollector
from autocoder.kernel.pool import new_kernel
from autocoder.records import ErrorKind
from autocoder.runner import Runner
from autocoder.sandbox import install_line
from autocoder.testing import ScriptedLLM, fenced

pytestmark = pytest.mark.timeout(120)

FLOOD = "print('x' * 10**8)"
LIMIT = 100_000

# Code that makes the kernel fail to send what it prints, as running out of memory while
# serialising a message does (ipykernel only logs that, in its IO thread).
SEND_FAILS = textwrap.dedent("""
    import sys
    session = sys.stdout.session
    pack = session.pack
    def failing_pack(obj):
        if isinstance(obj, dict) and "the answer" in str(obj.get("text", "")):
            raise MemoryError
        return pack(obj)
    session.pack = failing_pack
    print("the answer is 42")
    """)

# Code that makes the kernel's next reply (after this cell's own) be interrupted between two of
# its frames, as an interrupt (a timeout, a flood stopped) that lands just as the code ends can.
INTERRUPT_THE_NEXT_REPLY = textwrap.dedent("""
    import os, signal, zmq
    kernel = get_ipython().kernel
    if kernel._supports_kernel_subshells:
        manager = kernel.shell_channel_thread.manager
        stream = manager.get_subshell_to_shell_channel_socket(None)
    else:
        stream = kernel.shell_stream
    send_multipart = stream.send_multipart
    replies = []
    def interrupted_once(frames, *args, **kwargs):
        replies.append(frames)
        if len(replies) == 1:
            return send_multipart(frames, *args, **kwargs)
        stream.send_multipart = send_multipart
        *first, last = frames
        for frame in first:
            stream.send(frame, zmq.SNDMORE)
            if frame is first[3]:
                os.kill(os.getpid(), signal.SIGINT)
        stream.send(last)
    stream.send_multipart = interrupted_once
    """)


@pytest.fixture
async def kernel(settings: Settings) -> AsyncIterator[Kernel]:
    async with new_kernel(settings.model_copy(update={"max_output_bytes": LIMIT})) as k:
        yield k


async def received(kernel: Kernel, code: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Every iopub message of one execution, as the server's client receives it."""
    msg_id = kernel.kc.execute(code, store_history=False)
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await kernel.kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages
        messages.append(msg)


def size(msg: dict[str, Any]) -> int:
    return len(json.dumps(msg["content"]))


async def test_a_100_mb_print_reaches_the_server_already_cut(kernel: Kernel) -> None:
    messages = await received(kernel, FLOOD)

    streams = [m["content"] for m in messages if m["msg_type"] == "stream"]
    assert sum(size(m) for m in messages) < 2 * LIMIT
    assert sum(len(s["text"]) for s in streams) <= LIMIT + 200
    cut = sum(s.get(output_cap.CUT_KEY, 0) for s in streams)
    sent = sum(len(s["text"]) for s in streams if output_cap.CUT_KEY not in s)
    assert cut + sent == 10**8 + 1  # every character is either sent or counted
    assert any("characters of stdout cut in the kernel" in s["text"] for s in streams)
    # The head and the tail of the output are what is sent.
    assert streams[0]["text"].startswith("x") and streams[-1]["text"].endswith("x\n")


async def test_the_budget_is_per_execution(kernel: Kernel) -> None:
    await received(kernel, FLOOD)
    for _ in range(3):
        execution = await kernel.execute(f"print('y' * {LIMIT - 10})", timeout=10)
        assert execution.kind is None, execution.outputs
        assert execution.stdout == "y" * (LIMIT - 10) + "\n"


async def test_displays_results_and_errors_are_bounded_in_the_kernel(
    kernel: Kernel,
) -> None:
    display = await received(
        kernel,
        "from IPython.display import display\ndisplay({'text/plain': 'y' * 10**7}, raw=True)",
    )
    result = await received(kernel, "'q' * 10**7")
    error = await received(kernel, "raise ValueError('z' * 10**7)")

    for messages in (display, result, error):
        assert sum(size(m) for m in messages) < LIMIT
    shown = next(m["content"] for m in display if m["msg_type"] == "display_data")
    assert shown[output_cap.CUT_KEY] == 10**7
    assert "cut in the kernel" in shown["data"]["text/plain"]
    raised = next(m["content"] for m in error if m["msg_type"] == "error")
    assert raised["ename"] == "ValueError" and "characters cut" in raised["evalue"]


async def test_a_flood_through_the_engine_says_how_much_was_cut(
    runner: Runner, llm: ScriptedLLM, settings: Settings
) -> None:
    llm.script(fenced(FLOOD), fenced("print('small')"))
    result = await runner.run("flood")

    first = result.attempts[0]
    assert first.error_kind is ErrorKind.OUTPUT_LIMIT and first.truncated
    assert len(first.output) <= settings.max_output_bytes + 200
    said = re.search(r"\[([\d,]+) bytes of output cut\]", first.output)
    assert said is not None, first.output[-300:]
    assert int(said.group(1).replace(",", "")) >= 10**8 - settings.max_output_bytes
    assert first.output.startswith("x") and first.output.rstrip().endswith("x")
    assert "printed far too much" in llm.requests[1]["messages"][-1]["content"]
    assert result.status == "success" and result.output == "small\n"


async def test_output_the_kernel_could_not_send_is_never_a_success(
    runner: Runner, llm: ScriptedLLM
) -> None:
    llm.script(fenced(SEND_FAILS), fenced("print('sent')"))
    result = await runner.run("answer")

    first = result.attempts[0]
    assert first.status == "error"
    assert first.error_kind is ErrorKind.OUTPUT_LOST
    assert "lost in the kernel" in first.error
    assert "lost in the kernel (MemoryError)" in first.output
    assert "could not be sent" in llm.requests[1]["messages"][-1]["content"]
    assert result.status == "success" and result.output == "sent\n"


async def test_unconfined_kernels_get_the_same_memory_hygiene_and_cap(
    settings: Settings, runner: Runner, llm: ScriptedLLM
) -> None:
    unconfined = settings.model_copy(update={"sandbox": "none"})
    async with new_kernel(unconfined) as k:
        env = await k.execute(
            "import os\nprint(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('OMP_NUM_THREADS'))",
            timeout=10,
        )
        assert env.stdout.split()[0] == "2" and env.stdout.split()[1].isdigit()
        flood = await k.execute(FLOOD, timeout=10)
        assert flood.kind is ErrorKind.OUTPUT_LIMIT
        assert flood.stdout.startswith("x") and "bytes of output cut" in flood.stdout


# The server's side: what the kernel's notes mean to the collector.


def stream(text: str, **extra: Any) -> dict[str, Any]:
    return {"msg_type": "stream", "content": {"name": "stdout", "text": text, **extra}}


def test_a_note_of_a_cut_counts_as_output_over_the_limit() -> None:
    collector = OutputCollector(2048)
    collector.add(stream("head\n"))
    collector.add(stream("", **{output_cap.CUT_KEY: 5000}))
    collector.add(stream("... cut in the kernel ...", **{output_cap.CUT_KEY: 1}))
    collector.add(stream("tail\n"))
    execution = collector.execution(None, 0.0)

    assert collector.over and execution.truncated
    assert execution.stdout == "head\n\n... [5,001 bytes of output cut] ...\ntail\n"


def test_a_note_of_lost_output_is_kept_and_marks_the_execution() -> None:
    collector = OutputCollector(2048)
    collector.add(stream("[5 characters of stdout lost]", **{output_cap.LOST_KEY: 5}))

    assert collector.lost == 5 and not collector.over
    assert collector.execution(None, 0.0).stdout == "[5 characters of stdout lost]"


async def test_an_interrupt_while_the_kernel_sends_its_reply_tears_nothing(
    kernel: Kernel,
) -> None:
    for code in (INTERRUPT_THE_NEXT_REPLY, "print('interrupted as it replies')", "print(2)"):
        msg_id = kernel.kc.execute(code)
        reply = await kernel.kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"


def test_the_exec_line_carries_the_limit_and_nothing_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(output_cap.LIMIT_VAR, raising=False)
    assert install_line(output_cap.install_source()) == "pass"
    monkeypatch.setenv(output_cap.LIMIT_VAR, "12345")
    line = install_line(output_cap.install_source())
    assert line.startswith("exec(compile(") and "install(get_ipython(), 12345)" in line
    compile(line, "<exec line>", "exec")


def test_output_between_half_the_limit_and_the_limit_is_kept_whole() -> None:
    collector = OutputCollector(2048)
    collector.add(stream("a" * 1500))
    collector.add(
        {
            "msg_type": "display_data",
            "header": {"msg_type": "display_data"},
            "content": {"data": {"text/plain": "b" * 300}, "metadata": {}},
        }
    )
    collector.add(stream("c" * 200))
    execution = collector.execution(None, 0.0)

    assert not execution.truncated
    assert execution.text == "a" * 1500 + "b" * 300 + "\n" + "c" * 200


def test_past_the_limit_the_head_and_the_tail_are_kept() -> None:
    collector = OutputCollector(2048)
    collector.add(stream("a" * 1500))
    collector.add(stream("b" * 5000))
    collector.add(stream("c" * 10))
    execution = collector.execution(None, 0.0)

    assert execution.truncated
    head, _, tail = execution.stdout.partition("\n... [4,462 bytes of output cut] ...\n")
    assert head == "a" * 1024 and tail == "b" * 1014 + "c" * 10
