"""`autocoder run` with the embedded model: a server of its own each time against the shared,
kept-warm one (AUTOCODER_MODEL_KEEP_ALIVE), interleaved in one run so both see the same load.

Each run is the README's first command, timed from start to exit (the model's reply included).
The warm side's first run starts the shared server and is reported apart; its later runs find
it running.

    python bench/warm_model.py [--repeat 3] [--prompt "print the sum of 2 and 3"]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autocoder.keepalive import keeper_pids


def run_once(env: dict[str, str], prompt: str, cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "autocoder", "run", "--json", "-q", prompt],
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=900,
    )
    took = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"autocoder run failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt", default="print the sum of 2 and 3")
    args = parser.parse_args()

    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODER_"))}
    with tempfile.TemporaryDirectory(prefix="warm-bench-") as tmp:
        root = Path(tmp)
        # One home for both sides: the model file is assembled once, outside the timing.
        home = Path(os.environ.get("AUTOCODER_HOME", "~/.cache/autocoder")).expanduser()
        cold = {**base, "AUTOCODER_HOME": str(home), "AUTOCODER_MODEL_KEEP_ALIVE": "0"}
        warm = {**base, "AUTOCODER_HOME": str(home), "AUTOCODER_MODEL_KEEP_ALIVE": "120"}
        for env in (cold, warm):
            env["AUTOCODER_NOTEBOOKS_DIR"] = str(root / "notebooks")
            env["AUTOCODER_AUTOFILE_DIR"] = str(root / "autofile")
        run_once(cold, args.prompt, root)  # assembles the model file if needed
        try:
            first_warm = run_once(warm, args.prompt, root)
            own, shared = [], []
            for _ in range(args.repeat):
                own.append(run_once(cold, args.prompt, root))
                shared.append(run_once(warm, args.prompt, root))
        finally:
            for pid in keeper_pids(home):
                os.kill(pid, signal.SIGTERM)
    load = os.getloadavg()[0]
    own_p50, shared_p50 = statistics.median(own), statistics.median(shared)
    print(f"autocoder run, embedded model, {args.repeat} runs each, load {load:.1f}")
    print(f"  own server each run (keep-alive 0):   p50 {own_p50:6.2f} s")
    print(f"  shared warm server (keep-alive 120):  p50 {shared_p50:6.2f} s")
    print(f"  the first warm run (starts it):           {first_warm:6.2f} s")
    print(f"warm / own: {shared_p50 / own_p50:.2f}x")


if __name__ == "__main__":
    main()
