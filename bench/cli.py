"""`autocoder run` of a trivial prompt against the original design's one-shot, side by side.

The model is the scripted OpenAI-compatible server on 127.0.0.1 (autocoder/testing.py), which
answers at once with `print('hello')`. Each round runs, one after the other so that all see the
same machine load:
- `autocoder run --json` of the prompt, its kernel exec'd (AUTOCODER_KERNEL_START=exec) and,
  where kernels can be forked here, forked from a zygote the command boots
  (AUTOCODER_KERNEL_START=fork): a fresh confined kernel, a notebook and a record each time;
- the original design: a fresh `python` that asks the model (urllib), writes the code to a
  file and `subprocess.run`s it: no sandbox, no notebook, no record;
- `python -c pass`: the interpreter alone.

    python bench/cli.py [--rounds 10] [--sandbox bwrap|none]

Printed: p50 and p90 wall time of each, and the ratios of the p50s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "print hello"
CODE = "print('hello')"

# The original AutoCoder's one-shot: ask, write generated_code.py, run it with subprocess.
ORIGINAL = """
import json, re, subprocess, sys, urllib.request
url, workdir, prompt = sys.argv[1:4]
request = urllib.request.Request(
    url + "/chat/completions",
    data=json.dumps({"model": "scripted-model",
                     "messages": [{"role": "user", "content": prompt}]}).encode(),
    headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
)
with urllib.request.urlopen(request, timeout=60) as reply:
    content = json.load(reply)["choices"][0]["message"]["content"]
match = re.search(r"```(?:python)?\\n(.*?)```", content, re.DOTALL)
code = match.group(1) if match else content
path = workdir + "/generated_code.py"
with open(path, "w") as f:
    f.write(code)
proc = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=10)
print(json.dumps({"status": "success" if proc.returncode == 0 else "error",
                  "filename": path, "code": code, "output": proc.stdout, "error": proc.stderr}))
"""


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}… failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return took, proc.stdout


def forkable(env: dict[str, str]) -> bool:
    """Whether kernels can be forked here (else only the exec'd row is measured)."""
    from autocoder.config import load_settings
    from autocoder.kernel import fork

    settings = load_settings(sandbox=env["AUTOCODER_SANDBOX"], kernel_start="fork")
    reason = fork.why_not(settings)
    if reason:
        print(f"(no forked row: {reason})")
    fork.close_all()
    return reason is None


def main() -> None:
    from autocoder.testing import ScriptedLLM, fenced

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    args = parser.parse_args()

    llm = ScriptedLLM(responder=lambda body: fenced(CODE)).start()
    work = Path(tempfile.mkdtemp(prefix="autocoder-bench-cli-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY="sk-bench",
        AUTOCODER_SANDBOX=args.sandbox,
        AUTOCODER_LLM_RETRIES="0",
        AUTOCODER_HOME=str(work / "home"),
        AUTOCODER_NOTEBOOKS_DIR=str(work / "notebooks"),
        AUTOCODER_AUTOFILE_DIR=str(work / "autofile"),
    )
    command = shutil.which("autocoder", path=str(Path(sys.executable).parent))
    run = [command] if command else [sys.executable, "-m", "autocoder"]
    run += ["run", "--json", "--quiet", PROMPT]
    cmds: dict[str, tuple[list[str], dict[str, str]]] = {
        "autocoder run (exec'd kernel)": (run, {**env, "AUTOCODER_KERNEL_START": "exec"}),
    }
    if forkable(env):
        cmds["autocoder run (zygote booted, kernel forked)"] = (
            run,
            {**env, "AUTOCODER_KERNEL_START": "fork"},
        )
    cmds["original design (python, urllib, subprocess.run)"] = (
        [sys.executable, "-c", ORIGINAL, llm.base_url, str(work), PROMPT],
        env,
    )
    cmds["python -c pass"] = ([sys.executable, "-c", "pass"], env)

    times: dict[str, list[float]] = {name: [] for name in cmds}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms the caches and is not counted
            for name, (cmd, cmd_env) in cmds.items():
                took, out = timed(cmd, cmd_env, work)
                if cmd[-1] == PROMPT:
                    result = json.loads(out)
                    assert result["status"] == "success", result
                    assert result["output"].strip() == "hello", result
                if round_:
                    times[name].append(took)
    finally:
        llm.stop()
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    print(
        f"prompt={PROMPT!r} model=scripted (instant) sandbox={args.sandbox} rounds={args.rounds} "
        f"python={sys.version.split()[0]} cpus={os.cpu_count()} load={load:.2f} (1-min, at the end)\n"
    )
    original = statistics.median(times["original design (python, urllib, subprocess.run)"])
    bare = statistics.median(times["python -c pass"])
    print("| one-shot | p50 wall | p90 wall | / original design | / python -c pass |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        p50 = statistics.median(values)
        p90 = sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"| {name} | {p50:.3f} s | {p90:.3f} s | {p50 / original:.1f}x | {p50 / bare:.1f}x |")


if __name__ == "__main__":
    main()
