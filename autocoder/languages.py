"""What differs per language: its kernel, its fences, its prompt, its syntax check, its errors.

The run loop, the timeout and interrupt, the notebook and the retries do not care which
Jupyter kernel answers; everything that does lives here, one `Language` each, so adding a
language touches this module (and ships its kernelspecs in kernels/). Python is one of
them, with what it always had.

A language is available when its kernel is installed here (`available()` says why one is
not, with the command that installs it). Syntax checks run the language's own parser on the
server, never the code: `bash -n`, `deno check` (parse errors only; type errors are left to
the kernel, which does not type-check either), R's `parse()`.
"""

from __future__ import annotations

import ast
import base64
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocoder.errors import AutocoderError, KernelStartError
from autocoder.records import ErrorInfo

if TYPE_CHECKING:
    from autocoder.config import Settings

CHECK_TIMEOUT = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


@dataclass(frozen=True)
class Language:
    """One language autocoder can run, and the kernel that runs it."""

    name: str
    title: str
    kernel: str  # kernels/autocoder-<kernel>[-sandbox]
    fences: tuple[str, ...]
    suffix: str
    idiom: str
    install: str
    kernelspec: dict[str, str]
    language_info: dict[str, Any]
    check: Callable[[str], ErrorInfo | None] | None = None
    missing: Callable[[Settings], str | None] = field(default=lambda settings: None)
    # How the kernel is given the code (bash: in a subshell that stops at the first failure).
    wrap: Callable[[str], str] = field(default=lambda code: code)
    clean_error: Callable[[ErrorInfo], str] | None = None
    # Run before a retry to clear what the last attempt left: "" nothing to clear, None
    # no cheap way (a fresh kernel). Python's is PYTHON_RESET.
    reset_code: str | None = ""
    # A cell that fails with this message: what a failed run's notebook ends with.
    # The kernel may publish output after its idle status (Deno's console output does).
    late_output: bool = False
    # Its kernel is ipykernel: it can be forked from the zygote and served by the gateway's
    # AUTOCODER_GATEWAY_KERNEL; other kernels are exec'd on the server's host.
    ipykernel: bool = False
    fail: Callable[[str], str] = field(default=lambda message: f"raise RuntimeError({message!r})")
    # A cell that makes the folder `name` (beside the notebook) the working directory, and
    # does nothing when it is not there (run twice, or from inside the folder already).
    enter_dir: Callable[[str], str] = field(default=lambda name: _python_enter(name))

    # The kernelspecs under bwrap and unconfined, when they are not autocoder-<kernel>[-sandbox].
    kernel_names: tuple[str, str] | None = None

    def kernel_name(self, settings: Settings) -> str:
        bwrap = settings.sandbox == "bwrap"
        if self.kernel_names is not None:
            return self.kernel_names[0] if bwrap else self.kernel_names[1]
        return f"autocoder-{self.kernel}{'-sandbox' if bwrap else ''}"


def kernels_dir() -> Path:
    """The kernelspecs we ship: inside the package when installed, at the repo root in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "autocoder-sandbox" / "kernel.json").is_file():
            return candidate
    raise KernelStartError(f"autocoder's kernelspecs are missing (looked in {here / 'kernels'})")


_ENTER_WHY = "the files this notebook's code reads and writes are in the folder beside it"


def _python_enter(name: str) -> str:
    return f"# {_ENTER_WHY}\nimport os\n\nif os.path.isdir({name!r}):\n    os.chdir({name!r})"


def _scrubbed_env() -> dict[str, str]:
    """What a syntax checker is started with: no secret, no colour."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    env.update(NO_COLOR="1", HOME=tempfile.gettempdir(), DENO_NO_UPDATE_CHECK="1")
    return env


def _run_check(argv: list[str], code: str, **kw: Any) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            argv,
            input=code,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            env=_scrubbed_env(),
            check=False,
            **kw,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None  # no checker: the kernel will say


def _syntax_error(message: str) -> ErrorInfo:
    lines = [ln.rstrip() for ln in _ANSI.sub("", message).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Stack backtrace", "   0: "))]
    return ErrorInfo(
        ename="SyntaxError", evalue=lines[0] if lines else "syntax error", traceback=lines
    )


def check_python(code: str) -> ErrorInfo | None:
    """Compile without running; IPython magics (`%`, `!`) are left to the kernel, and a
    top-level `await` passes, as IPython runs it."""
    if any(line.lstrip().startswith(("%", "!")) for line in code.splitlines()):
        return None
    try:
        compile(code, "<autocoder>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError as e:
        where = f"line {e.lineno}" if e.lineno else "somewhere"
        lines = [f'  File "<autocoder>", {where}']
        if e.text:
            lines.append("    " + e.text.rstrip("\n"))
            if e.offset:
                lines.append("    " + " " * (e.offset - 1) + "^")
        lines.append(f"{type(e).__name__}: {e.msg}")
        return ErrorInfo(ename=type(e).__name__, evalue=str(e.msg), traceback=lines)
    except (ValueError, OverflowError) as e:
        return ErrorInfo(ename="SyntaxError", evalue=str(e), traceback=[f"SyntaxError: {e}"])
    return None


def check_bash(code: str) -> ErrorInfo | None:
    done = _run_check(["bash", "-n"], code)
    if done is None or done.returncode == 0:
        return None
    return _syntax_error(done.stderr.replace("bash: ", "", 1) or "bash -n failed")


def _check_deno(suffix: str) -> Callable[[str], ErrorInfo | None]:
    def check(code: str) -> ErrorInfo | None:
        deno = shutil.which("deno")
        if deno is None:
            return None
        with tempfile.TemporaryDirectory(prefix="autocoder-check-") as tmp:
            path = Path(tmp, f"cell{suffix}")
            path.write_text(code, encoding="utf-8")
            # No remote or npm module is fetched: the check never reaches the network.
            done = _run_check(
                [deno, "check", "--no-remote", "--no-npm", "-q", path.name], "", cwd=tmp
            )
        if done is None or done.returncode == 0 or "SyntaxError" not in done.stderr:
            return None
        return _syntax_error(
            done.stderr.replace(f"file://{path}", "<cell>").replace("error: ", "", 1)
        )

    return check


def check_r(code: str) -> ErrorInfo | None:
    done = _run_check(
        ["Rscript", "-e", 'invisible(parse(file("stdin"), keep.source = FALSE))'], code
    )
    if done is None or done.returncode == 0:
        return None
    text = done.stderr.replace("Execution halted", "").replace(
        'Error in parse(file("stdin"), keep.source = FALSE) : ', ""
    )
    return _syntax_error(text)


def _bash_wrap(code: str) -> str:
    """In a subshell: the first failing command stops it with its status, as an exception
    stops Python, and an `exit` ends the subshell, not the kernel's shell. On one line, as
    base64: bash_kernel sends a cell line by line and waits for each prompt (~50 ms a line)."""
    encoded = base64.b64encode(code.encode("utf-8")).decode("ascii")
    return f'(set -eo pipefail; eval "$(printf %s {encoded} | base64 -d)")'


def _bash_error(error: ErrorInfo) -> str:
    status = error.evalue or error.ename or "?"
    return f"the script stopped with exit status {status} (its stderr is in its output)"


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _r_error(error: ErrorInfo) -> str:
    """IRkernel's error, without the frame every cell has (`eval(expr, envir, enclos)`)."""
    text = "\n".join(error.traceback) or error.evalue
    text = _ANSI.sub("", text).replace("Error in eval(expr, envir, enclos): ", "Error: ")
    return "\n".join(ln.rstrip() for ln in text.splitlines() if ln.strip()).strip()


def _python_missing(settings: Settings) -> str | None:
    return None


def _module_missing(module: str, install: str) -> Callable[[Settings], str | None]:
    def missing(settings: Settings) -> str | None:
        python = str(settings.kernel_python) if settings.kernel_python else None
        if not _has_module(python, module):
            return f"{module} is not installed — `{install}`"
        return None

    return missing


@functools.cache
def _has_module(python: str | None, module: str) -> bool:
    if python is None:
        return importlib.util.find_spec(module) is not None
    try:
        done = subprocess.run(
            [python, "-I", "-c", f"import {module}"], capture_output=True, timeout=CHECK_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _deno_missing(settings: Settings) -> str | None:
    if shutil.which("deno") is None:
        return "Deno is not installed — `npm install -g deno`"
    return None


def _r_missing(settings: Settings) -> str | None:
    if shutil.which("R") is None:
        return "R is not installed — `apt-get install r-base-core r-cran-irkernel`"
    if not _r_has_irkernel():
        return "IRkernel not installed — `apt-get install r-cran-irkernel`"
    return None


@functools.cache
def _r_has_irkernel() -> bool:
    try:
        done = subprocess.run(
            ["Rscript", "-e", 'quit(status = !requireNamespace("IRkernel", quietly = TRUE))'],
            capture_output=True,
            timeout=CHECK_TIMEOUT,
            env=_scrubbed_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


_COMMON = (
    "Your code runs as one cell in a fresh Jupyter {kernel} kernel with no state from earlier "
    "runs; what it prints is the answer the user sees, so print the answer. "
    "Reply with exactly one fenced ```{fence} code block holding the complete program, and "
    "nothing needed outside it. Do not ask questions, do not read from stdin, and do not use "
    "the network: there is none. Nothing can be installed."
)

# What an attempt may leave behind, cleared: the names it bound and the results IPython keeps
# of it. IPython's own reset() does that too, but also a full gc.collect() and a rebuild of its
# aliases: ~35 ms, several trivial executes. user_ns_hidden holds the namespace the kernel
# started with (IPython's hide_initial_ns) plus the result and input caches (`_`, `_1`, `_i1`)
# IPython hides there as it goes; those are dropped and the rest put back. The code runs in a
# namespace of its own so that it binds nothing in the one it clears.
_RESET = """\
hook = ip.displayhook
hook._ = hook.__ = hook.___ = ""
ip.history_manager.output_hist.clear()
ip.last_execution_result = None
hidden = ip.user_ns_hidden
for name in [n for n in hidden if re.fullmatch(r"_i?[0-9]+", n)]:
    del hidden[name]
for name in ("_", "__", "___", "_i", "_ii", "_iii"):
    if name in hidden:
        hidden[name] = ""
ip.user_ns.clear()
ip.user_ns.update(hidden)
"""
PYTHON_RESET = (
    f"exec({_RESET!r}, {{'ip': __import__('IPython').get_ipython(), 're': __import__('re')}})"
)


PYTHON = Language(
    name="python",
    ipykernel=True,
    title="Python",
    kernel="python",
    fences=("python", "py", "python3", "ipython"),
    suffix=".py",
    idiom="",  # prompts.system_prompt_for keeps Python's own prompt
    install="",
    kernelspec={"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
    language_info={
        "codemirror_mode": {"name": "ipython", "version": 3},
        "file_extension": ".py",
        "mimetype": "text/x-python",
        "name": "python",
        "nbconvert_exporter": "python",
        "pygments_lexer": "ipython3",
        "version": ".".join(map(str, sys.version_info[:3])),
    },
    check=check_python,
    missing=_python_missing,
    reset_code=PYTHON_RESET,
    kernel_names=("autocoder-sandbox", "autocoder-python"),
)

BASH = Language(
    name="bash",
    title="Bash",
    kernel="bash",
    fences=("bash", "sh", "shell", "console", "zsh"),
    suffix=".sh",
    idiom=(
        "You are autocoder. You write Bash scripts that solve the user's task.\n"
        + _COMMON.format(kernel="Bash", fence="bash")
        + "\nThe script runs with `set -eo pipefail`: a failing command stops it, so test "
        "conditions with `if`. Use the standard tools (coreutils, grep, sed, awk, find); "
        "work in the current directory, where files you write are given to the user."
    ),
    install="pip install bash_kernel",
    kernelspec={"name": "bash", "display_name": "Bash", "language": "bash"},
    language_info={
        "name": "bash",
        "codemirror_mode": "shell",
        "mimetype": "text/x-sh",
        "file_extension": ".sh",
    },
    check=check_bash,
    missing=_module_missing("bash_kernel", "pip install bash_kernel"),
    wrap=_bash_wrap,
    clean_error=_bash_error,
    fail=lambda message: f"echo {_sh_quote(message)} >&2\nfalse",
    enter_dir=lambda name: (
        f"# {_ENTER_WHY}\nif [ -d {_sh_quote(name)} ]; then cd {_sh_quote(name)}; fi"
    ),
)

_DENO_INFO = {
    "name": "typescript",
    "mimetype": "text/x.typescript",
    "file_extension": ".ts",
    "pygments_lexer": "typescript",
    "codemirror_mode": "typescript",
    "nbconvert_exporter": "script",
}
_DENO_SPEC = {"name": "deno", "display_name": "Deno", "language": "typescript"}
_DENO_IDIOM = (
    "It runs in Deno: use console.log to print, top-level await works, and the Deno and "
    "Web APIs are there (Deno.readTextFile, Deno.writeTextFile); there is no npm package "
    "and no remote import. Work in the current directory, where files you write are given to "
    "the user. Throw an Error when something is wrong."
)

JAVASCRIPT = Language(
    name="javascript",
    title="JavaScript",
    kernel="deno",
    fences=("javascript", "js", "mjs", "node"),
    suffix=".js",
    idiom=(
        "You are autocoder. You write modern JavaScript (ES2022 modules) that solves the "
        "user's task.\n" + _COMMON.format(kernel="Deno", fence="javascript") + "\n" + _DENO_IDIOM
    ),
    install="npm install -g deno",
    kernelspec=_DENO_SPEC,
    language_info=_DENO_INFO,
    check=_check_deno(".js"),
    missing=_deno_missing,
    late_output=True,
    fail=lambda message: f"throw new Error({json.dumps(message)});",
    enter_dir=lambda name: (
        f"// {_ENTER_WHY}\ntry {{\n  Deno.chdir({json.dumps(name)});\n}} catch {{\n  // not there\n}}"
    ),
)

TYPESCRIPT = Language(
    name="typescript",
    title="TypeScript",
    kernel="deno",
    fences=("typescript", "ts", "tsx"),
    suffix=".ts",
    idiom=(
        "You are autocoder. You write TypeScript that solves the user's task.\n"
        + _COMMON.format(kernel="Deno", fence="typescript")
        + "\n"
        + _DENO_IDIOM
    ),
    install="npm install -g deno",
    kernelspec=_DENO_SPEC,
    language_info=_DENO_INFO,
    check=_check_deno(".ts"),
    missing=_deno_missing,
    late_output=True,
    fail=lambda message: f"throw new Error({json.dumps(message)});",
    enter_dir=lambda name: (
        f"// {_ENTER_WHY}\ntry {{\n  Deno.chdir({json.dumps(name)});\n}} catch {{\n  // not there\n}}"
    ),
)

R = Language(
    name="r",
    title="R",
    kernel="r",
    fences=("r", "R", "rscript", "splus"),
    suffix=".R",
    idiom=(
        "You are autocoder. You write R code that solves the user's task.\n"
        + _COMMON.format(kernel="R (IRkernel)", fence="r")
        + "\nUse base R and the recommended packages only; print results with print() or "
        "cat(). Work in the current directory, where files you write are given to the user. "
        "Call stop() when something is wrong."
    ),
    install="apt-get install r-base-core r-cran-irkernel",
    kernelspec={"name": "ir", "display_name": "R", "language": "R"},
    language_info={
        "name": "R",
        "codemirror_mode": "r",
        "pygments_lexer": "r",
        "mimetype": "text/x-r-source",
        "file_extension": ".r",
    },
    check=check_r,
    missing=_r_missing,
    reset_code="rm(list = ls(all.names = TRUE))",
    clean_error=_r_error,
    fail=lambda message: f"stop({json.dumps(message)})",
    enter_dir=lambda name: (
        f"# {_ENTER_WHY}\nif (dir.exists({json.dumps(name)})) setwd({json.dumps(name)})"
    ),
)

LANGUAGES: tuple[Language, ...] = (PYTHON, BASH, JAVASCRIPT, TYPESCRIPT, R)
NAMES = tuple(lang.name for lang in LANGUAGES)
_ALIASES = {
    "sh": "bash",
    "js": "javascript",
    "ts": "typescript",
    "py": "python",
    "python3": "python",
}


def get(name: str) -> Language:
    """The language of this name (any case; `js`, `ts`, `sh`, `py` too); KeyError otherwise."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    for lang in LANGUAGES:
        if lang.name == key:
            return lang
    raise KeyError(name)


@dataclass(frozen=True)
class Availability:
    """Whether this installation can run a language, and if not, why and what installs it."""

    language: str
    title: str
    available: bool
    kernel: str
    reason: str | None = None


def availability(settings: Settings) -> list[Availability]:
    """Every language, from the kernelspecs shipped and the kernels found here."""
    root = kernels_dir()
    out = []
    for lang in LANGUAGES:
        name = lang.kernel_name(settings)
        reason = lang.missing(settings)
        if reason is None and lang is not PYTHON and not offered(lang, settings):
            reason = "not offered by this server (AUTOCODER_LANGUAGES)"
        if reason is None and not (root / name / "kernel.json").is_file():
            reason = f"autocoder's kernelspec {name} is missing from {root}"
        out.append(Availability(lang.name, lang.title, reason is None, name, reason))
    return out


def offered(lang: Language, settings: Settings) -> bool:
    wanted = {w.strip().lower() for w in settings.languages.split(",") if w.strip()}
    return "all" in wanted or lang.name in wanted


def installed(settings: Settings) -> list[str]:
    return [a.language for a in availability(settings) if a.available]


def notebook_kernelspec(lang: Language, settings: Settings) -> dict[str, Any] | None:
    """The Jupyter kernelspec a run notebook of `lang` names (`bash`, `deno`, `ir`), as the
    language's own kernel: the argv after `--` in autocoder's unconfined kernelspec, with the
    program made absolute, so that a Jupyter outside this environment starts the same kernel.
    None when that kernel is not installed here. Python's (`python3`) is every Jupyter's own."""
    if lang is PYTHON or lang.missing(settings) is not None:
        return None
    shipped = json.loads((kernels_dir() / f"autocoder-{lang.kernel}" / "kernel.json").read_text())
    program, *args = shipped["argv"][shipped["argv"].index("--") + 1 :]
    if program == "python":
        program = str(settings.kernel_python or sys.executable)
    else:
        program = shutil.which(program) or program
    spec: dict[str, Any] = {
        "argv": [program, *args],
        "display_name": lang.kernelspec["display_name"],
        "language": lang.kernelspec["language"],
        "interrupt_mode": shipped.get("interrupt_mode", "signal"),
    }
    if shipped.get("env"):
        spec["env"] = shipped["env"]
    return spec


class LanguageUnavailable(AutocoderError, ValueError):
    """An unknown language, or one this installation cannot run; the message names those it can."""


def resolve(name: str | None, settings: Settings) -> Language:
    """The language asked for, if it can run here; LanguageUnavailable (one line) otherwise."""
    if name is None:
        return PYTHON
    try:
        lang = get(name)
    except KeyError:
        raise LanguageUnavailable(
            f"unknown language {name!r}; this installation runs: {', '.join(installed(settings))}"
        ) from None
    if lang is PYTHON:
        return lang
    for a in availability(settings):
        if a.language == lang.name and not a.available:
            raise LanguageUnavailable(
                f"{lang.title} cannot run here: {a.reason}; this installation runs: "
                f"{', '.join(installed(settings))}"
            )
    return lang
