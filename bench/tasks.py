"""Realistic tasks through the real CLI: how often the answer is right, and how often a run
reports success with a wrong answer.

Each task of bench/tasks/ (questions about a CSV or JSON file, files to write, everyday
programming, tasks that need care) is run as a user would run it:
`autocoder run --json --file ... "<prompt>"`, and its checker (written, and validated against
reference solutions, before any model ran) judges the JSON's `output` and the files written
in its `workdir`. Every run is counted as one of:

  correct          status success, and the checker accepts the answer
  wrong success    status success, and the checker rejects it: a confident wrong answer
  honest failure   status error (every attempt failed, or the model did)
  uncertain        status error with error_kind "uncertain" (the candidates disagreed)
  no result        the CLI gave no JSON (bad configuration, crash, or it ran out of time)

    python bench/tasks.py                                   # every task, the default model
    python bench/tasks.py --tasks region_revenue,iso_week   # some tasks (names or globs)
    python bench/tasks.py --category data --limit 5
    python bench/tasks.py --every 2                         # every other task: a subset
    python bench/tasks.py --models 0.5b --models 1.5b --ks 1,4 --out /tmp/tasks.jsonl
    python bench/tasks.py --list
    python bench/tasks.py --rejudge /tmp/tasks.jsonl        # judge recorded runs again

A model is `0.5b` or `1.5b` (the embedded model, AUTOCODER_LOCAL_MODEL; OPENAI_* are
removed from its runs) or `endpoint` / `endpoint:NAME` (the OpenAI-compatible endpoint that
OPENAI_BASE_URL / OPENAI_API_KEY name, with model NAME). The default is `endpoint` when
OPENAI_* are set, else the embedded model AUTOCODER_LOCAL_MODEL names (1.5b). K is passed as
AUTOCODER_CANDIDATES (`default` leaves it unset: the engine's own default); for each model
the runs of one task at every K come one after another, so K=1 and another K are measured
side by side under the same load. Time to answer is the wall time of the whole CLI run, as
a user waits for it (the model's start included).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# `bench/tasks/` (the catalog, a package) and this script share a name; importing it through
# `bench.` from the repository root is unambiguous.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tasks import CATEGORIES, TASKS, Answer, Task  # noqa: E402

KINDS = ("correct", "wrong", "failed", "uncertain", "no_result")
KIND_TITLES = {
    "correct": "correct",
    "wrong": "WRONG success",
    "failed": "honest failure",
    "uncertain": "uncertain",
    "no_result": "no result",
}
EMBEDDED = ("0.5b", "1.5b")


@dataclass(frozen=True)
class Model:
    """Which model answers, and the environment that makes the CLI use it."""

    label: str
    env: Mapping[str, str]


@dataclass
class Outcome:
    task: str
    category: str
    model: str
    k: str
    kind: str
    why: str
    seconds: float
    right: bool = False
    status: str = ""
    error_kind: str | None = None
    attempts: int = 0
    tokens: int | None = None
    candidates: int | None = None
    agreement: int | None = None
    exit_code: int | None = None
    output: str = ""
    code: str = ""
    notebook: str = ""
    workdir: str = ""
    files: list[str] | None = None
    stderr: str = ""


def resolve_model(spec: str, environ: Mapping[str, str]) -> Model:
    """A `--models` entry as the environment its CLI runs get (SystemExit if it cannot run)."""
    base = {k: v for k, v in environ.items() if not k.startswith(("OPENAI_", "AUTOCODER_"))}
    kept = {k: v for k, v in environ.items() if k.startswith("AUTOCODER_")}
    kept.pop("AUTOCODER_CANDIDATES", None)
    if spec in EMBEDDED:
        reason = embedded_unavailable(spec)
        if reason:
            raise SystemExit(f"tasks.py: the embedded {spec} model cannot run: {reason}")
        kept.pop("AUTOCODER_MODEL", None)
        return Model(spec, {**base, **kept, "AUTOCODER_LOCAL_MODEL": spec})
    if spec == "endpoint" or spec.startswith("endpoint:"):
        remote = {k: v for k, v in environ.items() if k.startswith("OPENAI_")}
        if not remote:
            raise SystemExit("tasks.py: `endpoint` needs OPENAI_BASE_URL and/or OPENAI_API_KEY")
        name = spec.partition(":")[2]
        if name:
            kept["AUTOCODER_MODEL"] = name
        label = name or environ.get("AUTOCODER_MODEL") or "endpoint"
        return Model(label, {**base, **kept, **remote})
    raise SystemExit(f"tasks.py: unknown model {spec!r} (0.5b, 1.5b, endpoint or endpoint:NAME)")


def default_model(environ: Mapping[str, str]) -> str:
    if environ.get("OPENAI_BASE_URL") or environ.get("OPENAI_API_KEY"):
        return "endpoint"
    return environ.get("AUTOCODER_LOCAL_MODEL", "1.5b")


def embedded_unavailable(key: str) -> str | None:
    """Why the shipped model `key` cannot be loaded here, or None (nothing is assembled)."""
    from autocoder import local_model
    from autocoder.config import load_settings
    from autocoder.errors import ConfigError

    settings = load_settings(local_model=key)
    shipped = local_model.shipped_model(settings)
    path = local_model.model_file_path(settings)
    if path.is_file() and local_model.is_verified(path, shipped):
        return None
    try:
        for chunk in shipped.chunks:
            local_model.installed_chunk(chunk)
    except ConfigError as e:
        return str(e)
    return None


def select(
    names: Sequence[str], categories: Sequence[str], limit: int | None, every: int = 1
) -> list[Task]:
    """The tasks named (names or glob patterns) and in the categories given, in catalog order;
    with `every`, one in so many of them (the first, then every so many: the catalog is in
    category order, so each category keeps its share)."""
    chosen = [
        t
        for t in TASKS
        if (not names or any(fnmatch.fnmatchcase(t.name, n) for n in names))
        and (not categories or t.category in categories)
    ]
    unknown = [n for n in names if not any(fnmatch.fnmatchcase(t.name, n) for t in TASKS)]
    if unknown:
        raise SystemExit(f"tasks.py: no task matches {unknown} (see --list)")
    chosen = chosen[::every]
    return chosen[:limit] if limit is not None else chosen


def tokens_of(attempts: Iterable[Mapping[str, Any]]) -> int | None:
    """Tokens the model generated over a run's attempts and their other candidates; None when
    the JSON does not report them."""
    total, seen = 0, False
    for a in attempts:
        if "tokens" in a:
            total += int(a["tokens"] or 0)
            seen = True
        others = tokens_of(a.get("others") or [])
        if others is not None:
            total += others
            seen = True
    return total if seen else None


def answer_of(result: Mapping[str, Any]) -> Answer:
    """What the checker judges: the output, and the files written in the run's workdir."""
    workdir = Path(result.get("workdir") or ".")
    files = {f["name"]: workdir / f["name"] for f in result.get("files") or []}
    return Answer(result.get("output") or "", files)


def judge(task: Task, result: Mapping[str, Any]) -> tuple[str, bool, str]:
    """(kind, whether the answer given is right, the checker's reason)."""
    try:
        verdict = task.check(answer_of(result))
        right, why = verdict.ok, verdict.why
    except Exception as e:  # a checker that breaks on an odd answer is a wrong answer, said so
        right, why = False, f"the checker could not read the answer: {type(e).__name__}: {e}"
    if result.get("status") == "success":
        return ("correct" if right else "wrong"), right, why
    if result.get("error_kind") == "uncertain":
        return "uncertain", right, why
    error = (result.get("error") or "").strip().splitlines()
    return "failed", right, f"{result.get('error_kind')}: {error[-1] if error else ''}"


def run_cli(
    cmd: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float
) -> tuple[int | None, str, str, float]:
    """Run the CLI as a user would; (exit code or None if it ran out of time, stdout, stderr,
    seconds). Out of time, it is stopped as Ctrl-C stops it (SIGTERM), then killed."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=60)
        code = None
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        raise
    return code, out, err, time.monotonic() - start


def run_task(
    task: Task, model: Model, k: str, work: Path, *, timeout: float, cli: Sequence[str]
) -> Outcome:
    inputs = work / "inputs" / task.name
    if not inputs.is_dir():
        inputs.mkdir(parents=True)
        for name, data in task.inputs().items():
            (inputs / name).write_bytes(data)
    files = [arg for name in sorted(task.inputs()) for arg in ("--file", str(inputs / name))]
    env = dict(model.env)
    if k != "default":
        env["AUTOCODER_CANDIDATES"] = k
    cmd = [*cli, "run", "--json", "-q", *files, "--", task.prompt]
    code, out, err, seconds = run_cli(cmd, env, work, timeout)
    outcome = Outcome(task.name, task.category, model.label, k, "no_result", "", seconds)
    outcome.exit_code, outcome.stderr = code, err[-4000:]
    try:
        result = json.loads(out)
    except ValueError:
        last = err.strip().splitlines()[-1:] or ["no output"]
        outcome.why = "out of time" if code is None else f"exit {code}: {last[0]}"
        return outcome
    kind, right, why = judge(task, result)
    attempts = result.get("attempts") or []
    outcome.kind, outcome.right, outcome.why = kind, right, str(why)
    outcome.status = result.get("status", "")
    outcome.error_kind = result.get("error_kind")
    outcome.attempts = len(attempts)
    outcome.tokens = result["tokens"] if "tokens" in result else tokens_of(attempts)
    outcome.candidates = result.get("candidates")
    outcome.agreement = result.get("agreement")
    outcome.output = (result.get("output") or "")[-4000:]
    outcome.code = result.get("code") or ""
    outcome.notebook = result.get("notebook") or ""
    outcome.workdir = result.get("workdir") or ""
    outcome.files = [f["name"] for f in result.get("files") or []]
    return outcome


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def summary(outcomes: Sequence[Outcome]) -> str:
    """The table: one row per model and K, side by side; then by category, then retries."""
    keys = list(dict.fromkeys((o.model, o.k) for o in outcomes))
    head = (
        f"{'model':<10} {'K':>7} {'tasks':>5}  {'correct':>13}  {'WRONG success':>13}  "
        f"{'honest failure':>14}  {'uncertain':>10}  {'no result':>9}  {'p50 s':>6} "
        f"{'p90 s':>6}  {'tokens/run':>10}  {'agree':>7}"
    )
    rows = [head, "-" * len(head)]
    for model, k in keys:
        mine = [o for o in outcomes if (o.model, o.k) == (model, k)]
        n = len(mine)

        def cell(kind: str, width: int, mine: list[Outcome] = mine, n: int = n) -> str:
            c = sum(o.kind == kind for o in mine)
            return f"{c:>3}/{n:<3} {100 * c / n:3.0f}%".rjust(width)

        secs = [o.seconds for o in mine]
        toks = [o.tokens for o in mine if o.tokens is not None]
        tokens = f"{statistics.fmean(toks):.0f}" if len(toks) == n else "n/a"
        agreeing = [o for o in mine if o.candidates]
        agree = (
            f"{sum(o.agreement or 0 for o in agreeing) / sum(o.candidates or 0 for o in agreeing):.0%}"
            if agreeing
            else "n/a"
        )
        rows.append(
            f"{model:<10} {k:>7} {n:>5}  {cell('correct', 13)}  {cell('wrong', 13)}  "
            f"{cell('failed', 14)}  {cell('uncertain', 10)}  {sum(o.kind == 'no_result' for o in mine):>9}  "
            f"{percentile(secs, 50):>6.1f} {percentile(secs, 90):>6.1f}  {tokens:>10}  {agree:>7}"
        )
    rows.append("")
    rows.append("correct / WRONG success by category:")
    cats = [c for c in CATEGORIES if any(o.category == c for o in outcomes)]
    rows.append(f"{'model':<10} {'K':>7}  " + "  ".join(f"{c:>16}" for c in cats))
    for model, k in keys:
        cells = []
        for c in cats:
            mine = [o for o in outcomes if (o.model, o.k, o.category) == (model, k, c)]
            right = sum(o.kind == "correct" for o in mine)
            wrong = sum(o.kind == "wrong" for o in mine)
            cells.append(f"{right:>3} / {wrong:<3} of {len(mine):<3}".rjust(16))
        rows.append(f"{model:<10} {k:>7}  " + "  ".join(cells))
    rows.append("")
    for model, k in keys:
        mine = [o for o in outcomes if (o.model, o.k) == (model, k)]
        retried = [o for o in mine if o.status == "success" and o.attempts > 1]
        uncertain_right = sum(o.kind == "uncertain" and o.right for o in mine)
        rows.append(
            f"{model} K={k}: {len(retried)} run(s) succeeded after a retry, "
            f"{sum(o.right for o in retried)} of them correct; "
            f"{uncertain_right} uncertain run(s) had the right answer"
        )
    return "\n".join(rows)


def rejudge(path: Path) -> list[Outcome]:
    """The runs of an `--out` file, judged again by the current checkers (after a checker is
    fixed, no model needs to run again). A run that recorded no workdir is judged on its output
    alone, except that a task about written files keeps its recorded verdict."""
    by_name = {t.name: t for t in TASKS}
    outcomes = []
    for line in path.read_text().splitlines():
        o = Outcome(**json.loads(line))
        if o.kind != "no_result" and (o.workdir or o.category != "files"):
            files = [{"name": name} for name in o.files or []]
            result = {"status": o.status, "error_kind": o.error_kind, "output": o.output}
            kind, right, why = judge(
                by_name[o.task], {**result, "workdir": o.workdir, "files": files}
            )
            if kind != o.kind:
                print(f"{o.model} K={o.k} {o.task}: {KIND_TITLES[o.kind]} -> {KIND_TITLES[kind]}")
            o.kind, o.right, o.why = kind, right, why
        outcomes.append(o)
    return outcomes


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--tasks", action="append", default=[], help="names or globs, comma-separated; repeatable"
    )
    parser.add_argument("--category", action="append", default=[], choices=CATEGORIES)
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks chosen")
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="N",
        help="one task in N of those chosen (a subset with every category's share)",
    )
    parser.add_argument(
        "--models",
        action="append",
        default=[],
        help="0.5b, 1.5b, endpoint[:NAME]; comma-separated; repeatable",
    )
    parser.add_argument(
        "--ks", default="1", help="candidates per attempt, e.g. 1,4 (`default`: the engine's)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one CLI run may take")
    parser.add_argument(
        "--work", type=Path, default=None, help="where runs, notebooks and inputs go"
    )
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per run")
    parser.add_argument("--list", action="store_true", help="list the tasks and exit")
    parser.add_argument(
        "--rejudge",
        type=Path,
        default=None,
        metavar="F",
        help="judge the runs an earlier --out F recorded with today's checkers; run nothing",
    )
    args = parser.parse_args(argv)
    if args.rejudge:
        print(summary(rejudge(args.rejudge)))
        return 0

    names = [n.strip() for entry in args.tasks for n in entry.split(",") if n.strip()]
    if args.every < 1:
        raise SystemExit("tasks.py: --every takes a whole number >= 1")
    tasks = select(names, args.category, args.limit, args.every)
    if args.list:
        for t in tasks:
            print(f"{t.category:<12} {t.name:<26} {t.prompt}")
        return 0
    specs = [m.strip() for entry in args.models for m in entry.split(",") if m.strip()]
    models = [resolve_model(s, os.environ) for s in specs or [default_model(os.environ)]]
    ks = [k.strip() for k in args.ks.split(",") if k.strip()]
    bad = [k for k in ks if k != "default" and not (k.isdigit() and int(k) >= 1)]
    if bad or not ks:
        raise SystemExit(f"tasks.py: --ks takes whole numbers >= 1 or `default`, not {args.ks!r}")
    work = args.work or Path(tempfile.mkdtemp(prefix="autocoder-tasks-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "autocoder"]
    total = len(tasks) * len(models) * len(ks)
    print(
        f"{len(tasks)} task(s) x models {[m.label for m in models]} x K {ks} = {total} run(s); "
        f"work dir {work}",
        flush=True,
    )
    # SIGTERM (how a background run is stopped) ends it as Ctrl-C does: the CLI run under way
    # is stopped too, and the figures of the runs finished are printed.
    signal.signal(signal.SIGTERM, _interrupt)
    outcomes: list[Outcome] = []
    out = args.out.open("w") if args.out else None
    try:
        for model in models:
            for task in tasks:
                for k in ks:
                    o = run_task(task, model, k, work, timeout=args.timeout, cli=cli)
                    outcomes.append(o)
                    extra = f" {o.agreement}/{o.candidates} agree" if o.candidates else ""
                    print(
                        f"[{len(outcomes)}/{total}] {model.label} K={k} {task.name}: "
                        f"{KIND_TITLES[o.kind]} ({o.seconds:.1f} s, {o.attempts} attempt(s){extra})"
                        + (f" - {o.why}" if o.why and o.kind != "correct" else ""),
                        flush=True,
                    )
                    if out:
                        out.write(json.dumps(asdict(o)) + "\n")
                        out.flush()
    except KeyboardInterrupt:
        print("interrupted; the figures below cover the runs finished", flush=True)
    finally:
        if out:
            out.close()
    if outcomes:
        print()
        print(summary(outcomes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
