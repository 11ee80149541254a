"""Several programs per attempt, and the answer most of them agree on when run.

A small model's program often runs cleanly and is still wrong, and nothing in its run shows it.
Sampling several programs and keeping the result most of them produce (minimum Bayes risk by
execution, AlphaCode's clustering by behaviour) is right more often, and when they disagree,
that is the sign to say "not sure" rather than answer. The runner draws and runs them; every
rule of how many, how they are sampled, grouped and judged is here:

- How many (K): the request's `candidates`, else AUTOCODER_CANDIDATES; 0 means LOCAL_CANDIDATES
  for the embedded model and 1 for an endpoint (where each candidate is one more paid request).
  A session or the magic runs one: their kernel keeps state that a second candidate would see
  or change (the runner decides that).
- Drawn in two rounds: FIRST_ROUND first, the rest of K only when those do not settle the
  attempt (they disagree, or only one ran cleanly). Two that agree cost twice one candidate;
  the rest are paid for only where the answer is in doubt. None running cleanly ends the
  attempt at once: a retry, told what went wrong, is the better next step.
- Sampled: the first as the retry policy asks (greedy on a first attempt); the others at
  SAMPLE_TEMPERATURE at least, each with its own seed, so they differ, and a rerun of the same
  prompt draws the same ones. 0.4 rather than 0.7: with the embedded 0.5B model on 12 tasks
  side by side, both gave 7 right answers, 5 uncertain and no wrong one, and 0.4 generated 30%
  fewer tokens (0.7's samples ramble).
- Grouped by what they produced (`Produced.answer`): the numbers they printed (and the text of
  their results), in order, leaving out numbers the user's prompt gives (`values`), so "262"
  and "There are 262 weekdays in 2024." agree on a task about 2024, as do two layouts of one
  table, and "3,740.87" is 3740.87. A candidate that printed no number of its own is compared
  by its whole text, normalised (`normalise`): "Saturday" is not "Sunday". Either way the
  kinds of their rich outputs must match (a plot is an image/png whatever its pixels), and the
  files they wrote, text files by normalised content and others by kind. File names are not
  compared: a name the task gives, every candidate uses; one it does not give is arbitrary.
- The answer is the largest group of those that ran cleanly; between groups of one size, the
  one whose first member was drawn first. Its first member's code, output and files are the
  attempt's.
- Certain (`Tally.certain`) when at least two agree and no other group is as large. A small
  model's wrong programs are mostly wrong each in its own way, so a wrong answer seldom
  gathers two votes while a right one does; requiring a majority of all that ran cleanly
  instead let that scatter outvote a right answer (37.78 against 180, 55.56 and 37.7778: two of
  four, an honest answer reported as uncertain). When the prompt gives worked examples
  (examples.py), a candidate that fails them has not run cleanly, and one that passes them
  needs no second vote: the user's own check speaks for it, and as for two that agree, no
  more are drawn. Otherwise the run reports `uncertain`, with the answer and the
  alternatives, and what the candidates that failed hit. A single candidate is certain as
  before: with nothing to compare, running cleanly is all there is to go on.
- An uncertain answer ends the run, even when it is the only candidate that ran cleanly and
  the others failed: retrying such a lone answer, told what the others failed with, was
  measured on the tasks benchmark and made things worse (docs/quality.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocoder.files import TEXT_SUFFIXES, media_type, open_beneath, walk_files
from autocoder.records import Attempt, last_line

LOCAL_CANDIDATES = 5
FIRST_ROUND = 2
SAMPLE_TEMPERATURE = 0.4
MAX_COMPARED_FILES = 50
MAX_COMPARED_BYTES = 8 << 20
SHOWN_CHARS = 60
SHOWN_ERROR_CHARS = 120


def how_many(asked: int | None, configured: int, backend: str) -> int:
    """K for a run: what the request asked, else the setting, else the backend's default."""
    if asked:
        return asked
    if configured:
        return configured
    return LOCAL_CANDIDATES if backend == "local" else 1


def first_round(k: int) -> int:
    return min(k, FIRST_ROUND)


def sampling(attempt: int, candidate: int, temperature: float, k: int) -> tuple[float, int | None]:
    """The temperature and seed of a candidate. With one candidate the request is what it
    always was (no seed: not every endpoint takes one)."""
    if k == 1:
        return temperature, None
    if candidate > 1:
        temperature = max(temperature, SAMPLE_TEMPERATURE)
    return temperature, attempt * 100 + candidate


# --- What a candidate produced -------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
# numpy 2's reprs of scalars: np.float64(2.5) is the 2.5 another program prints.
_NUMPY_SCALAR = re.compile(r"\bnp\.[a-z_]+\d*\(([^()]*)\)")
_FLOAT = re.compile(r"(?<![\w.])-?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)(?![\w.])")
_SPACES = re.compile(r"\s+")
# A plot's own repr, as IPython shows the last expression of plotting code: it says only that a
# plot was made, which the plot itself says (`<Figure size 640x480 with 1 Axes>`,
# `[<matplotlib.lines.Line2D at 0x7f…>]`, `Text(0.5, 1.0, 'Sine')`).
_PLOT_REPR = re.compile(
    r"^(\[?<(figure size|matplotlib\.|axessubplot|axes:)[^\n]*>\]?|text\([^\n]*\))$"
)


def _number(match: re.Match[str]) -> str:
    try:
        value = float(match.group())
    except ValueError:
        return match.group()
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".6g")


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_VALUE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?!\w)")


def values(text: str, given: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The numbers `text` says, in order, as `normalise` writes them, leaving out those in
    `given` (the prompt's own: a program that repeats the question's year or range says
    nothing more by it)."""
    text = _THOUSANDS.sub("", _NUMPY_SCALAR.sub(r"\1", _ANSI.sub("", text)))
    found = (_number(m) for m in _VALUE.finditer(text))
    return tuple(v for v in found if v not in given)


def normalise(text: str) -> str:
    """Text as compared: no colours, blank lines or runs of spaces; lower case; floats to six
    significant digits (42.0 is 42, 0.30000000000000004 is 0.3); numpy scalars as their value;
    object addresses blanked. What differs after this is a different answer."""
    text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _NUMPY_SCALAR.sub(r"\1", text)
    text = _ADDRESS.sub("0x", text)
    text = _FLOAT.sub(_number, text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.lower().split("\n"))
    return "\n".join(line for line in lines if line and not _PLOT_REPR.match(line))


@dataclass(frozen=True)
class Produced:
    """What a candidate's code produced, as far as agreeing goes."""

    text: str
    rich: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    values: tuple[str, ...] = field(default=(), compare=False)

    def answer(self) -> object:
        """What it is compared by: the numbers it said, if it said any of its own, else its
        whole text; with its rich outputs and files either way."""
        return (self.values, self.rich, self.files) if self.values else self

    def describe(self, output: str) -> str:
        """A short phrase for the user: what it printed (the first line of `output`, as the
        code printed it), and what it made."""
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        first = lines[0] if lines else ""
        if len(first) > SHOWN_CHARS:
            first = first[: SHOWN_CHARS - 1] + "…"
        said = f"printed {first!r}" + (" …" if len(lines) > 1 else "") if first else ""
        made = [kind for kind, _ in self.files] + list(self.rich)
        parts = [said] if said else []
        if made:
            parts.append("made " + ", ".join(made))
        return " and ".join(parts) or "printed nothing"


def produced(
    outputs: Sequence[dict[str, Any]],
    workdir: Path | None,
    inputs: Iterable[str] = (),
    given: frozenset[str] = frozenset(),
) -> Produced:
    """Read what a candidate produced from its outputs and, once its kernel's processes have
    ended (nothing can change the directory any more), the files in its working directory.
    `given`: the numbers of the prompt (`values(prompt)`)."""
    texts: list[str] = []
    rich: list[str] = []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream" and out.get("name") == "stdout":
            texts.append(str(out.get("text", "")))
        elif kind in {"execute_result", "display_data"}:
            data = out.get("data") or {}
            images = sorted(m for m in data if m.startswith("image/"))
            if images:
                rich.extend(images)
            elif isinstance(data.get("text/plain"), str):
                texts.append(data["text/plain"] + "\n")
    files = _files(workdir, set(inputs)) if workdir is not None else ()
    said = "".join(texts)
    return Produced(normalise(said), tuple(sorted(rich)), files, values(said, given))


def _files(workdir: Path, inputs: set[str]) -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    for rel, st in walk_files(workdir):
        if rel in inputs and not st.st_mode & 0o222:
            continue
        found.append((media_type(rel), _digest(workdir, rel, st.st_size)))
        if len(found) >= MAX_COMPARED_FILES:
            break
    return tuple(sorted(found))


def _digest(workdir: Path, rel: str, size: int) -> str:
    """A text file's normalised content, hashed; '' for any other file (compared by kind)."""
    if Path(rel).suffix.lower() not in TEXT_SUFFIXES or size > MAX_COMPARED_BYTES:
        return ""
    opened = open_beneath(workdir, rel)
    if opened is None:
        return ""
    with opened:
        data = opened.read()[:MAX_COMPARED_BYTES]
    text = normalise(data.decode("utf-8", "replace"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- The vote ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """The candidates drawn so far, grouped: `groups` holds their indices, the answer's first.
    `vouched`: the answer's candidates passed the worked examples the prompt gives."""

    drawn: int
    groups: tuple[tuple[int, ...], ...]
    vouched: bool = False

    @property
    def clean(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def agreement(self) -> int:
        return len(self.groups[0]) if self.groups else 0

    @property
    def chosen(self) -> int:
        """The index of the candidate that answers: the largest group's first, else the first."""
        return self.groups[0][0] if self.groups else 0

    @property
    def backed(self) -> bool:
        """Whether more than the answer's own run speaks for it: a second candidate that
        agrees, or the prompt's examples, which it passed."""
        return self.agreement >= 2 or (self.agreement >= 1 and self.vouched)

    def settled(self) -> bool:
        """Whether to stop drawing: none ran cleanly, or all that did agree and are backed."""
        return self.clean == 0 or (self.backed and self.agreement == self.clean)

    @property
    def certain(self) -> bool:
        if self.drawn == 1:
            return self.clean == 1
        runner_up = len(self.groups[1]) if len(self.groups) > 1 else 0
        return self.backed and self.agreement > runner_up


def tally(produced_by: Sequence[Produced | None], vouched: Sequence[bool] = ()) -> Tally:
    """Group the candidates (None: did not run cleanly) by what they produced
    (`Produced.answer`). `vouched[i]`: candidate i passed the prompt's examples (a candidate
    that failed them did not run cleanly)."""
    groups: dict[object, list[int]] = {}
    for i, p in enumerate(produced_by):
        if p is not None:
            groups.setdefault(p.answer(), []).append(i)
    # Largest first; between equals, one that produced something (a program that printed and
    # made nothing answers nothing), then the one drawn first.
    nothing = Produced("").answer()
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0] == nothing, kv[1][0]))
    result = Tally(len(produced_by), tuple(tuple(g) for _, g in ordered))
    if result.groups and result.chosen < len(vouched) and vouched[result.chosen]:
        return Tally(result.drawn, result.groups, vouched=True)
    return result


def disagreement(
    result: Tally, drawn: Sequence[Attempt], produced_by: Sequence[Produced | None]
) -> str:
    """Why a run is uncertain, naming the alternatives: what each other group produced, and
    which candidates failed."""

    def who(indices: Sequence[int]) -> str:
        numbers = [str(drawn[i].candidate) for i in indices]
        if len(numbers) == 1:
            return f"candidate {numbers[0]}"
        return f"candidates {', '.join(numbers[:-1])} and {numbers[-1]}"

    parts = []
    for group in result.groups[1:]:
        key = produced_by[group[0]]
        assert key is not None
        parts.append(f"{who(group)} {key.describe(drawn[group[0]].output)}")
    failed = [i for i, key in enumerate(produced_by) if key is None]
    if failed:
        parts.append(f"{who(failed)} failed{_why_failed([drawn[i] for i in failed])}")
    head = f"only {result.agreement} of {result.drawn} candidates produced this answer"
    return head + ("; " + "; ".join(parts) if parts else "") + ". Check it before relying on it."


def _why_failed(failed: Sequence[Attempt]) -> str:
    """` (ValueError: …)`: what most of the failed candidates hit, by the last line of their
    error, so the user (and a retry) sees why the others are no alternative."""
    said: dict[str, int] = {}
    for attempt in failed:
        if line := last_line(attempt.error, SHOWN_ERROR_CHARS):
            said[line] = said.get(line, 0) + 1
    if not said:
        return ""
    most = max(said, key=lambda k: said[k])
    return f" ({most}{', among others' if len(said) > 1 else ''})"
