"""The `%autocoder` door: generate, run and fix code in the user's own IPython kernel.

    %load_ext autocoder
    %autocoder plot a sine wave
    %%autocoder --attempts 3 --timeout 20
    load data.csv and show the five largest rows by "amount"

The magic is a thin door over the same `Runner` the CLI and the API use. What differs is where
the code runs: `ShellExecutor` runs it in the shell that runs the magic, so the code sees the
user's variables and leaves its results there (`reset()` does nothing, by design). That also
means it is not sandboxed: it runs with the kernel's own permissions and working directory,
like code the user typed.

Threads. The runner is async (the model is called over HTTP), and a kernel's event loop is
already running, so each `%autocoder` call starts its own event loop on a background thread
and runs the runner there. The kernel's main thread, which is executing the `%autocoder` cell,
waits on a queue meanwhile; whenever the runner needs something done in the user's shell
(run an attempt's code, show a status line) it queues it and the main thread does it. User
code therefore only ever runs on the main thread, as it would in a cell of its own.

Timeouts. While an attempt's code runs, a watchdog thread sends SIGINT to the main thread
when the deadline passes (and again every second until the code ends), which raises
KeyboardInterrupt inside the generated code only; the kernel and the user's variables
survive. Two limits follow, and users should know them:
- code that catches and ignores KeyboardInterrupt, or that sits in one long call into C code,
  cannot be stopped this way; press the interrupt button again, or restart the kernel;
- a failed attempt's partial side effects (variables it assigned, files it wrote, output it
  printed) stay: they happened in the user's session.
Pressing interrupt yourself while `%autocoder` works stops the whole run.

What the code shows (prints, displays, plots, the value of its last expression) appears in the
cell as it happens and is also recorded for the retry and the run record. A failed attempt's
traceback is not shown in full: it goes to the model, and the cell gets one status line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import DisplayHandle, display

from autocoder.errors import AutocoderError

# Start-up time: `%load_ext autocoder` costs about what IPython's own import does
# (bench/imports.py). What needs pydantic (the settings, the records) or the run loop is
# imported in the function that uses it, by the first prompt at the latest.
if TYPE_CHECKING:
    from autocoder.config import Settings
    from autocoder.records import Event, RunResult

CANCEL_GRACE = 10.0
"""Seconds an interrupted run may take to finish its record before the magic gives up on it."""
MAX_REMEMBERED = 64
"""How many prompts' working code a session keeps, so re-running their cells asks no model."""
MAX_CELLS = 2000
"""How many notebook cells' generated code `CellMemory` remembers across kernel restarts."""

log = logging.getLogger(__name__)


class Status:
    """One line per attempt in the cell, updated in place; runs on the main thread."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.total = 0
        self.lines: dict[int, DisplayHandle] = {}
        self.finished: set[int] = set()

    def show(self, event: Event) -> None:
        d, n = event.data, event.attempt or 0
        if event.type == "attempt_started":
            self.lines[n] = self._line(
                f"autocoder · attempt {n}/{d['max_attempts']}: asking the model…"
            )
            self.total = d["max_attempts"]
        elif event.type == "code_generated":
            lines = len(d["code"].splitlines())
            what = (
                f"running {lines} line(s) from {d['model']}…" if lines else "no code in the reply"
            )
            self._update(n, f"autocoder · attempt {n}/{self.total}: {what}")
        elif event.type == "attempt_finished":
            if d["status"] == "success":
                text = f"autocoder · attempt {n}/{self.total} ✓ succeeded in {d['duration']:.1f} s"
            else:
                text = f"autocoder · attempt {n}/{self.total} ✗ {_reason(d)}"
                if n < self.total:
                    text += " — retrying"
            self._update(n, text)
            self.finished.add(n)
        elif event.type == "run_finished":
            for n in sorted(set(self.lines) - self.finished):
                # The model failed, or the user interrupted, before this attempt had run.
                self._update(n, f"autocoder · attempt {n}/{self.total} ✗ {_reason(d)}")
            if self.record and d.get("notebook"):
                self._line(f"autocoder · recorded in {d['notebook']}")

    def _line(self, text: str) -> DisplayHandle:
        handle = display({"text/plain": text}, raw=True, display_id=True)
        assert handle is not None
        return handle

    def _update(self, n: int, text: str) -> None:
        handle = self.lines.get(n)
        if handle is None:
            self.lines[n] = self._line(text)
        else:
            handle.update({"text/plain": text}, raw=True)


def _reason(attempt: dict[str, Any]) -> str:
    """Why an attempt failed, in one line."""
    from autocoder.llm import clean_traceback  # start-up time (see the imports)
    from autocoder.records import ErrorKind

    kind = attempt.get("error_kind")
    if kind in {ErrorKind.TIMEOUT.value, ErrorKind.OUTPUT_LIMIT.value, ErrorKind.EMPTY.value}:
        return str(attempt["error"])
    lines = [ln for ln in clean_traceback(attempt.get("error") or "").splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else str(attempt.get("ename") or kind)
    return last if len(last) <= 200 else last[:199] + "…"


@dataclass
class Generated:
    """What `%autocoder` returns: the working code, shown as the cell's result.

    `x = %autocoder ...` keeps it: `x.code`, `x.value` (the value of the code's last
    expression, if any), `x.run` (the whole record: attempts, outputs, notebook).
    """

    code: str
    value: Any
    run: RunResult

    def __str__(self) -> str:
        return self.code

    def _repr_markdown_(self) -> str:
        return f"```python\n{self.code.rstrip()}\n```"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.code.rstrip("\n"))


class RunFailed(AutocoderError, RuntimeError):
    """Every attempt failed; `.run` holds them all. Shown as a few lines, not a traceback."""

    def __init__(self, run: RunResult) -> None:
        self.run = run
        why = _reason(run.model_dump(mode="json", exclude={"attempts"}))
        super().__init__(f"no working code after {len(run.attempts)} attempt(s): {why}")

    def _render_traceback_(self) -> list[str]:
        lines = [f"RunFailed: {self}"]
        if self.run.code:
            lines += [
                "The last attempt's code:",
                *("    " + ln for ln in self.run.code.splitlines()),
            ]
        return lines


# --- The magics -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 50:
        raise argparse.ArgumentTypeError(f"must be between 1 and 50, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


_TOKEN = re.compile(r"\S+")


def split_options(parser: argparse.ArgumentParser, line: str) -> tuple[list[str], str]:
    """The leading options of a magic line, and the prompt after them exactly as typed.

    Options come first (`%autocoder --attempts 3 plot ...`); everything from the first word
    that is neither an option nor an option's value is the prompt, quotes and dashes included.
    """
    # argparse has no public way to ask whether an option takes a value.
    actions = parser._option_string_actions
    options: list[str] = []
    pos = 0
    expect_value = False
    for match in _TOKEN.finditer(line):
        token = match.group()
        if expect_value:
            options.append(token)
            expect_value = False
        elif token == "--":
            pos = match.end()
            break
        elif token.startswith("-") and len(token) > 1 and not token[1:2].isdigit():
            options.append(token)
            action = actions.get(token.split("=", 1)[0])
            expect_value = "=" not in token and action is not None and action.nargs != 0
        else:
            pos = match.start()
            break
        pos = match.end()
    return options, line[pos:].strip()


def cell_id(shell: Any) -> str | None:
    """The id JupyterLab, VS Code and nbclient send with each cell's execute_request."""
    kernel = getattr(shell, "kernel", None)
    try:
        parent = kernel.get_parent("shell") if kernel is not None else {}
    except Exception:  # an ipykernel without get_parent, or no request in flight
        return None
    value = (parent.get("metadata") or {}).get("cellId")
    return value if isinstance(value, str) and value else None


class CellMemory:
    """Which cells already put their code in the cell below, kept on disk (AUTOCODER_HOME) so
    that Restart & Run All asks no model and inserts no second copy either. A cell is known by
    its id and a hash of its prompt and model: editing the prompt makes it new."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def _digest(key: tuple[str, str]) -> str:
        return hashlib.sha256("\0".join(key).encode("utf-8", "surrogatepass")).hexdigest()

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def knows(self, cell: str, key: tuple[str, str]) -> bool:
        return self._load().get(cell) == self._digest(key)

    def remember(self, cell: str, key: tuple[str, str]) -> None:
        cells = self._load()
        cells.pop(cell, None)
        cells[cell] = self._digest(key)
        while len(cells) > MAX_CELLS:
            del cells[next(iter(cells))]
        from autocoder.notebook import write_atomic  # start-up time (see the imports)

        try:
            write_atomic(self.path, json.dumps(cells))
        except OSError as e:  # remembering is a convenience: never fail the cell for it
            log.warning("autocoder: could not remember this cell in %s: %s", self.path, e)


@magics_class
class AutocoderMagics(Magics):
    """`%autocoder` and `%autocoder_config`. Settings are read from the environment once per
    session (the same variables as the CLI) and can be changed with `%autocoder_config`."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._settings: Settings | None = None
        self._record: bool | None = None
        self._made: dict[tuple[str, str], Generated] = {}

    @property
    def record(self) -> bool:
        """`%autocoder_config --record`, else AUTOCODER_MAGIC_RECORD."""
        return self.settings.magic_record if self._record is None else self._record

    @property
    def _shell(self) -> Any:
        assert self.shell is not None, "the magics are registered with a shell"
        return self.shell

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from autocoder.config import load_settings  # start-up time (see the imports)

            self._settings = _load(lambda: load_settings())
        return self._settings

    @magic_arguments()
    @argument("-h", "--help", action="store_true", help="show this help and do nothing else")
    @argument(
        "--attempts", type=_positive_int, metavar="N", help="most attempts (default: the session's)"
    )
    @argument(
        "--timeout", type=_positive_float, metavar="S", help="seconds each attempt's code may run"
    )
    @argument("--model", metavar="M", help="the model to ask (default: the session's)")
    @argument(
        "--record",
        action="store_true",
        help="also save the run as a notebook in the notebooks directory",
    )
    @argument(
        "--again",
        action="store_true",
        help="ask the model anew even if this prompt already has working code in this session",
    )
    @line_cell_magic
    def autocoder(self, line: str, cell: str | None = None) -> Generated | None:
        """Ask the model for code that does the task, run it here, and retry with the error if
        it fails. The code sees your variables and its results stay in your session; it runs
        with this kernel's permissions, not in autocoder's sandbox. The working code is
        shown, put in the next cell, and returned (x = %autocoder ...).

        Running the same prompt again (Run All, say) asks no model and runs nothing: the
        code was put in the next cell the first time, and that cell runs it. That holds after
        a kernel restart too, in front ends that send cell ids (JupyterLab, VS Code, nbclient):
        those cells are remembered in AUTOCODER_HOME. --again asks the model anew; so does a
        changed prompt.

        A timeout interrupts only the generated code; code that ignores KeyboardInterrupt
        cannot be stopped this way. A failed attempt's side effects stay in your session.

            %autocoder [options] TASK
            %%autocoder [options]
            TASK ...
        """
        options, prompt = split_options(self.autocoder.parser, line)
        args = self.autocoder.parser.parse_args(options)
        if args.help:
            print(_help(self.autocoder.__doc__))
            return None
        if cell is not None:
            prompt = f"{prompt}\n{cell}".strip()
        if not prompt:
            raise UsageError("say what the code should do: %autocoder TASK (see %autocoder --help)")
        if threading.current_thread() is not threading.main_thread():
            raise UsageError("%autocoder runs on the kernel's main thread only (not in a subshell)")
        key = (prompt, args.model or self.settings.model or "")
        made = None if args.again else self._made.get(key)
        cell = cell_id(self._shell)
        memory = CellMemory(self.settings.home / "magic-cells.json")
        if made is None and not args.again and cell is not None and memory.knows(cell, key):
            display(
                {
                    "text/plain": "autocoder · this cell's code was put in the cell below when "
                    "it first ran; that cell runs it (--again asks the model anew)"
                },
                raw=True,
            )
            return None
        if made is not None:
            display(
                {
                    "text/plain": "autocoder · this prompt's code is the one generated earlier "
                    "in this session, not run again (--again asks the model anew)"
                },
                raw=True,
            )
            return made
        run, value = self._run(prompt, args)
        if run.status != "success":
            from autocoder.records import ErrorKind  # start-up time (see the imports)

            if run.error_kind is ErrorKind.LLM and not any(a.code for a in run.attempts):
                raise UsageError(run.error)
            raise RunFailed(run)
        self._shell.set_next_input(run.code.rstrip("\n"), replace=False)
        if cell is not None:
            memory.remember(cell, key)
        made = Generated(code=run.code, value=value, run=run)
        self._made.pop(key, None)
        self._made[key] = made
        while len(self._made) > MAX_REMEMBERED:
            del self._made[next(iter(self._made))]
        return made

    def _run(self, prompt: str, args: argparse.Namespace) -> tuple[RunResult, Any]:
        """One run on a background loop while this (the main) thread does what it asks."""
        # Start-up time (see the imports): the run loop and what it uses.
        from autocoder.magic.shell import Interrupts, MainThread, OneShell, ShellExecutor
        from autocoder.namespace import task_with_names, user_names
        from autocoder.prompts import MAGIC_SYSTEM_PROMPT
        from autocoder.runner import Runner

        settings = self.settings
        shell = self._shell
        names = user_names(shell.user_ns, shell.user_ns_hidden)
        task = task_with_names(prompt, names)
        record = args.record or self.record
        main, interrupts = MainThread(), Interrupts()
        executor = ShellExecutor(shell, main, interrupts, settings)
        status = Status(record)

        async def on_event(event: Event) -> None:
            if event.type not in ("output", "token"):
                await main.call(lambda: status.show(event))

        async def go() -> RunResult:
            runner = Runner(settings, kernels=OneShell(executor))
            try:
                return await runner.run(
                    prompt,
                    task=task,
                    max_attempts=args.attempts,
                    timeout=args.timeout,
                    model=args.model,
                    on_event=on_event,
                    record=record,
                    system_prompt=MAGIC_SYSTEM_PROMPT,
                )
            finally:
                try:
                    await runner.close()
                finally:
                    main.close()

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="autocoder-loop", daemon=True)
        thread.start()
        try:
            with interrupts.installed():
                future = asyncio.run_coroutine_threadsafe(go(), loop)
                try:
                    main.serve(thread)
                except KeyboardInterrupt:
                    future.cancel()
                    # The run still records itself and may show a last status line.
                    main.serve(thread, deadline=time.monotonic() + CANCEL_GRACE)
                    raise
            try:
                return future.result(timeout=CANCEL_GRACE), executor.last_value
            except AutocoderError as e:  # a setting to fix, or the model endpoint unusable
                raise UsageError(str(e)) from None
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=CANCEL_GRACE)
            if not thread.is_alive():
                loop.close()

    @magic_arguments()
    @argument("--model", metavar="M", help="model name (AUTOCODER_MODEL)")
    @argument("--endpoint", metavar="URL", help="OpenAI-compatible base URL (OPENAI_BASE_URL)")
    @argument(
        "--attempts", type=_positive_int, metavar="N", help="most attempts (AUTOCODER_MAX_ATTEMPTS)"
    )
    @argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="seconds per attempt (AUTOCODER_TIMEOUT)",
    )
    @argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="save every run as a notebook",
    )
    @argument(
        "--reset",
        action="store_true",
        help="forget this session's changes; read the environment again",
    )
    @argument("-h", "--help", action="store_true", help="show this help")
    @line_magic
    def autocoder_config(self, line: str) -> None:
        """Show or change the settings `%autocoder` uses in this session.

        Anything not set here comes from the environment, as for the CLI. The API key is only
        ever read from OPENAI_API_KEY, and never shown.
        """
        args = self.autocoder_config.parser.parse_argstring(line)
        if args.help:
            print(_help(self.autocoder_config.__doc__))
            return
        if args.reset:
            self._settings, self._record = None, None
        changes = {
            key: value
            for key, value in {
                "model": args.model,
                "openai_base_url": args.endpoint,
                "max_attempts": args.attempts,
                "timeout": args.timeout,
            }.items()
            if value is not None
        }
        if changes:
            from autocoder.config import Settings  # start-up time (see the imports)

            current = self.settings.model_dump()
            self._settings = _load(lambda: Settings.model_validate({**current, **changes}))
        if args.record is not None:
            self._record = args.record
        print(describe(self.settings, self.record))


def _help(doc: str | None) -> str:
    """A magic's help as `%magic?` shows it, less the reStructuredText marker it starts with."""
    return (doc or "").removeprefix("::").strip("\n")


def _load(make: Callable[[], Settings]) -> Settings:
    from pydantic import ValidationError  # start-up time (see the imports)

    try:
        return make()
    except ValidationError as e:
        err = e.errors()[0]
        where = str(err["loc"][0]) if err["loc"] else "a setting"
        raise UsageError(f"{where}: {err['msg']}") from None


def describe(settings: Settings, record: bool) -> str:
    """The session's settings as `%autocoder_config` shows them; the API key only as set or not."""
    from autocoder.config import DEFAULT_OPENAI_URL  # start-up time (see the imports)

    if settings.uses_remote_endpoint:
        endpoint = settings.openai_base_url or DEFAULT_OPENAI_URL
        model = settings.model or "(the endpoint's default)"
    else:
        endpoint = "the embedded local model (set OPENAI_BASE_URL for another)"
        model = settings.model or settings.local_model
    key = "set" if settings.api_key else "not set"
    where = f"in {settings.notebooks_dir}/" if record else "off"
    return "\n".join(
        [
            "autocoder settings for this session:",
            f"  endpoint  {endpoint}",
            f"  model     {model}",
            f"  api key   {key} (OPENAI_API_KEY)",
            f"  attempts  {settings.max_attempts}",
            f"  timeout   {settings.timeout:g} s per attempt",
            f"  record    {where}",
        ]
    )


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext autocoder`: register the magics, nothing else."""
    ipython.register_magics(AutocoderMagics)
