"""Reading an answer the way a person would: tolerant of formatting, strict on the value.

Numbers may carry thousands separators, a currency sign, a percent sign, a unicode minus or
numpy's `np.float64(...)` wrapping; they are compared within a tolerance the task chooses
(usually what its requested rounding allows). What is checked is where the answer sits:
the last line that holds a number, the number that follows a name on its line, the last line
that names one of the possible choices. A program that prints the right value somewhere in a
dump of the whole table, but answers something else, is wrong.
"""

from __future__ import annotations

import calendar
import contextlib
import csv
import datetime as dt
import io
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .base import PASS, Answer, Verdict, fail

_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−]?)\$?(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?"
    r"(?P<exp>[eE][-+]?\d+)?(?![\w])"
)

MONTHS = [m.lower() for m in calendar.month_name[1:]]


def numbers(text: str) -> list[float]:
    """Every number in the text, in order."""
    found = []
    for m in _NUMBER.finditer(text):
        value = float(m["digits"].replace(",", "") + (m["frac"] or "") + (m["exp"] or ""))
        found.append(-value if m["sign"] else value)
    return found


def fmt(value: float) -> str:
    """A value as a message should show it: 454396537, 16470.09, 0.166667."""
    return str(int(value)) if float(value).is_integer() else repr(round(value, 6))


def lines(text: str) -> list[str]:
    """The non-empty lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def close(value: float, expected: float, tol: float) -> bool:
    return abs(value - expected) <= tol


def any_close(values: Iterable[float], expected: float, tol: float) -> bool:
    return any(close(v, expected, tol) for v in values)


def final_number(
    answer: Answer, expected: float, tol: float = 1e-9, *, percent: bool = False
) -> Verdict:
    """The last line that holds a number states `expected` (within `tol`).

    With `percent`, `expected` is a fraction and the line may give it either as a fraction or
    as a percentage (tolerance scaled to match).
    """
    numeric = [line for line in lines(answer.output) if numbers(line)]
    if not numeric:
        return fail(f"no number in the output; expected {fmt(expected)}")
    found = numbers(numeric[-1])
    if any_close(found, expected, tol) or (percent and any_close(found, expected * 100, tol * 100)):
        return PASS
    return fail(f"the answer line {numeric[-1]!r} does not state {fmt(expected)} (±{tol:g})")


def final_numbers(
    answer: Answer, expected: Sequence[float], tol: float = 1e-9, *, last: int = 2
) -> Verdict:
    """Every one of `expected` is stated on the last `last` lines that hold numbers."""
    numeric = [line for line in lines(answer.output) if numbers(line)][-last:]
    found = [v for line in numeric for v in numbers(line)]
    missing = [e for e in expected if not any_close(found, e, tol)]
    if missing:
        return fail(f"the answer lines {numeric!r} do not state {missing}")
    return PASS


def row_with(answer: Answer, first: float, then: float, tol: float) -> bool:
    """Whether a line has `first` as its first number (or its second, after a row index) and
    states `then` after it."""
    for line in lines(answer.output):
        found = numbers(line)
        for k in range(min(2, len(found))):
            if close(found[k], first, 1e-9) and any_close(found[k + 1 :], then, tol):
                return True
    return False


def mentions(text: str, word: str) -> bool:
    """Whether `word` appears as a whole word (case-insensitive)."""
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text, re.IGNORECASE) is not None


def after(line: str, key: str, keys: Iterable[str]) -> str | None:
    """The part of `line` after its first mention of `key`, up to the next mention of another
    key; None when the line does not name `key`."""
    m = re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", line, re.IGNORECASE)
    if m is None:
        return None
    rest = line[m.end() :]
    cut = len(rest)
    for other in keys:
        if other.lower() == key.lower():
            continue
        n = re.search(rf"(?<![\w]){re.escape(other)}(?![\w])", rest, re.IGNORECASE)
        if n is not None:
            cut = min(cut, n.start())
    return rest[:cut]


def keyed_numbers(
    answer: Answer, expected: Mapping[str, float], tol: float = 1e-9, *, exact_keys: bool = True
) -> Verdict:
    """Each key is followed on some line by its expected number (before any other key).

    With `exact_keys`, the last line that names a key with a number must state its value, so a
    later, contradicting answer is not forgiven for an earlier right one.
    """
    keys = list(expected)
    for key, value in expected.items():
        segments = [s for s in (after(line, key, keys) for line in lines(answer.output)) if s]
        with_numbers = [s for s in segments if numbers(s)]
        if not with_numbers:
            return fail(f"no number given for {key!r} (expected {fmt(value)})")
        if not any(any_close(numbers(s), value, tol) for s in with_numbers):
            return fail(f"{key!r}: expected {fmt(value)} (±{tol:g}), found {with_numbers[-1]!r}")
        if exact_keys and not any_close(numbers(with_numbers[-1]), value, tol):
            return fail(
                f"{key!r}: the last line naming it says {with_numbers[-1]!r}, not {fmt(value)}"
            )
    return PASS


def final_choice(
    answer: Answer,
    expected: str,
    options: Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> Verdict:
    """The last line that names any of `options` (or an alias of one) names `expected` and no
    other option."""
    words = {o: [o, *(aliases or {}).get(o, ())] for o in options}

    def names(line: str, option: str) -> bool:
        return any(mentions(line, w) for w in words[option])

    named = [line for line in lines(answer.output) if any(names(line, o) for o in options)]
    if not named:
        return fail(f"none of the possible answers is named; expected {expected!r}")
    last = named[-1]
    others = [o for o in options if o != expected and names(last, o)]
    if not names(last, expected) or others:
        return fail(f"the answer line {last!r} does not name {expected!r} alone")
    return PASS


def choice_and_number(
    answer: Answer, expected: str, options: Sequence[str], value: float, tol: float = 1e-9
) -> Verdict:
    """`final_choice`, and `value` stated on that line or on the last line with a number."""
    verdict = final_choice(answer, expected, options)
    if not verdict:
        return verdict
    line = [line for line in lines(answer.output) if mentions(line, expected)][-1]
    if any_close(numbers(line), value, tol) or final_number(answer, value, tol):
        return PASS
    return fail(f"{expected!r} is named but {fmt(value)} (±{tol:g}) is not given with it")


def in_order(answer: Answer, expected: Sequence[str], pattern: str) -> Verdict:
    """The first distinct matches of `pattern` in the output are `expected`, in that order."""
    seen: list[str] = []
    for m in re.finditer(pattern, answer.output):
        token = m.group(0)
        if token not in seen:
            seen.append(token)
    if seen[: len(expected)] != list(expected):
        return fail(f"expected {list(expected)} first, in order; found {seen[: len(expected) + 2]}")
    return PASS


def _month_patterns(year: int, month: int) -> list[str]:
    name = MONTHS[month - 1]
    return [
        rf"\b{name}\b",
        rf"\b{name[:3]}\b",
        rf"\b{year}[-/]0?{month}\b",
        rf"\b0?{month}[-/]{year}\b",
    ]


def names_month(text: str, year: int, month: int) -> bool:
    """Whether `text` names that month: by name, abbreviation, 2023-07, 07/2023, or as the
    first number after the word "month" ("Month with most orders: 7")."""
    if any(re.search(p, text, re.IGNORECASE) for p in _month_patterns(year, month)):
        return True
    m = re.search(r"\bmonth", text, re.IGNORECASE)
    if m is None:
        return False
    found = numbers(re.sub(rf"\b{year}\b", "", text[m.end() :]))
    return bool(found) and found[0] == month


def names_other_month(text: str, year: int, month: int) -> bool:
    return any(
        any(re.search(p, text, re.IGNORECASE) for p in _month_patterns(year, m)[:2])
        for m in range(1, 13)
        if m != month
    )


_ISO_DATE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_NAMED_DATE = re.compile(
    r"\b(?:(?P<d1>\d{1,2})(?:st|nd|rd|th)?\s+(?P<m1>[A-Za-z]{3,9})\.?,?\s+(?P<y1>\d{4})"
    r"|(?P<m2>[A-Za-z]{3,9})\.?\s+(?P<d2>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<y2>\d{4}))\b"
)


def dates(text: str) -> list[dt.date]:
    """The dates written in the text: 2023-03-05, 5 March 2023, March 5, 2023, Mar 5 2023."""
    found: list[tuple[int, dt.date]] = []
    for m in _ISO_DATE.finditer(text):
        with contextlib.suppress(ValueError):
            found.append((m.start(), dt.date(int(m[1]), int(m[2]), int(m[3]))))
    for m in _NAMED_DATE.finditer(text):
        day, month, year = (m["d1"], m["m1"], m["y1"]) if m["d1"] else (m["d2"], m["m2"], m["y2"])
        names = [n for n in MONTHS if n.startswith(month.lower()[:3])]
        if not names:
            continue
        with contextlib.suppress(ValueError):
            found.append((m.start(), dt.date(int(year), MONTHS.index(names[0]) + 1, int(day))))
    return [d for _, d in sorted(found, key=lambda pair: pair[0])]


def final_date(answer: Answer, expected: dt.date) -> Verdict:
    """The last date written in the output is `expected`."""
    found = dates(answer.output)
    if not found:
        return fail(f"no date in the output; expected {expected}")
    if found[-1] != expected:
        return fail(f"the last date given is {found[-1]}, expected {expected}")
    return PASS


def csv_rows(path: Path) -> list[list[str]]:
    """A written CSV's non-empty rows, cells as written."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]


def read_csv(path: Path) -> list[dict[str, str]]:
    """A written CSV's rows by lower-cased, stripped header (an unnamed index column is kept
    under the name ''); the cells as written."""
    rows = csv_rows(path)
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    return [dict(zip(header, row, strict=False)) for row in rows[1:]]


def column(rows: Sequence[Mapping[str, str]], *names: str) -> str | None:
    """The header among `names` (lower-case) that the rows have, if any."""
    for name in names:
        if rows and name in rows[0]:
            return name
    return None


def png_picture(answer: Answer, name: str, *, min_colours: int = 3) -> Verdict:
    """`name` was written, is a PNG of at least 200x150 pixels, and is not blank."""
    path = answer.file(name)
    if path is None:
        return fail(f"{name} was not written (files: {sorted(answer.files)})")
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return fail(f"{name} is not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    if width < 200 or height < 150:
        return fail(f"{name} is only {width}x{height}")
    from PIL import Image

    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    if colours is not None and len(colours) < min_colours:
        return fail(f"{name} is blank ({len(colours)} colour(s))")
    return PASS
