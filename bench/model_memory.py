"""Resident memory of the embedded model's server: autocoder's flags against the server's defaults.

Both servers load the same verified GGUF at the same context size, answer the same long prompt
(about 3,400 tokens) with 400 generated tokens, and their VmRSS is read from /proc, side by side.

    python bench/model_memory.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from autocoder import local_model
from autocoder.config import load_settings

PROMPT = "Explain what this program does, line by line:\n\n" + "".join(
    f"def step_{i}(x):\n    return (x * {i} + {i * 7}) % 1000003\n\n" for i in range(110)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(argv: list[str], port: int, name: str) -> tuple[float, float, int]:
    """(RSS after loading, RSS after the long request, prompt tokens) for one server."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(argv)}")
            time.sleep(0.2)
        loaded = rss_mb(proc.pid)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600)
        reply = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=400,
            temperature=0,
        )
        tokens = reply.usage.prompt_tokens if reply.usage else 0
        return loaded, rss_mb(proc.pid), tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    settings = load_settings()
    model_file = local_model.ensure_model_file(settings)
    name = local_model.model_name(settings)
    port = free_port()
    ours = local_model.server_args(settings, model_file, name, port)
    port2 = free_port()
    defaults = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_file),
        "--model_alias",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port2),
        "--n_ctx",
        str(settings.local_n_ctx),
    ]
    print(f"model={name} n_ctx={settings.local_n_ctx}")
    print(f"{'server':<28}{'loaded MB':>11}{'after request MB':>18}{'prompt tokens':>15}")
    results = {}
    for label, argv, p in (
        ("autocoder's flags", ours, port),
        ("llama-cpp defaults", defaults, port2),
    ):
        loaded, after, tokens = measure(argv, p, name)
        results[label] = after
        print(f"{label:<28}{loaded:>11.0f}{after:>18.0f}{tokens:>15}")
    ratio = results["llama-cpp defaults"] / results["autocoder's flags"]
    print(f"resident after the request: defaults / autocoder = {ratio:.1f}x")


if __name__ == "__main__":
    main()
