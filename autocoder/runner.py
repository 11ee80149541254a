"""The run loop: generate → check → run → record → retry. What the model is asked on each
attempt is prompts.py's."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from autocoder import bundle, candidates, disk, examples, files, languages
from autocoder import llm as llm_mod
from autocoder.config import Settings
from autocoder.errors import ConfigError, DiskFull, LLMError
from autocoder.files import InputFile
from autocoder.inside import asserts
from autocoder.kernel.backend import KernelLedger
from autocoder.kernel.output import OutputCallback
from autocoder.llm import LLM, Message, clean_traceback, cut_middle, extract_code
from autocoder.notebook import notebook_path, write_atomic, write_notebook, write_record
from autocoder.prompts import (
    FEEDBACK_CHARS,
    SYSTEM_PROMPT,
    RetryPolicy,
    change_course,
    choose_policy,
    own_check_failed,
    repeated_failure,
    system_prompt_for,
)
from autocoder.records import Attempt, ErrorKind, Event, Execution, Origin, RunResult

if TYPE_CHECKING:
    from autocoder.kernel.pool import KernelSource

VIEW_TIMEOUT = 20.0
EventSink = Callable[[Event], Awaitable[None] | None]


def new_run_id() -> str:
    """Sortable by time, unique across processes, and safe as a file name."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class Executor(Protocol):
    """Where code runs: a `kernel.client.Kernel`, or the user's own shell for the magic."""

    workdir: Path | None

    async def execute(
        self,
        code: str,
        *,
        timeout: float,
        max_output_bytes: int | None = None,
        on_output: OutputCallback | None = None,
    ) -> Execution: ...

    async def reset(self) -> None:
        """Make the next attempt start from a clean namespace (or do nothing, by design)."""
        ...


E = TypeVar("E", bound=Executor)


class ExecutorProvider(Protocol[E]):
    """Hands out executors no other run has used, and takes them back.

    `fresh`: each executor is a new kernel with nothing in it, and any number can be had at
    once, so an attempt's candidates can each run in their own. A session's kernel, or the
    user's shell, keeps state: there a run draws one candidate per attempt.
    """

    fresh: bool

    async def acquire(self) -> E: ...

    async def release(self, executor: E) -> None: ...

    async def close(self) -> None: ...


def dropped_checks(history: list[Attempt], code: str) -> Attempt | None:
    """The earlier attempt whose failing assert this code got past by checking nothing at all.

    Deleting the check that fails is the cheapest "fix" there is, and small models take it
    often: such a run would report success with code nothing has checked.
    """
    failed = next((a for a in reversed(history) if a.ename == "AssertionError"), None)
    if failed is None:
        return None
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    return None if asserts.has_checks(tree) else failed


def agreement(attempt: Attempt | None) -> int:
    """How many of the attempt's candidates produced its answer (0: none ran cleanly)."""
    if attempt is None or attempt.group != 1:
        return 0
    return 1 + sum(1 for other in attempt.others if other.group == 1)


@dataclass
class _Drawn:
    """A candidate that has run, what it produced (None unless it ran cleanly), and where."""

    attempt: Attempt
    produced: candidates.Produced | None
    workdir: Path | None


def _tally(drawn: list[_Drawn]) -> candidates.Tally:
    """The vote of the candidates drawn so far; those that passed the prompt's examples vouched."""
    return candidates.tally([d.produced for d in drawn], [d.attempt.examples > 0 for d in drawn])


def _closest(drawn: list[_Drawn]) -> int:
    """When none ran cleanly, the candidate the retry hears about: the first whose functions
    gave what the prompt's examples say, if only its own assert failed (it is shown back to
    be kept, prompts.fix_own_check), else the first."""
    return next((i for i, d in enumerate(drawn) if own_check_failed(d.attempt)), 0)


class Runner:
    """Runs prompts to completion. One Runner can serve many concurrent runs."""

    def __init__(
        self,
        settings: Settings,
        *,
        llm: LLM | None = None,
        kernels: ExecutorProvider[Any] | None = None,
        policy: RetryPolicy | None = None,
        ledger: KernelLedger | None = None,
    ) -> None:
        self.settings = settings
        self._llm = llm
        self._llm_lock = asyncio.Lock()
        self.ledger = ledger
        if kernels is None:
            # Start-up time: the magic runs code in its own shell and never needs jupyter_client.
            from autocoder.kernel.pool import KernelSource

            kernels = KernelSource(settings, ledger=ledger)
        self.kernels: ExecutorProvider[Any] = kernels
        self.policy = policy
        # Kernels of other languages start on demand, one provider each.
        self._others: dict[str, KernelSource] = {}

    def provider(self, language: str) -> ExecutorProvider[Any]:
        """Who hands out kernels for `language` (Python's is the one the Runner was given)."""
        if language == "python":
            return self.kernels
        if language not in self._others:
            from autocoder.kernel.pool import KernelSource  # start-up time, as in __init__

            self._others[language] = KernelSource(
                self.settings, language=language, ledger=self.ledger
            )
        return self._others[language]

    async def llm(self) -> LLM:
        async with self._llm_lock:
            if self._llm is None:
                self._llm = await llm_mod.connect(self.settings)
            return self._llm

    async def close(self) -> None:
        if self._llm is not None:
            await self._llm.close()
        for other in self._others.values():
            await other.close()
        await self.kernels.close()

    async def run(
        self,
        prompt: str,
        *,
        max_attempts: int | None = None,
        timeout: float | None = None,
        model: str | None = None,
        on_event: EventSink | None = None,
        run_id: str | None = None,
        record: bool = True,
        system_prompt: str | None = None,
        inputs: Sequence[InputFile] = (),
        task: str | None = None,
        kernels: ExecutorProvider[Any] | None = None,
        session_id: str = "",
        language: str = "python",
        candidates: int | None = None,
        code: str | None = None,
    ) -> RunResult:
        """Run one prompt. Failures of the code are in the result; ConfigError means fix a setting.

        With `record=False` nothing is written (no notebook, no code files). `system_prompt`
        replaces the default one when the code runs somewhere else than a fresh kernel.
        `task` is what the model is asked when it says more than the prompt the record and the
        notebook's title keep (the magic adds the names in the user's session).
        `inputs` are copied into the kernel's working directory (read-only) before the first
        attempt and described to the model; files.FileRefused when they break a limit.
        A session passes its own `kernels` (the same kernel for each of its runs) and its
        `session_id`, which the record carries. `language` is one of languages.NAMES that
        this installation runs (languages.resolve checks that; doors call it first).
        `candidates` is how many programs each attempt draws (default AUTOCODER_CANDIDATES;
        see candidates.py); a run whose kernels keep state (a session's, the magic's) draws one.

        `code` given: that code is the run's one attempt, run as it is — the model is neither
        asked nor started, nothing is retried, one candidate — and the record's `origin` is
        "code"; everything else (kernels, events, limits, the record) is a run's as ever.
        """
        lang = languages.get(language)
        files.check_inputs(inputs, self.settings)
        if record:
            await asyncio.to_thread(disk.check_room, self.settings)
        if code is not None:
            max_attempts = 1
        settings = self.settings.model_copy(
            update={
                k: v
                for k, v in {"max_attempts": max_attempts, "timeout": timeout}.items()
                if v is not None
            }
        )
        run = _Run(self, settings, prompt, run_id or new_run_id(), on_event, model, record)
        run.kernels = kernels or self.provider(lang.name)
        run.session_id = session_id
        run.language = lang
        run.given = code
        if system_prompt is None and code is None:
            system_prompt = await asyncio.to_thread(system_prompt_for, settings, lang.name)
        run.system_prompt = system_prompt or ""
        run.inputs = list(inputs)
        run.task = task or prompt
        run.asked_candidates = candidates
        if lang is languages.PYTHON and code is None and run.kernels.fresh:
            # Only in a kernel of the run's own: the check calls the code's functions, which
            # in a session's kernel or the user's could change the state the next prompt sees.
            run.examples = await asyncio.to_thread(examples.find, prompt)
        return await run.go()


class _Run:
    """One run's state; lives only as long as `Runner.run`."""

    def __init__(
        self,
        runner: Runner,
        settings: Settings,
        prompt: str,
        run_id: str,
        on_event: EventSink | None,
        model: str | None,
        record: bool,
    ) -> None:
        self.runner = runner
        self.kernels: ExecutorProvider[Any] = runner.kernels
        self.session_id = ""
        self.settings = settings
        self.prompt = prompt
        # Numbers the prompt gives; a candidate that repeats them says nothing more by it.
        self.given_numbers = frozenset(candidates.values(prompt or ""))
        self.run_id = run_id
        self.on_event = on_event
        self.model_override = model
        self.record = record
        self.system_prompt = SYSTEM_PROMPT
        self.inputs: list[InputFile] = []
        self.task = prompt
        self.files: list[Any] = []
        self.attempts: list[Attempt] = []
        self.kernel: Executor | None = None
        self.kernel_task: asyncio.Task[Executor] | None = None
        self.workdir = ""
        self.code_dir = settings.autofile_dir.resolve() / run_id
        self.started = self.current_started = time.monotonic()
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.model = ""
        self.backend = ""
        self.language = languages.PYTHON
        self.notice = ""
        self.asked_candidates: int | None = None
        self.k = 1
        # The candidates of the attempt under way, as they are drawn (a cancel keeps them).
        self.drawing: list[Attempt] = []
        # With several candidates each has its own kernel; their working directories wait
        # here until the attempt's answer is known (its directory is kept with the run).
        self.candidate_dirs: list[Path] = []
        self.answer_dir: Path | None = None
        # The code to run when the caller gave it (no model then); None: the model writes it.
        self.given: str | None = None
        # The prompt's worked examples, run against each program that runs cleanly.
        self.examples: tuple[examples.Example, ...] = ()

    async def emit(self, type_: Any, attempt: int | None = None, **data: Any) -> None:
        if self.on_event is None:
            return
        result = self.on_event(Event(type=type_, run_id=self.run_id, attempt=attempt, data=data))
        if inspect.isawaitable(result):
            await result

    async def go(self) -> RunResult:
        await self.emit(
            "run_started",
            prompt=self.prompt,
            max_attempts=self.settings.max_attempts,
            timeout=self.settings.timeout,
            origin=self.origin,
        )
        error_kind: ErrorKind | None = None
        error = ""
        try:
            # The kernel starts while the model is connected to (the client's import, the
            # embedded model's start) and thinks.
            self.kernel_task = asyncio.create_task(self.kernels.acquire())
            model: LLM | None = None
            policy: RetryPolicy | None = None
            if self.given is None:
                model = await self.runner.llm()
                self.model = self.model_override or model.model or await model.resolve_model()
                self.backend = model.backend
                if self.kernels.fresh:
                    self.k = candidates.how_many(
                        self.asked_candidates, self.settings.candidates, model.backend
                    )
                await self.describe_inputs()
                policy = self.runner.policy or choose_policy(self.settings, model.backend)
            for number in range(1, self.settings.max_attempts + 1):
                attempt = await self.attempt(number, model, policy)
                self.attempts.append(attempt)
                await self.emit(
                    "attempt_finished",
                    number,
                    **attempt.model_dump(
                        mode="json", exclude={"reply": True, "others": {"__all__": {"reply"}}}
                    ),
                )
                # An uncertain answer already had its candidates: more would not settle it.
                if attempt.status == "success" or attempt.error_kind is ErrorKind.UNCERTAIN:
                    break
        except (LLMError, ConfigError) as e:
            error_kind, error = ErrorKind.LLM, str(e)
            if isinstance(e, ConfigError) and not self.attempts:
                await self._release()
                raise
        except asyncio.CancelledError:
            error_kind, error = ErrorKind.CANCELLED, "the run was cancelled"
            self._keep_cancelled_attempt(error)
            await asyncio.shield(self._finish(error_kind, error))
            raise
        except DiskFull:
            self.record = False  # nothing of it is kept: no file without its record
            await asyncio.shield(self._release())
            await asyncio.to_thread(self._forget)
            raise
        except BaseException:
            # Our own failure (a kernel that cannot start, say): no record, but no leak either.
            await asyncio.shield(self._release())
            raise
        return await asyncio.shield(self._finish(error_kind, error))

    def _tokens(self, number: int) -> llm_mod.OnToken | None:
        """The model's reply as it is written, as `token` events (when anyone listens)."""
        if self.on_event is None:
            return None

        async def on_token(text: str) -> None:
            await self.emit("token", number, text=text)

        return on_token

    def _keep_cancelled_attempt(self, error: str) -> None:
        """The attempt a cancel interrupted is part of the record: its code ran (its file is
        on disk) and its output may have been streamed already; so are its other candidates."""
        drawn, self.drawing = self.drawing, []
        if not drawn:
            return
        for candidate in drawn:
            if candidate.status == "error" and candidate.error_kind is None:
                candidate.error_kind = ErrorKind.CANCELLED
                candidate.error = error
        attempt = drawn[0]
        attempt.others = drawn[1:]
        attempt.status = "error"
        attempt.error_kind = ErrorKind.CANCELLED
        attempt.error = error
        attempt.duration = time.monotonic() - self.current_started
        self.attempts.append(attempt)

    async def describe_inputs(self) -> None:
        """Tell the model about the inputs: in a fresh Python kernel, with what pandas makes of
        the data files, read there (under the sandbox's limits, never in this process), while
        the model has not been asked yet; elsewhere by their first lines."""
        if not self.inputs:
            return
        views: dict[str, str] = {}
        code = files.view_code(self.inputs) if self.language is languages.PYTHON else None
        if code and self.kernels.fresh:
            kernel = await self.get_kernel()
            seen = await kernel.execute(
                code, timeout=min(self.settings.timeout, VIEW_TIMEOUT), max_output_bytes=1 << 16
            )
            views = files.parse_views(seen.text)
            await kernel.reset()
        self.task = f"{self.task}\n\n{files.describe(self.inputs, views)}"

    @property
    def origin(self) -> Origin:
        return "model" if self.given is None else "code"

    async def attempt(self, number: int, model: LLM | None, policy: RetryPolicy | None) -> Attempt:
        """One attempt: its code written by `model` (asked as `policy` says), or, when the
        caller gave the code (no model, no policy), that code; then checked and run."""
        await self.emit(
            "attempt_started",
            number,
            max_attempts=self.settings.max_attempts,
            candidates=self.k,
            model=self.model,
            backend=self.backend,
        )
        start = self.current_started = time.monotonic()
        if model is None or policy is None:
            attempt = await self.take_given(number)
        elif self.k == 1:
            messages, temperature = self.request(policy)
            attempt = await self.write(number, 1, messages, temperature, model)
        else:
            messages, temperature = self.request(policy)
            attempt = await self.draw_candidates(number, messages, temperature, model)
        if self.k == 1:  # several candidates have run in draw_candidates, each in its kernel
            if attempt.error_kind is None:
                kernel = await self.get_kernel()
                if number > 1:
                    await kernel.reset()
                await self.run_code(attempt, kernel, stream=True)
            attempt.group = 1 if attempt.status == "success" else 0
        self.drawing = []
        attempt.duration = time.monotonic() - start
        return attempt

    def request(self, policy: RetryPolicy) -> tuple[list[Message], float]:
        """What the model is asked next: the policy's request, unless the last two attempts
        failed the same way, when another patch would likely fail again: then a fresh start."""
        if repeated_failure(self.attempts):
            return change_course(self.task, self.attempts[-1], self.settings, self.system_prompt)
        return policy.request(self.task, self.attempts, self.settings, self.system_prompt)

    async def draw_candidates(
        self, number: int, messages: list[Message], temperature: float, model: LLM
    ) -> Attempt:
        """The attempt's candidates, each in its own kernel: a first round, and the rest only
        when the first does not settle it; the answer is the result most of them produced."""
        first = candidates.first_round(self.k)
        drawn = await self.draw(number, range(1, first + 1), messages, temperature, model)
        tally = _tally(drawn)
        if not tally.settled() and first < self.k:
            more = range(first + 1, self.k + 1)
            drawn += await self.draw(number, more, messages, temperature, model)
            tally = _tally(drawn)
        for group, members in enumerate(tally.groups, 1):
            for i in members:
                drawn[i].attempt.group = group
        chosen = drawn[tally.chosen if tally.clean else _closest(drawn)]
        attempt = chosen.attempt
        attempt.others = [d.attempt for d in drawn if d is not chosen]
        if tally.clean and not tally.certain:
            attempt.status = "error"
            attempt.error_kind = ErrorKind.UNCERTAIN
            attempt.error = candidates.disagreement(
                tally, [d.attempt for d in drawn], [d.produced for d in drawn]
            )
        # The answer's files stay with the run (until a later attempt answers instead).
        self.answer_dir = chosen.workdir
        await asyncio.to_thread(self._drop_candidate_dirs, keep=chosen.workdir)
        return attempt

    async def draw(
        self,
        number: int,
        indices: range,
        messages: list[Message],
        temperature: float,
        model: LLM,
    ) -> list[_Drawn]:
        tasks = [
            asyncio.create_task(self.own_candidate(number, i, messages, temperature, model))
            for i in indices
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def own_candidate(
        self, number: int, index: int, messages: list[Message], temperature: float, model: LLM
    ) -> _Drawn:
        """One candidate in a kernel of its own: the kernel starts while the model writes
        the code, and its processes end as soon as the code has run, before what it wrote is
        read (nothing can change it then)."""
        getting: asyncio.Task[Executor] | None = None
        kernel: Executor | None = None
        try:
            # All candidates are asked at once: an endpoint serves them in parallel, the
            # embedded model's server generates them together in one batch.
            getting = asyncio.create_task(self.fresh_kernel(adopt=number == 1 and index == 1))
            attempt = await self.write(number, index, messages, temperature, model)
            if attempt.error_kind is None:
                kernel = await getting
                await self.run_code(attempt, kernel, stream=index == 1)
        finally:
            if getting is not None and kernel is None:
                # A kernel still starting is let finish, then shut down (see _release).
                with contextlib.suppress(BaseException):
                    kernel = await getting
            if kernel is not None:
                await asyncio.shield(self.kernels.release(kernel))
        attempt.duration = time.monotonic() - self.current_started
        workdir = kernel.workdir if kernel is not None else None
        produced = None
        if attempt.status == "success":
            names = [f.name for f in self.inputs]
            produced = await asyncio.to_thread(
                candidates.produced, attempt.outputs, workdir, names, self.given_numbers
            )
        return _Drawn(attempt, produced, workdir)

    async def fresh_kernel(self, *, adopt: bool) -> Executor:
        """A kernel of one candidate's own, its inputs in place: the first candidate of a run
        takes the kernel the run started with (it may have read the inputs already)."""
        if adopt and (self.kernel is not None or self.kernel_task is not None):
            kernel = await self.get_kernel()
            self.kernel = self.kernel_task = None
        else:
            kernel = await self.kernels.acquire()
            try:
                if self.inputs and kernel.workdir is not None:
                    await asyncio.to_thread(files.place, self.inputs, kernel.workdir)
            except BaseException:
                await asyncio.shield(self.kernels.release(kernel))
                raise
        if kernel.workdir is not None:
            self.candidate_dirs.append(kernel.workdir)
        return kernel

    def _drop_candidate_dirs(self, keep: Path | None = None) -> None:
        """Candidates' working directories, all but `keep`, once their kernels have ended."""
        for workdir in self.candidate_dirs:
            if workdir != keep:
                disk.remove(workdir)  # a budget's tmpfs is unmounted first
        self.candidate_dirs = [keep] if keep is not None else []

    async def write(
        self, number: int, index: int, messages: list[Message], temperature: float, model: LLM
    ) -> Attempt:
        """Ask the model for one candidate and check its code without running it: an attempt
        whose `error_kind` is still None is ready to run."""
        temperature, seed = candidates.sampling(number, index, temperature, self.k)
        completion = await model.complete(
            messages,
            temperature=temperature,
            max_tokens=self.settings.max_tokens,
            model=self.model_override,
            on_token=self._tokens(number) if index == 1 else None,  # the first candidate only
            seed=seed,
        )
        self.model = completion.model or self.model
        lang = self.language
        code = extract_code(completion.text, lang.fences, any_fence=lang is not languages.PYTHON)
        attempt = Attempt(
            number=number,
            candidate=index,
            status="error",
            language=lang.name,
            code=code,
            reply=completion.text,
            llm_duration=completion.duration,
            tokens=completion.completion_tokens,
            model=self.model,
            temperature=temperature,
        )
        name = f"generated_code_{number}" + (f"_{index}" if index > 1 else "")
        await self.check(
            attempt,
            name,
            model=self.model,
            llm_duration=completion.duration,
            tokens=completion.completion_tokens,
            candidate=index,
        )
        return attempt

    async def take_given(self, number: int) -> Attempt:
        """The caller's code as the run's attempt, checked as the model's would be."""
        code = self.given or ""
        attempt = Attempt(number=number, status="error", language=self.language.name, code=code)
        await self.check(attempt, "given_code", origin="code")
        if attempt.error_kind is ErrorKind.EMPTY:
            attempt.error = "no code was given"
        return attempt

    async def check(self, attempt: Attempt, name: str, **event: Any) -> None:
        """Keep an attempt's code (its file, a `code_generated` event) and check it without
        running it: an attempt whose `error_kind` is still None is ready to run."""
        number, code, lang = attempt.number, attempt.code, self.language
        self.drawing.append(attempt)
        self.drawing.sort(key=lambda a: a.candidate)
        if code and self.record:
            attempt.filename = str(self.code_dir / f"{name}{lang.suffix}")
            # In a thread: its fsync waits on the disk, and the loop serves every other run.
            try:
                await asyncio.to_thread(write_atomic, Path(attempt.filename), code)
            except OSError as e:
                if disk.no_space(e):  # nor would its record fit: the run ends here
                    raise self._disk_full(self.settings.autofile_dir) from e
                raise
        await self.emit("code_generated", number, code=code, **event)
        if not code:
            attempt.error_kind = ErrorKind.EMPTY
            attempt.error = "the model's reply contained no code"
        elif lang.check is not None and (
            syntax := await asyncio.to_thread(lang.check, code)
            if lang is not languages.PYTHON
            else lang.check(code)
        ):
            attempt.error_kind = ErrorKind.SYNTAX
            attempt.ename = syntax.ename
            attempt.error = "\n".join(syntax.traceback)
            attempt.outputs = [{"output_type": "error", **syntax.model_dump()}]

    async def run_code(self, attempt: Attempt, kernel: Executor, *, stream: bool) -> None:
        """Run a candidate's code; only one candidate per attempt streams its output. Then
        check it: by the prompt's examples where it gives any, else by its own asserts not
        having been dropped (an attempt that passed the user's examples is checked by them,
        whatever became of the asserts the model wrote)."""
        await self.execute(attempt, kernel, stream)
        if attempt.status != "success":
            if self.examples and attempt.ename == "AssertionError":
                await self.examples_despite_assert(attempt, kernel)
            return
        if self.examples:
            await self.check_examples(attempt, kernel)
            if attempt.status != "success" or attempt.examples:
                return
        if failed := dropped_checks(self.attempts, attempt.code):
            attempt.status = "error"
            attempt.error_kind = ErrorKind.UNCHECKED
            attempt.error = (
                f"the code has no asserts left; attempt {failed.number}'s assert failed:\n"
                + "\n".join(failed.error.splitlines()[-3:])
            )

    async def call_examples(self, kernel: Executor) -> Execution:
        """Call the code's functions on the prompt's examples, in the kernel where it ran."""
        return await kernel.execute(
            examples.check_code(self.examples),
            timeout=self.settings.timeout,
            max_output_bytes=1 << 16,
        )

    async def examples_despite_assert(self, attempt: Attempt, kernel: Executor) -> None:
        """A program that failed an assert of its own may still give what the prompt's
        examples say (its functions were defined before the assert). Then the assert's expected
        value, worked out by the model, is the likelier mistake, and the retry is told so
        (prompts.py): a small model otherwise bends a right function to its wrong check."""
        seen = await self.call_examples(kernel)
        result = examples.read(seen.text) if seen.kind is None else None
        if result is not None and result.checked and not result.failed:
            attempt.examples = result.checked

    async def check_examples(self, attempt: Attempt, kernel: Executor) -> None:
        """Call the code's functions on the prompt's examples, where the code has just run:
        a result other than the one the prompt gives fails the attempt."""
        seen = await self.call_examples(kernel)
        if seen.kind is not None:  # the calls hung, exited or took the kernel down
            attempt.status = "error"
            attempt.error_kind = ErrorKind.EXAMPLE
            how = (
                f"did not finish within {self.settings.timeout:g} s"
                if seen.kind is ErrorKind.TIMEOUT
                else f"failed ({seen.kind.value}"
                + (f": {seen.error.ename}" if seen.error else "")
                + ")"
            )
            attempt.error = f"The code ran, but calling it on the task's examples {how}: " + (
                "; ".join(map(str, self.examples))
            )
            return
        result = examples.read(seen.text)
        if result is None:
            return
        attempt.examples = result.checked
        if result.failed:
            attempt.status = "error"
            attempt.error_kind = ErrorKind.EXAMPLE
            attempt.error = examples.error(result)

    async def execute(self, attempt: Attempt, kernel: Executor, stream: bool) -> None:
        number = attempt.number
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[Any]] = set()

        kept = 0

        def on_output(out: dict[str, Any]) -> None:
            # What ran so far stays with the attempt should the run be cancelled mid-way,
            # up to the output limit (the result replaces it when the code ends).
            nonlocal kept
            text = str(out.get("text", ""))
            if kept + len(text) <= self.settings.max_output_bytes:
                kept += len(text)
                attempt.outputs.append(out)
                if out.get("output_type") == "stream" and out.get("name") == "stdout":
                    attempt.output += text
            if stream and self.on_event is not None:
                fut = asyncio.ensure_future(self.emit("output", number, **out), loop=loop)
                pending.add(fut)
                fut.add_done_callback(pending.discard)

        result: Execution = await kernel.execute(
            attempt.code, timeout=self.settings.timeout, on_output=on_output
        )
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        attempt.outputs = result.outputs
        attempt.output = result.text
        attempt.stderr = result.stderr
        attempt.truncated = result.truncated
        attempt.exec_duration = result.duration
        attempt.notice = result.notice
        if result.ok:
            attempt.status = "success"
            return
        attempt.error_kind = result.kind
        attempt.ename = result.error.ename if result.error else None
        if attempt.ename == "ModuleNotFoundError" and result.kind is ErrorKind.EXCEPTION:
            attempt.error_kind = ErrorKind.MISSING_MODULE
        if result.kind is ErrorKind.TIMEOUT:
            attempt.error = f"timed out after {self.settings.timeout:g} s"
        elif result.kind is ErrorKind.OUTPUT_LIMIT:
            attempt.error = (
                f"output exceeded {self.settings.max_output_bytes:,} bytes "
                "(AUTOCODER_MAX_OUTPUT_BYTES) and was cut"
            )
        elif result.kind is ErrorKind.OUTPUT_LOST:
            attempt.error = "part of the output was lost in the kernel: it could not be sent"
        elif result.kind is ErrorKind.DISK_LIMIT:
            said = clean_traceback(result.error.traceback) if result.error else ""
            attempt.error = f"{said}\n{disk.budget_words(self.settings)}".lstrip("\n")
        elif result.kind is ErrorKind.KERNEL_DIED:
            detail = result.error.evalue if result.error else ""
            attempt.error = "kernel died" + (f": {detail}" if detail else "")
        elif result.error is not None and self.language.clean_error is not None:
            attempt.error = self.language.clean_error(result.error)
        elif result.error is not None:
            attempt.error = clean_traceback(result.error.traceback) or (
                f"{result.error.ename}: {result.error.evalue}"
            )

    async def get_kernel(self) -> Executor:
        if self.kernel is None:
            assert self.kernel_task is not None
            self.kernel = await self.kernel_task
            if self.inputs and self.kernel.workdir is not None:
                await asyncio.to_thread(files.place, self.inputs, self.kernel.workdir)
        return self.kernel

    async def _release(self) -> None:
        task, self.kernel_task = self.kernel_task, None
        if task is not None and self.kernel is None:
            # A kernel still starting is let finish, then shut down: tearing one down
            # half-started races jupyter_client's channel threads.
            with contextlib.suppress(BaseException):
                self.kernel = await task
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            await self.kernels.release(kernel)
            if kernel.workdir is not None:
                # In a thread: a budget's files are copied to the disk.
                await asyncio.to_thread(self._keep_workdir, kernel.workdir)
        if self.candidate_dirs:
            # Several candidates: their kernels have ended; the answer's directory is kept.
            answer, self.answer_dir = self.answer_dir, None
            await asyncio.to_thread(self._drop_candidate_dirs, keep=answer)
            if answer is not None:
                await asyncio.to_thread(self._keep_workdir, answer)

    def _keep_workdir(self, workdir: Path) -> None:
        """Files the code wrote stay with the run's record, as far as the disk keeps room for
        the record beside them (the record says what was left out); an empty directory goes."""
        try:
            if not self.record:
                disk.remove(workdir)
                return
            target = self.code_dir / "files"
            # Room for this record (every attempt's output, in the record and the notebook)
            # and for the records of runs going on beside it.
            reserve = disk.RECORD_ROOM + 2 * self.settings.max_output_bytes * len(self.attempts)
            kept = disk.keep(workdir, target, reserve)
            self.notice = kept.words(self.settings.autofile_dir.resolve())
            if kept.kept:
                self.workdir = str(target)
                self.files = files.list_outputs(target, (f.name for f in self.inputs))
        except OSError:
            pass

    def _write(self, result: RunResult, path: Path) -> None:
        """The notebook and the record. Should the disk be full, the run's own files go first,
        then its outputs (the record says so); a run that still cannot be recorded leaves
        nothing behind and ends as DiskFull."""
        making_room = [self._drop_files, self._drop_outputs]
        while True:
            try:
                write_notebook(result, path)
                write_record(result, self.settings.notebooks_dir)
                break
            except OSError as e:
                if not disk.no_space(e):
                    raise
                if not making_room:
                    self._forget(path)
                    raise self._disk_full(self.settings.notebooks_dir) from e
            making_room.pop(0)(result)
        # Copies, for the notebook to re-run where it is: never at the cost of the next run.
        room = disk.budget_bytes(self.settings) + disk.RECORD_ROOM
        bundle.write_run_folder(result, path, self.inputs, reserve=room)

    def _drop_files(self, result: RunResult) -> None:
        if not result.workdir:
            return
        disk.remove(Path(result.workdir))
        result.workdir, result.files = "", []
        self.workdir, self.files = "", []
        result.notice = _joined(
            result.notice,
            "The files the code wrote were removed to make room for this record (the disk "
            "was full).",
        )

    def _drop_outputs(self, result: RunResult) -> None:
        for attempt in result.attempts:
            attempt.outputs = []
            attempt.output = cut_middle(attempt.output, FEEDBACK_CHARS)
            attempt.stderr = cut_middle(attempt.stderr, FEEDBACK_CHARS)
        result.outputs = []
        result.output = cut_middle(result.output, FEEDBACK_CHARS)
        result.notice = _joined(
            result.notice,
            f"The outputs were left out of this record and cut to {FEEDBACK_CHARS:,} "
            "characters of text to make room for it (the disk was full).",
        )

    def _forget(self, notebook: Path | None = None) -> None:
        """Remove what a run that cannot be recorded wrote: nothing would point at it."""
        shutil.rmtree(self.code_dir, ignore_errors=True)
        if notebook is not None:
            notebook.unlink(missing_ok=True)

    def _disk_full(self, where: Path) -> DiskFull:
        return DiskFull(
            f"run {self.run_id} could not be recorded: the disk holding {str(where.resolve())!r} "
            f"is full ({disk.megabytes(disk.free_bytes(where))} free); free some space there "
            "and run it again"
        )

    async def _finish(self, error_kind: ErrorKind | None, error: str) -> RunResult:
        await self._release()
        last = self.attempts[-1] if self.attempts else None
        success = last is not None and last.status == "success"
        if not success and error_kind is None and last is not None:
            error_kind, error = last.error_kind, last.error
        result = RunResult(
            status="success" if success else "error",
            filename=last.filename if last else "",
            code=last.code if last else "",
            output=last.output if last else "",
            error="" if success else error,
            error_kind=None if success else error_kind,
            run_id=self.run_id,
            prompt=self.prompt,
            language=self.language.name,
            model=self.model,
            backend=self.backend,
            attempts=self.attempts,
            workdir=self.workdir,
            files=self.files,
            outputs=last.outputs if last else [],
            started_at=self.started_at,
            duration=time.monotonic() - self.started,
            session_id=self.session_id,
            origin=self.origin,
            timeout=self.settings.timeout,
            notice=self.notice,
            candidates=1 + len(last.others) if last else 0,
            agreement=agreement(last),
        )
        if self.record:
            # Absolute, so a reader finds it whatever directory they are in.
            named = self.prompt or ("code" if self.given is not None else "")
            path = notebook_path(self.settings.notebooks_dir.resolve(), self.run_id, named)
            result.notebook = str(path)
            # In a thread: their fsyncs would hold every other run on this loop meanwhile.
            await asyncio.to_thread(self._write, result, path)
        await self.emit("run_finished", **result.model_dump(mode="json", exclude={"attempts"}))
        return result


def _joined(*sentences: str) -> str:
    return " ".join(s for s in sentences if s)
