"""The command-line door: `autocoder run|chat|serve|mcp|kernels|model`. Translates errors to exit codes.

Exit codes: 0 success, 1 every attempt failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import errno
import gc
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from autocoder import __version__
from autocoder.errors import AutocoderError, ConfigError

# Start-up time: `autocoder --help` prints before anything but argparse is imported
# (bench/imports.py). What needs pydantic (the settings, the records), asyncio or the engine
# is imported in the command that uses it.
if TYPE_CHECKING:
    from autocoder.config import Settings
    from autocoder.records import Event, RunResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Progress:
    """Short per-attempt progress lines on stderr, so stdout stays the result."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.model_named = False

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"autocoder: {text}", file=sys.stderr, flush=True)

    def name_model(self, backend: str, model: str) -> None:
        """Which model answers, said once (a chat's prompts all ask the same one)."""
        if not self.model_named:
            self.model_named = True
            self.say(f"using the {backend} model {model}")

    def __call__(self, event: Event) -> None:
        from autocoder.records import ErrorKind  # start-up time (see the imports)

        d = event.data
        n = event.attempt
        if event.type == "attempt_started":
            self.name_model(d["backend"], d["model"])
            self.say(f"attempt {n}/{d['max_attempts']}: generating…")
        elif event.type == "code_generated":
            lines = len(d["code"].splitlines())
            which = f"attempt {n}" + (f", candidate {d['candidate']}" if d["candidate"] > 1 else "")
            self.say(
                f"{which}: {d['model']} wrote {lines} line(s) in {d['llm_duration']:.1f} s; running…"
            )
        elif event.type == "attempt_finished":
            others = d.get("others") or []
            if others:
                agree = 1 + sum(1 for o in others if o["group"] == 1) if d["group"] == 1 else 0
                self.say(f"attempt {n}: {agree} of {1 + len(others)} candidates agree")
            if d["status"] == "success":
                held = f" ({_held(d['examples'])})" if d.get("examples") else ""
                self.say(f"attempt {n}: succeeded in {d['duration']:.1f} s{held}")
            elif d["error_kind"] == ErrorKind.UNCERTAIN.value and any(o["group"] for o in others):
                self.say(f"attempt {n}: not sure: the candidates disagree")
            elif d["error_kind"] == ErrorKind.UNCERTAIN.value:
                self.say(f"attempt {n}: not sure: only one candidate ran cleanly")
            else:
                detail = (d.get("error") or "").splitlines()
                what = d.get("ename") or (detail[0].rstrip(":") if detail else "")
                self.say(f"attempt {n}: failed ({d['error_kind']}: {what})")


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"autocoder: error: {message}", file=sys.stderr)
    raise SystemExit(code)


# Settings a flag can give, by the flag's dest: an error in one names the flag the user typed.
FLAG_SETTINGS = {
    "timeout": "timeout",
    "attempts": "max_attempts",
    "candidates": "candidates",
    "model": "model",
    "notebooks_dir": "notebooks_dir",
    "autofile_dir": "autofile_dir",
    "sandbox": "sandbox",
    "kernel_python": "kernel_python",
    "host": "host",
    "port": "port",
}


def _settings(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError  # start-up time (see the imports)

    from autocoder.config import load_settings

    overrides = {field: getattr(args, dest, None) for dest, field in FLAG_SETTINGS.items()}
    try:
        return load_settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = next((d for d, f in FLAG_SETTINGS.items() if f == field), None)
        if flag and overrides[field] is not None:
            name = "--" + flag.replace("_", "-")
        elif field:
            name = field if field.isupper() else "AUTOCODER_" + field.upper()
        else:
            name = "a setting"
        _fail(f"{name}: {err['msg']}")


def ready_settings(args: argparse.Namespace) -> Settings:
    """Settings for a command that saves runs: its directories exist and can be written to
    (ConfigError otherwise), checked before any code runs rather than when it is saved."""
    from autocoder.config import prepare_dirs  # start-up time (see the imports)

    settings = _settings(args)
    prepare_dirs(settings)
    return settings


NOT_UTF8 = "the prompt is not valid UTF-8"


def _read_prompt(words: Sequence[str]) -> str:
    """The prompt from argv, stdin or the terminal; bytes that are not UTF-8 are refused here,
    where the user can be told, rather than failing inside the request to the model."""
    if words:
        text = " ".join(words)
    elif sys.stdin is None:
        text = ""
    elif not sys.stdin.isatty():
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            _fail(NOT_UTF8)
    else:
        try:
            text = input("Enter your prompt: ")
        except EOFError:
            text = ""
        except UnicodeDecodeError:
            _fail(NOT_UTF8)
    try:
        # Python hands argv (and a terminal in the C locale) over with undecodable bytes as
        # lone surrogates; they would not survive the trip to the model.
        text.encode("utf-8")
    except UnicodeEncodeError:
        _fail(NOT_UTF8)
    return text.strip()


def _shown(result: RunResult, text: str) -> str:
    """The answer's text as a terminal can show it: each image the code displayed becomes a
    line saying so and where it is, in place of its text (a plot's is only
    `<Figure size 640x480 with 1 Axes>`)."""
    if not any(_image(out) for out in result.outputs):
        return text
    parts = []
    for out in result.outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            parts.append(str(out.get("text", "")))
        elif out.get("output_type") in {"display_data", "execute_result"}:
            image = _image(out)
            plain = out.get("data", {}).get("text/plain")
            if image:
                parts.append(f"[image: {image}, in the notebook {result.notebook}]\n")
            elif isinstance(plain, str):
                parts.append(plain if plain.endswith("\n") else plain + "\n")
    return "".join(parts)


def _image(out: dict[str, Any]) -> str:
    """`PNG, 534x413 px` for an output that carries an image (its size when its header says)."""
    data = out.get("data") or {}
    kind = next((k for k in data if isinstance(k, str) and k.startswith("image/")), "")
    if not kind:
        return ""
    name = kind.removeprefix("image/").split("+")[0].upper()
    try:
        head = base64.b64decode(str(data[kind])[:32])
    except ValueError:
        return name
    if kind == "image/png" and head[12:16] == b"IHDR":
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        return f"{name}, {width}x{height} px"
    return name


def _held(n: int) -> str:
    from autocoder import examples  # start-up time (see the imports)

    return examples.held(n)


def _print_result(result: RunResult) -> None:
    from autocoder.records import ErrorKind  # start-up time (see the imports)

    rule = "─" * 60
    last = result.attempts[-1] if result.attempts else None
    if result.code:
        print(f"{rule}\ncode ({result.filename})\n{rule}")
        print(result.code.rstrip("\n"))
    if result.status == "success":
        print(f"{rule}\noutput\n{rule}")
        print(_shown(result, result.output).rstrip("\n"))
    elif result.error_kind is ErrorKind.UNCERTAIN:
        print(f"{rule}\noutput (not sure of it)\n{rule}")
        print(result.output.rstrip("\n"))
        print(f"{rule}\n{result.error.rstrip()}")
    else:
        print(f"{rule}\nerror after {len(result.attempts)} attempt(s)\n{rule}")
        print(result.error.rstrip("\n"))
        if last is not None and last.output.strip():
            print(f"{rule}\noutput\n{rule}\n{_shown(result, last.output).rstrip()}")
    print(rule)
    if result.candidates > 1:
        print(f"{result.agreement} of {result.candidates} candidates agree")
    if result.status == "success" and last is not None and last.examples:
        print(_held(last.examples))
    print(f"notebook: {result.notebook}")
    if result.workdir:
        print(f"files:    {result.workdir}")
        for f in result.files:
            print(f"          {f.name} ({f.size:,} bytes, {f.media_type})")
    if result.notice:
        print(f"note:     {result.notice}")


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio  # start-up time (see the imports)

    from autocoder import disk, files, languages
    from autocoder.config import prepare_dirs
    from autocoder.records import ErrorKind

    settings = _settings(args)
    if "kernel_start" not in settings.model_fields_set:
        # One run, one kernel: booting a zygote to fork it costs at least what exec'ing the
        # kernel does (bench/cli.py prints both), and leaves nothing warm behind to reuse.
        settings = settings.model_copy(update={"kernel_start": "exec"})
    prompt = _read_prompt(args.prompt)
    if not prompt:
        _fail("no prompt given (pass it as an argument, on stdin, or type it when asked)")
    if len(prompt) > settings.max_prompt_chars:
        _fail(
            f"the prompt has {len(prompt):,} characters; the limit is "
            f"{settings.max_prompt_chars:,} (AUTOCODER_MAX_PROMPT_CHARS)"
        )
    try:
        language = languages.resolve(args.language, settings)
    except languages.LanguageUnavailable as e:
        _fail(str(e))
    try:
        inputs = files.read_local(args.file or [], settings)
    except files.FileRefused as e:
        _fail(str(e))
    prepare_dirs(settings)
    disk.check_room(settings)
    progress = Progress(not args.quiet)
    from autocoder import sandbox  # start-up time (see the imports)

    # The sandbox's probe (a confined `python -c pass`, which open_engine then finds done)
    # runs while the engine is imported: both come before the kernel can start.
    with concurrent.futures.ThreadPoolExecutor(1) as probing:
        probe = probing.submit(sandbox.check_available, settings)
        from autocoder.engine import open_engine  # start-up time, as the sandbox

        probe.result()

    async def go() -> RunResult:
        # The server's store: with AUTOCODER_DATABASE_URL every replica lists this run at once.
        async with open_engine(settings, pool_size=0) as engine:
            # The model is connected to inside the run, while its kernel starts; the first
            # attempt's event names it.
            return await engine.run(
                prompt,
                listed_model=settings.model or "",
                on_event=progress,
                inputs=inputs,
                language=language.name,
            )

    result = asyncio.run(go())
    if result.error_kind is ErrorKind.LLM and not any(a.code for a in result.attempts):
        _fail(result.error)
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        _print_result(result)
    return EXIT_OK if result.status == "success" else EXIT_FAILED


CHAT_PROMPT = "autocoder> "
HISTORY_LINES = 1000


def _print_turn(result: RunResult) -> None:
    """One prompt's answer in a chat: the code that ran and what it printed, or why it failed."""
    if result.code:
        print(result.code.rstrip("\n"))
        print("─" * 60)
    if result.status == "success":
        if result.output.strip():
            print(_shown(result, result.output).rstrip("\n"))
    else:
        last = (result.error or "it failed").strip().splitlines()
        print(f"failed ({result.error_kind.value if result.error_kind else 'error'}): {last[-1]}")
    for attempt in result.attempts:
        if attempt.notice:
            print(f"note: {attempt.notice}")
    for f in result.files:
        print(f"file: {f.name} ({f.size:,} bytes)")


def _readline_history(settings: Settings) -> Any:
    """Up-arrow history across chats (in AUTOCODER_HOME); None when readline is missing."""
    try:
        import readline
    except ImportError:
        return None
    path = settings.home / "chat_history"
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    return save


def _chat_input(prompt: str) -> str:
    """input(), which a Ctrl-C always interrupts.

    CPython's readline waits for a key in select() and looks at signals only when select()
    is interrupted. A SIGINT that lands after the prompt is drawn and before select() is
    entered (the process preempted there, under load) is noted, then forgotten, and the
    prompt waits for a key (1 Ctrl-C in 12 in the chat's test under load). A thread that
    hears every signal through the wakeup fd interrupts the main thread again when it still
    waits there.
    """
    import select  # start-up time: only the chat reads prompts
    import socket
    import threading

    main = threading.main_thread().ident
    main_tid = threading.get_native_id()
    heard, hear = socket.socketpair()
    hear.setblocking(False)
    waiting = threading.Event()
    waiting.set()

    def watch() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        while waiting.is_set():
            if not select.select([heard], [], [], 0.5)[0]:
                continue
            if signal.SIGINT not in heard.recv(64):
                continue
            # The main thread, if the signal woke it, leaves input() at once; one still asleep
            # in select() a moment later did not see it.
            select.select([], [], [], 0.2)
            if waiting.is_set() and _in_select(main_tid) and main is not None:
                signal.pthread_kill(main, signal.SIGINT)

    old = signal.set_wakeup_fd(hear.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="autocoder-prompt", daemon=True)
    watcher.start()
    try:
        return input(prompt)
    finally:
        waiting.clear()
        signal.set_wakeup_fd(old)
        with contextlib.suppress(OSError):
            hear.send(b"\0")  # the watcher wakes, and ends
        watcher.join(2)
        heard.close()
        hear.close()


def _in_select(tid: int) -> bool:
    """Whether thread `tid` of this process sleeps in select() (readline's wait for a key)."""
    try:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return f.read().startswith(("poll_schedule_timeout", "do_select", "core_sys_select"))
    except OSError:
        return False


def cmd_chat(args: argparse.Namespace) -> int:
    """A prompt loop in one session: each prompt sees what the earlier ones left.

    Ctrl-C stops the prompt that is running (the session stays); at the prompt, Ctrl-C or
    Ctrl-D leaves. The session's notebook path is printed at the end.
    """
    import asyncio  # start-up time (see the imports)

    from autocoder import files
    from autocoder.engine import Engine, open_engine
    from autocoder.records import ErrorKind
    from autocoder.sessions import Session, SessionError

    settings = _settings(args)
    # A chat lasts as long as its user keeps it (up to AUTOCODER_SESSION_MAX_AGE), not the
    # server's idle timeout, and it is one session whatever AUTOCODER_MAX_SESSIONS says.
    settings = settings.model_copy(
        update={"session_idle_timeout": settings.session_max_age, "max_sessions": 1}
    )
    try:
        inputs = files.read_local(args.file or [], settings)
    except files.FileRefused as e:
        _fail(str(e))
    progress = Progress(not args.quiet)
    save_history = _readline_history(settings) if sys.stdin.isatty() else None
    opened = contextlib.AsyncExitStack()
    engine: Engine | None = None
    session: Session | None = None
    failed = False

    async def start() -> Session:
        nonlocal engine
        engine = await opened.enter_async_context(open_engine(settings, pool_size=0))
        model = await engine.runner.llm()
        progress.name_model(model.backend, await model.resolve_model())
        return await engine.sessions.create(inputs=inputs, timeout=args.timeout, model=args.model)

    async def turn(prompt: str) -> RunResult | None:
        assert engine is not None and session is not None
        engine.sessions.claim(session.info.session_id)
        try:
            return await engine.sessions.run(
                session, prompt, max_attempts=args.attempts, on_event=progress
            )
        except asyncio.CancelledError:
            return None  # Ctrl-C: the run is recorded as cancelled; the session goes on

    async def stop() -> None:
        await opened.aclose()

    with asyncio.Runner() as loop:
        # Ctrl-C at the prompt must reach the main thread, blocked in input(). The kernel may
        # hand a process's SIGINT to an idle worker thread instead (when the main thread has
        # another signal pending); there it only sets a flag, and input() never returns.
        loop.get_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(
                initializer=signal.pthread_sigmask, initargs=(signal.SIG_BLOCK, {signal.SIGINT})
            )
        )
        try:
            session = loop.run(start())
            progress.say(
                f"session {session.info.session_id}: each prompt sees what the earlier ones "
                "left; Ctrl-C stops a prompt, Ctrl-D leaves"
            )
            while True:
                try:
                    prompt = _chat_input(CHAT_PROMPT).strip()
                except (EOFError, KeyboardInterrupt):
                    print()
                    break
                if not prompt:
                    continue
                if len(prompt) > settings.max_prompt_chars:
                    progress.say(
                        f"the prompt has {len(prompt):,} characters; the limit is "
                        f"{settings.max_prompt_chars:,} (AUTOCODER_MAX_PROMPT_CHARS)"
                    )
                    continue
                result = loop.run(turn(prompt))
                if result is None:
                    progress.say("interrupted; the session is still there")
                    continue
                if result.error_kind is ErrorKind.LLM and not any(a.code for a in result.attempts):
                    progress.say(result.error)
                    failed = True
                    continue
                failed = result.status != "success"
                _print_turn(result)
        except SessionError as e:
            progress.say(str(e))
            failed = True
        except KeyboardInterrupt:
            print()
        finally:
            if save_history is not None:
                save_history()
            loop.run(stop())
    if session is not None:
        print(f"session notebook: {session.info.notebook}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from autocoder.api import serve  # start-up time: FastAPI and uvicorn only to serve

    serve(ready_settings(args))
    return EXIT_OK


def cmd_mcp(args: argparse.Namespace) -> int:
    """The MCP server over stdio, until the client closes stdin: what MCP clients launch."""
    from autocoder.mcp.server import serve_stdio  # start-up time: the MCP SDK only here

    serve_stdio(ready_settings(args))
    return EXIT_OK


def cmd_kernels_install(args: argparse.Namespace) -> int:
    """autocoder's kernelspecs, and the ones its notebooks name, where Jupyter finds them."""
    # Start-up time, as in cmd_run.
    from autocoder.kernel.local import install_kernelspecs, install_notebook_kernelspecs

    settings = _settings(args)
    try:
        installed = (
            [] if args.notebooks else install_kernelspecs(user=args.user, prefix=args.prefix)
        )
        for_notebooks = install_notebook_kernelspecs(settings, user=args.user, prefix=args.prefix)
    except OSError as e:
        where = f" under {args.prefix!r}" if args.prefix else ""
        hint = " (or use --user)" if e.errno == errno.EACCES and not args.user else ""
        _fail(f"cannot install the kernelspecs{where}: {e.strerror or e}{hint}")
    for path in installed:
        print(path)
    for name, dest, why in for_notebooks:
        print(f"{name:<8} {dest}" if dest else f"{name:<8} not installed: {why}")
    return EXIT_OK


def cmd_kernels_list(args: argparse.Namespace) -> int:
    """Which languages this installation can run, and what installs the others."""
    from autocoder import languages  # start-up time (see the imports)

    found = languages.availability(_settings(args))
    if args.json:
        print(json.dumps([dataclasses.asdict(a) for a in found], indent=2))
        return EXIT_OK
    for a in found:
        if a.available:
            print(f"{a.language:<11} yes  kernelspec {a.kernel}")
        else:
            print(f"{a.language:<11} no   {a.title}: {a.reason}")
    return EXIT_OK


def cmd_model_info(args: argparse.Namespace) -> int:
    from autocoder import local_model  # start-up time: llama.cpp's bindings only here

    info: dict[str, Any] = local_model.model_info(_settings(args))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key + ':':<10} {value}")
    return EXIT_OK


def cmd_model_serve(args: argparse.Namespace) -> int:
    from autocoder import local_model  # start-up time: llama.cpp's bindings only here
    from autocoder.config import writable_dir

    settings = _settings(args)
    writable_dir(settings.home, "embedded model", "AUTOCODER_HOME")
    local_model.serve_forever(settings, args.port)
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see `{self.prog} --help`)")


def _add_run_options(p: argparse.ArgumentParser, *, what: str) -> None:
    """The options `run` and `chat` share: each prompt of a chat is a run."""
    p.add_argument(
        "--attempts", type=int, metavar="N", help="max attempts per prompt (AUTOCODER_MAX_ATTEMPTS)"
    )
    p.add_argument(
        "--timeout", type=float, metavar="S", help="seconds per attempt (AUTOCODER_TIMEOUT)"
    )
    p.add_argument("--model", help="model name (AUTOCODER_MODEL)")
    p.add_argument("--notebooks-dir", metavar="DIR", help="where run notebooks go")
    p.add_argument("--autofile-dir", metavar="DIR", help="where attempt code files go")
    p.add_argument("--sandbox", choices=["bwrap", "none"], help="AUTOCODER_SANDBOX")
    p.add_argument(
        "--file",
        action="append",
        metavar="PATH",
        help=f"give {what} this file, read-only in its working directory (repeatable)",
    )
    p.add_argument(
        "--kernel-python",
        metavar="PYTHON",
        help="run the kernels with this interpreter (AUTOCODER_KERNEL_PYTHON)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autocoder",
        description="Turn a plain-English prompt into working Python code, run in a Jupyter kernel.",
    )
    parser.add_argument("--version", action="version", version=f"autocoder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="generate and run code for a prompt")
    run.add_argument("prompt", nargs="*", help="the task; asked for interactively when omitted")
    run.add_argument("--json", action="store_true", help="print the result as the API's JSON")
    run.add_argument(
        "--candidates",
        type=int,
        metavar="K",
        help="programs drawn per attempt, each run in a fresh kernel; the answer is the result "
        "most agree on (AUTOCODER_CANDIDATES; default 5 for the embedded model, 1 for an endpoint)",
    )
    run.add_argument(
        "--language",
        "-l",
        metavar="LANG",
        help="write and run the code in this language: python (default), bash, javascript, "
        "typescript, r (`autocoder kernels list` says which are installed)",
    )
    _add_run_options(run, what="the code")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser(
        "chat", help="a prompt loop in one session: each prompt sees what the earlier ones left"
    )
    _add_run_options(chat, what="the session")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="run the HTTP API (POST /run)")
    serve.add_argument("--host", help="bind address (AUTOCODER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (AUTOCODER_PORT, default 5005)")
    serve.add_argument("--sandbox", choices=["bwrap", "none"], help="AUTOCODER_SANDBOX")
    serve.set_defaults(func=cmd_serve)

    mcp = sub.add_parser(
        "mcp",
        help="serve autocoder's tools to AI agents over MCP on stdin/stdout "
        "(what an MCP client's configuration launches)",
    )
    mcp.add_argument("--sandbox", choices=["bwrap", "none"], help="AUTOCODER_SANDBOX")
    mcp.add_argument("--timeout", type=float, metavar="S", help="default seconds per call")
    mcp.add_argument("--notebooks-dir", metavar="DIR", help="where run notebooks go")
    mcp.add_argument("--autofile-dir", metavar="DIR", help="where runs' files go")
    mcp.set_defaults(func=cmd_mcp)

    kernels = sub.add_parser("kernels", help="manage the kernelspecs autocoder ships")
    ksub = kernels.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    install = ksub.add_parser("install", help="install them where Jupyter finds them")
    install.add_argument("--user", action="store_true", help="into the user's Jupyter data dir")
    install.add_argument("--prefix", help="into this prefix (e.g. sys.prefix of a venv)")
    install.add_argument(
        "--notebooks",
        action="store_true",
        help="only the kernelspecs the run notebooks name (bash, deno, ir), for a JupyterLab "
        "outside this environment; not autocoder's own",
    )
    install.set_defaults(func=cmd_kernels_install)
    klist = ksub.add_parser("list", help="which languages this installation can run, and why not")
    klist.add_argument("--json", action="store_true")
    klist.add_argument("--sandbox", choices=["bwrap", "none"], help="AUTOCODER_SANDBOX")
    klist.set_defaults(func=cmd_kernels_list)

    model = sub.add_parser("model", help="the embedded local model")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = msub.add_parser("info", help="which model answers, and whether it is verified")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_model_info)
    mserve = msub.add_parser("serve", help="expose the embedded model as an OpenAI endpoint")
    mserve.add_argument("--port", type=int, default=8080)
    mserve.set_defaults(func=cmd_model_serve)
    return parser


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM ends a run like Ctrl-C does: kernels are shut down on the way out."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        # The command ends here: the interpreter's last collections would walk every object
        # its imports made (openai's and pydantic's types), 0.3-0.6 s of a one-shot run's wall.
        gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as e:
        _fail(str(e))
    except AutocoderError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("autocoder: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): end quietly, as a tool killed by SIGPIPE would,
        # with stdout pointed at /dev/null so the interpreter's last flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
