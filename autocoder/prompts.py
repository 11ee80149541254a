"""What the model is asked: the system prompts, what a failed attempt is told, and the retry
policies that decide each attempt's messages. The run loop (runner.py) only asks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from autocoder import files, languages
from autocoder.config import Settings
from autocoder.llm import Message, cut_middle
from autocoder.records import Attempt, ErrorKind, last_line

# How much of a failed attempt's output and error the model gets back (and a record keeps).
FEEDBACK_CHARS = 4000
# Said with every retry: a small model otherwise reuses a name its failed program defined.
FROM_SCRATCH = " It runs from scratch: nothing the failed program defined or imported is kept."
_NO_MODULE = re.compile(r"No module named '([^'.]+)")

SYSTEM_PROMPT = """\
You are autocoder. You write Python 3 code that solves the user's task.
Your code runs as one cell in a fresh Jupyter Python kernel with no state from earlier runs; \
its standard output (and the value of the last expression) is the answer the user sees, \
so end by printing the final answer plainly: the values asked for, not a description. \
Plots and rich displays are shown to the user as well.
Reply with exactly one fenced ```python code block holding the complete program, \
and nothing needed outside it. Do not ask questions, do not read from stdin, \
and do not use the network unless the task asks for it."""

SESSION_PROMPT = (
    "Your code runs in a session: the same Python kernel runs each of the user's tasks in "
    "turn, so what earlier code defined, imported and wrote is still there. The names and files "
    "listed with the task exist already: use them as they are instead of re-creating or "
    "re-loading them, and do not delete or overwrite them unless the task asks for it."
)

MAGIC_SYSTEM_PROMPT = """\
You are autocoder. You write Python 3 code that solves the user's task.
Your code runs as a cell in the user's own IPython session. The names listed with the task \
already exist there: use them as they are instead of re-creating or re-loading them, and do not \
delete or overwrite them unless the task asks for it. Whatever your code defines stays in the \
session for the user.
What it prints, the value of its last expression, plots and rich displays are shown to the user.
Reply with exactly one fenced ```python code block holding the complete code. \
Do not ask questions, do not read from stdin, and do not use the network unless the task \
asks for it."""


def feedback(attempt: Attempt, timeout: float) -> str:
    """What went wrong, in the words the model gets back (bounded in size), and what the
    executor said about it (a session whose state was lost)."""
    said = _what_went_wrong(attempt, timeout)
    return f"{said}\n\n{attempt.notice}" if attempt.notice else said


def _what_went_wrong(attempt: Attempt, timeout: float) -> str:
    out = cut_middle(attempt.output, FEEDBACK_CHARS // 2) if attempt.output.strip() else ""
    shown = f"\n\nIts output before that:\n{out}" if out else ""
    kind = attempt.error_kind
    if kind is ErrorKind.MISSING_MODULE:
        return (
            f"The code imports `{missing_module(attempt.error)}`, which is not installed here, "
            "and nothing can be installed. Do without it: use the standard library and only "
            f"the packages the instructions list.\n{cut_middle(attempt.error, FEEDBACK_CHARS)}"
        )
    lang = languages.get(attempt.language)
    if kind is ErrorKind.EMPTY:
        return (
            f"Your reply contained no {lang.title} code. "
            f"Reply with one fenced ```{lang.fences[0]} block."
        )
    if kind is ErrorKind.SYNTAX:
        if lang is not languages.PYTHON:
            return (
                f"The code is not valid {lang.title} (this runs in a {lang.title} kernel; "
                f"write {lang.title}, not another language):\n{attempt.error}"
            )
        return f"The code does not compile:\n{attempt.error}"
    if kind is ErrorKind.TIMEOUT:
        return (
            f"The code timed out after {timeout:g} s and was interrupted. "
            f"Make it finish faster (no infinite loops, no waiting for input).{shown}"
        )
    if kind is ErrorKind.KERNEL_DIED:
        return (
            f"The code brought the kernel down ({attempt.error}); it crashed, exited, "
            f"or ran out of memory.{shown}"
        )
    if kind is ErrorKind.OUTPUT_LIMIT:
        return (
            f"The code printed far too much output and was stopped. Print only the answer.{shown}"
        )
    if kind is ErrorKind.DISK_LIMIT:
        return (
            f"The code ran out of disk space: {attempt.error.splitlines()[-1]}. Write less: keep "
            f"data in memory, and write only the files the task asks for.{shown}"
        )
    if kind is ErrorKind.OUTPUT_LOST:
        return (
            "Some of the code's output could not be sent from the kernel (it ran short of "
            "memory), so its result cannot be seen. Print less, and free large objects before "
            f"printing.{shown}"
        )
    if kind is ErrorKind.UNCHECKED:
        return (
            "The code ran, but it no longer checks anything: an earlier version failed one of "
            "its own asserts, and this one simply has no asserts, so nothing shows it is right. "
            f"The assert that failed:\n{attempt.error.partition(chr(10))[2]}\n"
            "Keep asserts of the results the task asks for, and make them pass."
        )
    if kind is ErrorKind.EXAMPLE:
        return (
            f"{cut_middle(attempt.error, FEEDBACK_CHARS)}\nThese examples are part of the task: "
            "make the code give exactly these results."
        )
    said = f"Running the code raised an error:\n{cut_middle(attempt.error, FEEDBACK_CHARS)}{shown}"
    if kind is ErrorKind.EXCEPTION and attempt.examples:
        # The runner found the functions right on every example the task gives (runner.py).
        n = attempt.examples
        said += (
            f"\nYet the code's functions give exactly what the task's own example"
            f"{'s say' if n > 1 else ' says'} ({n} checked after the assert failed): the assert "
            "that failed is the program's own, and its expected value is the likelier mistake. "
            "Keep the functions; correct that assert's expected value or remove it."
        )
    return said


def missing_module(text: str) -> str:
    """The top-level module a ModuleNotFoundError names ('?' when it names none)."""
    found = _NO_MODULE.search(text)
    return found.group(1) if found else "?"


def system_prompt_for(settings: Settings, language: str = "python") -> str:
    """The default instructions, naming the data packages the kernels can import
    (another language's, in its own idiom)."""
    lang = languages.get(language)
    if lang is not languages.PYTHON:
        return lang.idiom
    python = str(settings.kernel_python) if settings.kernel_python else None
    have = files.importable_packages(python)
    listed = ", ".join(have) if have else "none"
    return (
        f"{SYSTEM_PROMPT}\nBesides the standard library you can import: {listed}. "
        "Nothing else is installed and nothing can be installed. Files you write in the "
        "working directory are given to the user; save plots with plt.savefig and show them "
        "with plt.show()."
    )


class RetryPolicy(Protocol):
    """Decides what the model is asked on each attempt, given the attempts so far."""

    name: str

    def request(
        self, task: str, history: list[Attempt], settings: Settings, system: str
    ) -> tuple[list[Message], float]:
        """The messages to send (opening with `system`) and the sampling temperature."""
        ...


@dataclass
class Conversation:
    """Keep the whole exchange: the model sees its previous code and what went wrong.

    Works best for large models, which read a traceback and fix the line at fault.
    """

    name: str = "conversation"
    retry_temperature: float = 0.2

    def request(
        self, task: str, history: list[Attempt], settings: Settings, system: str
    ) -> tuple[list[Message], float]:
        messages: list[Message] = [
            {"role": "system", "content": system},
            {"role": "user", "content": task},
        ]
        for attempt in history:
            messages.append({"role": "assistant", "content": attempt.reply or "(no reply)"})
            messages.append(
                {
                    "role": "user",
                    "content": feedback(attempt, settings.timeout)
                    + "\n\nFix the problem and reply with the complete corrected program."
                    + FROM_SCRATCH,
                }
            )
        return messages, 0.0 if not history else self.retry_temperature


@dataclass
class Regenerate:
    """Ask afresh from the task with only the end of the last error as a hint, sampling.

    Small models copy their previous answer when they see it; without it, and with some
    temperature, they try something different.
    """

    name: str = "regenerate"
    retry_temperature: float = 0.8
    hint_lines: int = 6
    checks_temperature: float = 0.2

    def request(
        self, task: str, history: list[Attempt], settings: Settings, system: str
    ) -> tuple[list[Message], float]:
        if history and history[-1].error_kind is ErrorKind.UNCHECKED:
            return add_checks(task, history[-1], settings, system), self.checks_temperature
        if history and own_check_failed(history[-1]):
            return fix_own_check(task, history[-1], settings, system), self.checks_temperature
        content = task
        if history:
            content += "\n\n" + self.advice(last_lines(history[-1], settings, self.hint_lines))
        messages: list[Message] = [
            {"role": "system", "content": system},
            {"role": "user", "content": content},
        ]
        return messages, 0.0 if not history else self.retry_temperature

    def advice(self, hint: str) -> str:
        """What follows the task on a retry."""
        if not hint:
            return (
                "A previous attempt at this task failed. Write a correct solution." + FROM_SCRATCH
            )
        return (
            f"A previous attempt at this task failed with:\n{hint}\nWrite a correct solution."
            + FROM_SCRATCH
        )


@dataclass
class Reconsider(Regenerate):
    """Regenerate, and say that a failing check of the model's own may be the wrong part.

    A retry happens only when the code's own checks fail; with a small model the check is
    often what is wrong (an expected value worked out badly), and "fix the code" then leads it
    to bend a right function to a wrong assert.
    """

    name: str = "reconsider"

    def advice(self, hint: str) -> str:
        shown = f" with:\n{hint}\n" if hint else ". "
        return (
            f"A previous attempt at this task failed{shown}"
            "The mistake may be in the solution or in one of its own checks (an assert whose "
            "expected value is wrong). Work out the correct result by hand, then write a "
            "correct solution with asserts that check it. Use only expected values you are "
            "sure of, such as examples given in the task." + FROM_SCRATCH
        )


@dataclass
class Review(Reconsider):
    """First retry: show the code and ask which part is wrong; later retries reconsider afresh.

    Copying its previous answer is a small model's habit; when the function was right and only
    its own check was wrong, copying the function and fixing the check is exactly what is needed.
    """

    name: str = "review"
    review_attempts: int = 1
    review_temperature: float = 0.3

    def request(
        self, task: str, history: list[Attempt], settings: Settings, system: str
    ) -> tuple[list[Message], float]:
        if not history or len(history) > self.review_attempts:
            return super().request(task, history, settings, system)
        last = history[-1]
        hint = last_lines(last, settings, self.hint_lines)
        messages: list[Message] = [
            {"role": "system", "content": system},
            {"role": "user", "content": task},
            {"role": "assistant", "content": last.reply or "(no reply)"},
            {
                "role": "user",
                "content": f"Running it failed with:\n{hint}\n"
                "Decide which part is wrong: the solution, or the check that failed (its "
                "expected value worked out badly). If the check is wrong, correct or remove it "
                "and keep the solution; otherwise fix the solution. "
                "Reply with the complete program." + FROM_SCRATCH,
            },
        ]
        return messages, self.review_temperature


def own_check_failed(attempt: Attempt) -> bool:
    """The code failed an assert of its own while its functions give what every example of
    the task says (the runner checked them after the failure)."""
    return attempt.error_kind is ErrorKind.EXCEPTION and attempt.examples > 0


def fix_own_check(task: str, failed: Attempt, settings: Settings, system: str) -> list[Message]:
    """Show code whose functions pass the task's own examples but whose own assert failed,
    and ask for the same functions with that assert corrected or removed.

    Regenerating from the task would throw the functions away, and a small model writes a
    new wrong expected value as readily as the old one (HumanEval/139: five attempts, each
    asserting another wrong `special_factorial(6)` of a right function). Without the assert,
    the task's examples still check the code.
    """
    return _shown_back(
        task,
        failed,
        settings,
        system,
        "these functions unchanged, and the assert that failed removed (or its expected value "
        "corrected, if you are sure of it).",
    )


def add_checks(task: str, unchecked: Attempt, settings: Settings, system: str) -> list[Message]:
    """Show code that ran clean but checks nothing, and ask for the same code with checks.

    Its solution may well be right: regenerating would throw it away, while a small model
    asked to repeat it keeps it, and the checks it adds decide.
    """
    return _shown_back(
        task,
        unchecked,
        settings,
        system,
        "this solution (unless it is wrong) with asserts added after it.",
    )


def _shown_back(
    task: str, attempt: Attempt, settings: Settings, system: str, wanted: str
) -> list[Message]:
    """The task, the attempt's reply as the model's own, what went wrong, and what to reply."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": task},
        {"role": "assistant", "content": attempt.reply or "(no reply)"},
        {
            "role": "user",
            "content": feedback(attempt, settings.timeout)
            + f"\n\nReply with the complete program: {wanted}",
        },
    ]


def last_lines(attempt: Attempt, settings: Settings, lines: int) -> str:
    """The last `lines` lines of what went wrong (0: none; a negative number: all of it)."""
    if lines == 0:
        return ""
    text = feedback(attempt, settings.timeout).splitlines()
    return "\n".join(text if lines < 0 else text[-lines:])


POLICIES: dict[str, Callable[[], RetryPolicy]] = {
    "conversation": Conversation,
    "regenerate": Regenerate,
    "reconsider": Reconsider,
    "review": Review,
}


def choose_policy(settings: Settings, backend: str) -> RetryPolicy:
    """`AUTOCODER_RETRY_POLICY`, or by backend: small local models reconsider, remote ones converse.

    Measured in docs/humaneval.md: for the embedded 0.5B model `reconsider` passes as many
    problems as `regenerate` and ends far less often in a "success" whose checks were wrong.
    """
    name = settings.retry_policy
    if name == "auto":
        name = "reconsider" if backend == "local" else "conversation"
    return POLICIES[name]()


CHANGE_COURSE_TEMPERATURE = 0.8


def repeated_failure(history: list[Attempt]) -> bool:
    """Whether the last two attempts failed the same way (same kind, same last line): the
    model is patching a program that keeps failing. An unchecked run is not a failure of its
    code, and its own remedy (add checks) is asked for elsewhere."""
    if len(history) < 2:
        return False
    a, b = history[-2], history[-1]
    return (
        a.status == b.status == "error"
        and a.error_kind is b.error_kind
        and a.error_kind not in {ErrorKind.UNCHECKED, ErrorKind.UNCERTAIN}
        and last_line(a.error) == last_line(b.error)
    )


def change_course(
    task: str, last: Attempt, settings: Settings, system: str
) -> tuple[list[Message], float]:
    """A fresh start from the task, sampled, saying what kept failing so it is not done again
    (no earlier code is shown: the model would patch it once more)."""
    said = last_line(feedback(last, settings.timeout))
    content = (
        f"{task}\n\nEarlier programs for this task kept failing with the same error:\n{said}\n"
        "Write a new program from scratch that solves the task another way. It runs on its own, "
        "in a fresh namespace: import and define everything it uses."
    )
    messages: list[Message] = [
        {"role": "system", "content": system},
        {"role": "user", "content": content},
    ]
    return messages, CHANGE_COURSE_TEMPERATURE
