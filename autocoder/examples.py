"""The prompt's own examples, run against the code that claims to answer it.

A prompt that says `longest(['a', 'bb']) should return 'bb'`, or carries a docstring with
`>>> longest([])`, has given the check that tells a right program from one that only runs
cleanly. A small model's wrong function mostly runs cleanly; its candidates may even agree,
since a program that defines a function and prints nothing gives them nothing to disagree on.
So every candidate that ran cleanly in a fresh kernel is then called on the prompt's examples
there, and one whose result differs has failed (`ErrorKind.EXAMPLE`): the retry is told which
example and what came back.

Only what can be checked without guessing is taken: a call of a function by name with literal
arguments, and a literal result, either as a doctest (`>>> f(1)` and the next line) or in a
line, prose or code, with an arrow, an equals sign or a verb between them (`f(1) == 2`,
`f(1) ➞ 2`, `f(1) => true`, `… for example f(1) should return 2, and f(2) is 4.`). A call
of a builtin says how Python works, not the task, and is not taken. An example whose
function the code does not define is not this code's, and is skipped. A user's example that is itself wrong fails every candidate; the run
then says so, naming it, rather than answer against the user's own words.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
from dataclasses import dataclass

from autocoder.inside.asserts import is_literal as _literal

MAX_EXAMPLES = 20
MAX_SOURCE = 400
# Places in the prompt where a call meets an arrow or equals sign, tried at most: each costs
# a few parses, and a prompt can be long.
MAX_TRIES = 200
MARKER = "\x1eautocoder-examples "
SHOWN = 200

_QUOTES_ONLY = re.compile(r"^\s*(\"\"\"|'''|```\w*)\s*$")
_PROMPT = re.compile(r"^\s*>>>\s?(.*)$")
_CONTINUED = re.compile(r"^\s*\.\.\.(\s|$)")
_NAME_CALL = re.compile(r"(?<![\w.])[A-Za-z_]\w*\s*\(")
# What may follow an example's result: the end of the line, punctuation, or the next clause.
_CLAUSE_END = re.compile(r"^\s*($|[.,;:)`]|(and|or|but|while|whereas)\b|#)")
_BETWEEN = re.compile(
    r"\s*(?:==>|==|➞|=>|->|→|=|\bshould return\b|\bshould be\b|\breturns\b|\bgives\b|\bis\b)\s*"
)
# Builtins an example may wrap its call in: they compute, and touch nothing.
_WRAPPERS = frozenset(
    [
        "abs",
        "all",
        "any",
        "bool",
        "dict",
        "float",
        "frozenset",
        "int",
        "len",
        "list",
        "max",
        "min",
        "reversed",
        "round",
        "set",
        "sorted",
        "str",
        "sum",
        "tuple",
    ]
)
_WORDS = {"true": "True", "false": "False", "none": "None", "null": "None"}
_COMMENT = re.compile(r"\s+#.*$")


@dataclass(frozen=True)
class Example:
    """One worked example: `call` (Python source, literal arguments) of the function `name`
    should return the literal `expected` (Python source)."""

    name: str
    call: str
    expected: str

    def __str__(self) -> str:
        return f"{self.call} == {self.expected}"


class _Budget:
    """How many more places where a call meets an arrow or equals sign may be tried."""

    def __init__(self, left: int = MAX_TRIES) -> None:
        self.left = left

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0


def find(prompt: str) -> tuple[Example, ...]:
    """The examples a prompt gives, in order, each once; at most MAX_EXAMPLES."""
    # A docstring's closing quotes or a fence end an example's result, as a blank line does.
    lines = ["" if _QUOTES_ONLY.match(line) else line for line in prompt.splitlines()]
    found: list[Example] = []
    budget = _Budget()
    i = 0
    while i < len(lines) and len(found) < MAX_EXAMPLES and budget.left > 0:
        if doctest := _PROMPT.match(lines[i]):
            example, i = _doctest(lines, i, doctest.group(1), budget)
            new = [example] if example is not None else []
        else:
            new, i = _in_line(lines[i], budget), i + 1
        found.extend(e for e in new if e not in found)
    return tuple(found[:MAX_EXAMPLES])


def _doctest(lines: list[str], i: int, source: str, budget: _Budget) -> tuple[Example | None, int]:
    """The example of the doctest at `lines[i]`, whose call is `source` (`>>> f(1)` and its
    result up to a blank line or the next `>>>`), and the index of the line after it. A call
    over several lines is not taken."""
    j = i + 1
    several_lines = j < len(lines) and _CONTINUED.match(lines[j])
    while j < len(lines) and _CONTINUED.match(lines[j]):
        j += 1
    want: list[str] = []
    while j < len(lines) and lines[j].strip() and not _PROMPT.match(lines[j]):
        want.append(lines[j].strip())
        j += 1
    if several_lines:
        return None, j
    # A blank result is doctest's way of saying the call returns None.
    result = " ".join(want) or "None"
    example = _example(source, result)
    if example is None and result in {"True", "None"}:
        # `>>> f(1) == 2`, and `True` or nothing on the next line
        example = next(iter(_in_line(source, budget)), None)
    return example, j


def _in_line(line: str, budget: _Budget) -> list[Example]:
    """`f(1) == 2` and its kin, anywhere in a line of prose: at each arrow or equals sign, the
    call that ends just before it and the literal that starts just after it and ends the
    sentence, or the clause (`double(2) == 4 and double(-1) == -2.`)."""
    if "(" not in line or len(line) > 4 * MAX_SOURCE:
        return []
    found = []
    for between in _BETWEEN.finditer(line):
        if line[: between.start()].rstrip().rstrip("`")[-1:] != ")" or not budget.take():
            continue
        call = _call_before(line[: between.start()])
        expected = _literal_after(line[between.end() :]) if call else None
        if call and expected:
            example = _example(call, expected)
            if example is not None:
                found.append(example)
    return found


def _call_before(text: str) -> str | None:
    """The call of a function by name that `text` ends with, if it ends with one."""
    text = text.rstrip().rstrip("`")
    if not text.endswith(")"):
        return None
    for start in _NAME_CALL.finditer(text):
        if _call_name(text[start.start() :]) is not None:
            return text[start.start() :]
    return None


def _literal_after(text: str) -> str | None:
    """The literal `text` starts with, where the sentence or clause ends after it."""
    text = text.lstrip().lstrip("`")
    word = re.match(r"[A-Za-z]+", text)
    if word and word.group().lower() in _WORDS and _CLAUSE_END.match(text[word.end() :]):
        return _WORDS[word.group().lower()]
    for end in range(min(len(text), MAX_SOURCE), 0, -1):
        if not _CLAUSE_END.match(text[end:]):
            continue
        said = text[:end].rstrip().rstrip("`")
        if said.endswith("."):  # the sentence's full stop, unless it makes the number
            said = said[:-1] if _literal(said[:-1]) else said
        if said and not said.endswith(",") and _literal(said) and not _bare_tuple(said):
            return said
    return None


def _bare_tuple(source: str) -> bool:
    """`'bb', and` is the word 'bb' before a comma, not a tuple."""
    return isinstance(ast.parse(source, mode="eval").body, ast.Tuple) and not source.startswith("(")


def _example(call: str, expected: str) -> Example | None:
    call, expected = call.strip().strip("`").strip(), expected.strip()
    if not call or len(call) > MAX_SOURCE or len(expected) > MAX_SOURCE:
        return None
    name = _call_name(call)
    if name is None:
        return None
    call = ast.unparse(ast.parse(call, mode="eval"))  # without the prompt's comments
    for said in (expected, _COMMENT.sub("", expected)):
        said = _WORDS.get(said.lower(), said)
        if _literal(said) and not _bare_tuple(said):
            # As Python writes it: no comment or line break of the prompt's comes along.
            return Example(name, call, ast.unparse(ast.parse(said, mode="eval")))
    return None


def _call_name(source: str) -> str | None:
    """The function the example is about, when the source is a call of it with literal
    arguments, perhaps inside pure builtins (`round(find_zero([1, 2]), 2)`, `sorted(f(3))`)."""
    try:
        node = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(node, ast.Call):
        return None
    named: set[str] = set()

    def plain(n: ast.expr) -> bool:
        if not isinstance(n, ast.Call):
            return _literal(ast.unparse(n))
        if not isinstance(n.func, ast.Name) or any(isinstance(a, ast.Starred) for a in n.args):
            return False
        if any(k.arg is None for k in n.keywords):
            return False
        if hasattr(builtins, n.func.id):
            if n.func.id not in _WRAPPERS:
                return False
        else:
            named.add(n.func.id)
        return all(plain(a) for a in [*n.args, *(k.value for k in n.keywords)])

    # One function of the task's; a call of builtins alone (`ord('a') = 97`) says how Python
    # works, not what the task's function does.
    return named.pop() if plain(node) and len(named) == 1 else None


# --- In the kernel -------------------------------------------------------------------------------

# Runs in the candidate's sandboxed kernel, after its code: standard library only. It calls the
# functions the code defined, so their prints are swallowed (the answer's output is the code's),
# and it reports on one line of its own. It runs in a namespace of its own with the real
# builtins: code that defines its own `eval`, `len` or `print` cannot change how it checks.
_CHECK = """\
import ast, contextlib, io, json, math, sys


def same(got, want):
    if isinstance(want, float) or isinstance(got, float):
        try:
            return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
        except TypeError:
            return False
    if isinstance(want, (list, tuple)) and type(got) is type(want):
        return len(got) == len(want) and all(map(same, got, want))
    try:
        return bool(got == want)
    except Exception:
        return False


def shown(value):
    try:
        text = repr(value)
    except Exception as e:
        text = "<unprintable: %s>" % e
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


checked, failed = 0, []
for name, call, want in cases:
    if not callable(space.get(name)):
        continue
    checked += 1
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            got = eval(call, space)
    except Exception as e:
        failed.append("%s raised %s: %s, where the task says %s" % (call, type(e).__name__, shown(e), want))
        continue
    if not same(got, ast.literal_eval(want)):
        failed.append("%s returned %s, where the task says %s" % (call, shown(got), want))
sys.stdout.write(MARKER + json.dumps([checked, failed]) + "\\n")
"""


def check_code(examples: tuple[Example, ...]) -> str:
    """The code that runs `examples` in a kernel where the candidate's code has run."""
    cases = [(e.name, e.call, e.expected) for e in examples]
    return (
        "import builtins as _autocoder_builtins\n"
        f"_autocoder_builtins.exec({_CHECK!r}, {{'__builtins__': _autocoder_builtins, "
        f"'space': _autocoder_builtins.globals(), 'cases': {cases!r}, "
        f"'MARKER': {MARKER!r}, 'SHOWN': {SHOWN}}})\n"
        "del _autocoder_builtins\n"
    )


@dataclass(frozen=True)
class Checked:
    """How the examples went: how many were this code's to check, and the failures, worded."""

    checked: int
    failed: tuple[str, ...]


def read(text: str) -> Checked | None:
    """The check's report in a kernel's output; None if there is none (the code had broken
    what the check needs: nothing is claimed either way)."""
    for line in text.split("\n"):  # not splitlines(): it splits at the marker's \x1e too
        if line.startswith(MARKER):
            try:
                checked, failed = json.loads(line[len(MARKER) :])
            except ValueError:
                return None
            if isinstance(checked, int) and all(isinstance(f, str) for f in failed):
                return Checked(checked, tuple(failed))
    return None


def held(n: int) -> str:
    """`the prompt's 2 examples hold`, as the CLI and the notebook say of a success."""
    return f"the prompt's {n} example{'s' if n > 1 else ''} hold{'' if n > 1 else 's'}"


def error(result: Checked) -> str:
    """The attempt's error: which of the prompt's examples did not hold."""
    n = len(result.failed)
    head = (
        f"The code ran, but {n} of the task's {result.checked} examples "
        f"{'does' if n == 1 else 'do'} not hold:"
    )
    return "\n".join([head, *(f"  {f}" for f in result.failed)])
