"""What the user's data costs: `/run` with a 10 MB CSV against no file, and a kernel's start as
shipped (forked kernels find numpy, pandas and matplotlib loaded) against a start that then
imports them.

Both comparisons run side by side in one process (interleaved), against a real uvicorn, real
kernels and the scripted model on 127.0.0.1, and print medians and their ratio.

    python bench/files.py [--repeat 10] [--mb 10] [--sandbox bwrap|none]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from autocoder import api
from autocoder.config import load_settings
from autocoder.kernel import fork as forkserver
from autocoder.kernel.pool import new_kernel
from autocoder.testing import ScriptedLLM, fenced

CODE = "import os\nprint(sorted(os.listdir('.')))"
PROBE = (
    "import sys\nprint(sorted(m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules))"
)


def csv_of(mb: int) -> bytes:
    row = b"2024-01-01,store-042,widget,17,123.45\n"
    return b"day,store,item,qty,revenue\n" + row * (mb * 1024 * 1024 // len(row))


def run_p50(settings_root: Path, sandbox: str, repeat: int, mb: int) -> None:
    llm = ScriptedLLM().start()
    llm.responder = lambda body: fenced(CODE)
    settings = load_settings(
        openai_base_url=llm.base_url,
        openai_api_key="unused",
        notebooks_dir=settings_root / "nb",
        autofile_dir=settings_root / "af",
        sandbox=sandbox,
        pool_size=2,
        max_upload_mb=mb + 1,
        llm_retries=0,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(api.create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    data = csv_of(mb)
    plain: list[float] = []
    with_file: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=120) as c:
            c.post("/run", json={"prompt": "warm up"})
            for _ in range(repeat):
                t = time.perf_counter()
                r = c.post("/run", json={"prompt": "list the files"})
                plain.append(time.perf_counter() - t)
                assert r.json()["status"] == "success", r.text
                t = time.perf_counter()
                r = c.post(
                    "/run",
                    data={"prompt": "list the files"},
                    files=[("files", ("sales.csv", data, "text/csv"))],
                )
                with_file.append(time.perf_counter() - t)
                assert "sales.csv" in r.json()["output"], r.text
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        llm.stop()
    a, b = statistics.median(plain), statistics.median(with_file)
    print(f"/run p50, no file:        {a * 1000:7.0f} ms  (n={repeat})")
    print(f"/run p50, {mb} MB CSV:      {b * 1000:7.0f} ms  (n={repeat})")
    print(f"ratio with/without file:  {b / a:7.2f}x")


async def kernel_starts(root: Path, sandbox: str, repeat: int) -> None:
    settings = load_settings(sandbox=sandbox, autofile_dir=root / "k")
    if forkserver.why_not(settings) is None:  # every start a forked one, as a server's are
        await forkserver.zygote_for(settings).ready()
    bare: list[float] = []
    eager: list[float] = []
    loaded: list[str] = []
    for _ in range(repeat):
        t = time.perf_counter()
        async with new_kernel(settings) as k:
            bare.append(time.perf_counter() - t)
            loaded.append((await k.execute(PROBE, timeout=30)).text.strip())
        t = time.perf_counter()
        async with new_kernel(settings) as k:
            await k.execute("import numpy, pandas, matplotlib.pyplot", timeout=60)
            eager.append(time.perf_counter() - t)
    a, b = statistics.median(bare), statistics.median(eager)
    print(f"kernel start as shipped:              {a * 1000:7.0f} ms  (n={repeat})")
    print(f"kernel start importing the stack:     {b * 1000:7.0f} ms  (n={repeat})")
    print(f"ratio eager/as shipped:               {b / a:7.2f}x")
    alike = (
        "all alike" if len(set(loaded)) == 1 else f"{len(set(loaded))} kinds: {sorted(set(loaded))}"
    )
    print(f"data modules loaded after a start:    {loaded[0]} ({alike})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--mb", type=int, default=10)
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autocoder-bench-files-"))
    print(f"sandbox={args.sandbox} repeat={args.repeat}")
    run_p50(root, args.sandbox, args.repeat, args.mb)
    try:
        asyncio.run(kernel_starts(root, args.sandbox, max(3, args.repeat // 2)))
    finally:
        forkserver.close_all()


if __name__ == "__main__":
    main()
