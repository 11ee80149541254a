"""Remake docs/jupyterlab-retried-run.png: a retried run's notebook, opened in JupyterLab.

    pip install jupyterlab playwright      # locally; neither is a dependency of autocoder
    apt-get install chromium               # Playwright drives this one, it downloads none
    python docs/screenshot.py [--sandbox none]

A real run (real kernel) against the scripted model on 127.0.0.1: the first reply fails, the
second works. JupyterLab serves a temporary folder holding that run's notebook only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from autocoder.config import load_settings
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced

OUT = Path(__file__).resolve().parent / "jupyterlab-retried-run.png"
CHROMIUM = "/usr/bin/chromium"
PROMPT = "Find the three most common words in this sentence and print them with their counts: the cat and the dog and the bird"
FIRST = """\
from collections import Counter

words = sentence.split()
for word, count in Counter(words).most_common(3):
    print(f"{word}: {count}")
"""
SECOND = """\
from collections import Counter

sentence = "the cat and the dog and the bird"
counts = Counter(sentence.split())
for word, count in counts.most_common(3):
    print(f"{word:>4}: {count}")
assert counts["the"] == 3
"""


async def make_run(root: Path, sandbox: str) -> Path:
    llm = ScriptedLLM().start()
    llm.script(fenced(FIRST), fenced(SECOND))
    settings = load_settings(
        openai_base_url=llm.base_url,
        openai_api_key="not-a-real-key",
        notebooks_dir=root / "notebooks",
        autofile_dir=root / "autofile",
        sandbox=sandbox,
        pool_size=0,
        llm_retries=0,
    )
    runner = Runner(settings)
    try:
        result = await runner.run(PROMPT, max_attempts=3)
    finally:
        await runner.close()
        llm.stop()
    assert result.status == "success" and len(result.attempts) == 2, result.error
    return Path(result.notebook)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"JupyterLab did not answer at {url}")


def shoot(notebook: Path, root: Path) -> None:
    from playwright.sync_api import sync_playwright

    port, token = free_port(), secrets.token_hex(16)
    settings_dir = root / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings_dir.mkdir(parents=True)
    (settings_dir / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
    env.update(
        JUPYTERLAB_SETTINGS_DIR=str(root / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(root / "lab-workspaces"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={notebook.parent}",
            "--LabApp.news_url=",
            "--ServerApp.terminals_enabled=False",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/api/status?token={token}", time.monotonic() + 60)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(f"{base}/lab/tree/{notebook.name}?token={token}", timeout=60_000)
                page.wait_for_selector(".jp-MarkdownOutput h1", timeout=60_000)
                page.wait_for_selector(".jp-OutputArea-output pre", timeout=60_000)
                page.wait_for_selector(
                    ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000
                )
                page.wait_for_timeout(1000)
                dirty = page.locator(".lm-TabBar-tab.jp-mod-dirty").count()
                print(f"tabs with unsaved changes after opening: {dirty}", file=sys.stderr)
                # The failed attempt is history, collapsed: open it to show what it hit.
                page.locator("summary").first.click()
                page.wait_for_timeout(1500)
                page.screenshot(path=str(OUT))
            finally:
                browser.close()
    finally:
        try:
            request = urllib.request.Request(
                f"{base}/api/shutdown?token={token}", method="POST", data=b""
            )
            urllib.request.urlopen(request, timeout=10).close()
            server.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            server.terminate()
            server.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", choices=["bwrap", "none"], default="bwrap")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autocoder-shot-"))
    try:
        notebook = asyncio.run(make_run(root, args.sandbox))
        shoot(notebook, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
