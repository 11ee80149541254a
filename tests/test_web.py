"""The web page, as a person uses it: a real server, real kernels, the scripted model, and
headless Chromium (Debian's, driven by Playwright) with every outside host blocked."""

from __future__ import annotations

import importlib.util
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from autocoder.testing import Reply, ScriptedLLM, fenced
from tests.conftest import LiveServer
from tests.test_api import make_settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STATIC = Path(__file__).resolve().parent.parent / "autocoder" / "api" / "web" / "static"
TOKEN = "web-page-token-123"
# A 1x1 PNG.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _browser_missing() -> str:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; install.sh --test)"
    if not Path(CHROMIUM).exists():
        return "chromium is not installed (apt-get install chromium; install.sh --test)"
    return ""


needs_browser = pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "ok")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("web"), llm_server, pool_size=1)
    with LiveServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM
) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("web-token"), llm_server, pool_size=0, api_token=TOKEN
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A browser tab that may reach 127.0.0.1 only, and remembers what it was refused and
    any dialog a script tried to open."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.context = browser.new_context(accept_downloads=True)
        self.context.set_default_timeout(60_000)
        self.outside: list[str] = []
        self.dialogs: list[str] = []
        self.page = self.context.new_page()
        self.page.route("**/*", self._route)
        self.page.on("dialog", self._dialog)

    def _route(self, route: Any) -> None:
        url = route.request.url
        host = urlsplit(url).hostname
        if url.startswith(("data:", "blob:", "about:")) or host == "127.0.0.1":
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, path: str) -> Any:
        self.page.goto(self.base + path)
        return self.page

    def ask(self, prompt: str, attempts: int | None = None, timeout: float | None = None) -> Any:
        """Type a prompt on the run page and wait for its final status."""
        turn = self.send(prompt, attempts, timeout)
        turn.locator(".status.ok, .status.bad").wait_for()
        return turn

    def send(self, prompt: str, attempts: int | None = None, timeout: float | None = None) -> Any:
        """Type a prompt on the run page and send it; its turn, as it starts."""
        page = self.page
        turns = page.locator(".turn").count()
        page.fill("#prompt", prompt)
        if attempts:
            page.fill("#max_attempts", str(attempts))
        if timeout:
            page.fill("#timeout", f"{timeout:g}")
        page.click("#send")
        return page.locator(".turn").nth(turns)


def close_sessions(server: LiveServer) -> None:
    """Each tab opens a session, which keeps a kernel: closed after the test, as a user would,
    so the server's AUTOCODER_MAX_SESSIONS is never the limit a later test meets."""
    listed = httpx.get(f"{server.url}/sessions", params={"limit": 100}, timeout=30).json()
    for s in listed["sessions"]:
        if s["status"] == "open":
            httpx.delete(f"{server.url}/sessions/{s['session_id']}", timeout=60)


@pytest.fixture
def tab(browser: Any, live: LiveServer) -> Iterator[Tab]:
    t = Tab(browser, live.url)
    yield t
    t.context.close()
    close_sessions(live)
    assert t.outside == [], "the page asked for something beyond 127.0.0.1"
    assert t.dialogs == [], "a script from a prompt or an output ran"


# --- without a browser ---------------------------------------------------------------


def test_pages_carry_a_strict_csp_and_no_run_data(live: LiveServer, llm: ScriptedLLM) -> None:
    llm.script(fenced("print('<script>alert(1)</script>')"))
    prompt = "say <script>alert('x')</script> please"
    run = httpx.post(f"{live.url}/run", json={"prompt": prompt}, timeout=60).json()
    for path in ("/", "/history", f"/history/{run['run_id']}"):
        r = httpx.get(live.url + path)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp
        assert "unsafe-inline" not in csp and "http" not in csp
        assert "<script>alert" not in r.text and "alert(1)" not in r.text
        assert "<script>" not in r.text  # every script is a static file: <script src=...>
    assert httpx.get(f"{live.url}/history/not%20an%20id").status_code == 422


def test_the_pages_scripts_never_write_html() -> None:
    for js in STATIC.glob("*.js"):
        text = js.read_text()
        assert (
            "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text
        )
        assert "eval(" not in text and "document.write" not in text


def test_the_shipped_redoc_asks_no_cdn() -> None:
    bundle = (STATIC / "vendor" / "redoc" / "redoc.standalone.js").read_text()
    assert "cdn." not in bundle and "logo-mini.svg" not in bundle


def test_docs_use_local_assets_only(live: LiveServer) -> None:
    for path in ("/docs", "/redoc"):
        r = httpx.get(live.url + path)
        assert r.status_code == 200
        assert "cdn." not in r.text and "https://" not in r.text.replace("https://github.com", "")
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{live.url}/docs/oauth2-redirect").status_code == 200
    swagger = httpx.get(f"{live.url}/static/swagger/swagger-ui-bundle.js")
    redoc = httpx.get(f"{live.url}/static/vendor/redoc/redoc.standalone.js")
    assert swagger.status_code == redoc.status_code == 200
    schema = httpx.get(f"{live.url}/openapi.json").json()
    assert "/" not in schema["paths"] and "/history" not in schema["paths"]


def test_history_searches_prompts_in_sql(live: LiveServer, llm: ScriptedLLM) -> None:
    llm.script(fenced("print('ok')"))
    httpx.post(f"{live.url}/run", json={"prompt": "count 100% of the_apples"}, timeout=60)
    runs = httpx.get(f"{live.url}/runs", params={"q": "100% OF THE_"}).json()
    assert [r["prompt"] for r in runs["runs"]] == ["count 100% of the_apples"]
    assert httpx.get(f"{live.url}/runs", params={"q": "0%_"}).json()["total"] == 0


def test_token_server_serves_the_shell_but_not_the_history(guarded: LiveServer) -> None:
    assert httpx.get(f"{guarded.url}/history").status_code == 200
    assert httpx.get(f"{guarded.url}/static/common.js").status_code == 200
    assert httpx.get(f"{guarded.url}/runs").status_code == 401


# --- in the browser ------------------------------------------------------------------


@pytest.mark.browser
@needs_browser
def test_docs_render_offline(tab: Tab) -> None:
    refused: list[str] = []
    tab.page.on(
        "console",
        lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page = tab.open("/docs")
    page.locator(".swagger-ui .info .title").wait_for()
    assert "autocoder" in page.locator(".swagger-ui .info .title").inner_text()
    page.locator(".opblock-summary-path", has_text="/run").first.wait_for()
    page = tab.open("/redoc")
    page.locator("h1", has_text="autocoder").first.wait_for()
    page.locator("a", has_text="API docs by Redocly").wait_for()
    assert page.locator("img").evaluate_all("imgs => imgs.map(i => i.src)") == []
    assert refused == [], "the docs asked for something their CSP refuses"


@pytest.mark.browser
@needs_browser
def test_a_prompt_streams_and_a_follow_up_sees_its_variable(tab: Tab, llm: ScriptedLLM) -> None:
    llm.script(fenced("x = 41\nprint('first', x)"), fenced("print('then', x + 1)"))
    tab.open("/")
    first = tab.ask("set x to 41")
    assert "first 41" in first.locator(".outputs").inner_text()
    assert "x = 41" in first.locator("pre.code").inner_text()
    assert first.locator(".status").inner_text().startswith("success")
    second = tab.ask("add one to x")
    assert "then 42" in second.locator(".outputs").inner_text()
    assert "session" in tab.page.locator("#session-label").inner_text()


@pytest.mark.browser
@needs_browser
def test_a_failed_attempt_shows_its_traceback_and_the_retry(
    tab: Tab, llm: ScriptedLLM, tmp_path: Path
) -> None:
    llm.script(fenced("print('trying')\n1/0"), fenced("print('fixed')"))
    tab.open("/")
    turn = tab.ask("divide carefully", attempts=2)
    first, second = turn.locator(".attempt").nth(0), turn.locator(".attempt").nth(1)
    traceback = first.locator(".traceback").first.inner_text()
    assert "ZeroDivisionError" in traceback and "\x1b[" not in traceback
    assert "goes back to the model" in first.inner_text()
    assert "fixed" in second.locator(".outputs").inner_text()

    # The run's own page: both attempts, timings, and the notebook to download.
    turn.locator("a", has_text="open the run").click()
    page = tab.page
    page.locator("#run .attempt").nth(1).wait_for()
    assert page.locator("#run .prompt-text").inner_text() == "divide carefully"
    assert "ZeroDivisionError" in page.locator("#run .attempt").nth(0).inner_text()
    assert "ran cleanly" in page.locator("#run .attempt").nth(1).inner_text()
    with page.expect_download() as info:
        page.get_by_role("link", name="notebook", exact=True).click()
    saved = tmp_path / "run.ipynb"
    info.value.save_as(saved)
    assert '"cells"' in saved.read_text()


@pytest.mark.browser
@needs_browser
def test_scripts_in_prompts_and_outputs_show_as_text(tab: Tab, llm: ScriptedLLM) -> None:
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    llm.script(fenced(f"print({evil!r})"))
    tab.open("/")
    prompt = f"echo {evil}"
    turn = tab.ask(prompt)
    assert turn.locator(".prompt-text").inner_text() == prompt
    assert evil in turn.locator(".outputs").inner_text()
    assert tab.page.locator("img[src=x]").count() == 0
    turn.locator("a", has_text="open the run").click()
    tab.page.locator("#run .attempt").first.wait_for()
    assert tab.page.locator("#run .prompt-text").inner_text() == prompt
    assert evil in tab.page.locator("#run .outputs").inner_text()
    tab.open("/history")
    tab.page.locator("#runs a.prompt-link", has_text="echo").first.wait_for()
    assert tab.page.locator("img[src=x]").count() == 0
    # tab's teardown asserts that no dialog opened


@pytest.mark.browser
@needs_browser
def test_an_html_output_renders_in_a_sandboxed_frame(tab: Tab, llm: ScriptedLLM) -> None:
    llm.script(
        fenced(
            "from IPython.display import HTML, display\n"
            "display(HTML('<table><tr><td>cell-7</td></tr></table>"
            "<script>alert(5)</script>'))\n"
            "from IPython.display import Image\n"
            f"display(Image(data=__import__('base64').b64decode({PNG!r})))"
        )
    )
    tab.open("/")
    turn = tab.ask("show a table")
    frame = turn.locator("iframe.html")
    assert frame.get_attribute("sandbox") == ""
    assert "cell-7" in (frame.get_attribute("srcdoc") or "")
    assert turn.frame_locator("iframe.html").locator("td").inner_text() == "cell-7"
    assert turn.locator("table").count() == 0  # not inline in the page itself
    assert turn.locator("img.out").get_attribute("src").startswith("data:image/png;base64,")


@pytest.mark.browser
@needs_browser
def test_history_search_and_filter(tab: Tab, live: LiveServer, llm: ScriptedLLM) -> None:
    llm.script(fenced("print('ripe')"), fenced("raise ValueError('bruised')"))
    httpx.post(f"{live.url}/run", json={"prompt": "weigh the mangoes"}, timeout=60)
    httpx.post(
        f"{live.url}/run", json={"prompt": "peel the mangoes", "max_attempts": 1}, timeout=60
    )
    page = tab.open("/history")
    page.locator("#runs .run-row").first.wait_for()
    page.fill("#q", "MANGOES")
    page.click("#search-form button")
    page.locator("#runs-total", has_text="(2)").wait_for()
    page.select_option("#status", "error")
    page.locator("#runs-total", has_text="(1)").wait_for()
    assert page.locator("#runs a.prompt-link").all_inner_texts() == ["peel the mangoes"]
    page.locator("#runs a.prompt-link").click()
    page.locator("#run .attempt").first.wait_for()
    assert "bruised" in page.locator("#run .attempt").inner_text()


@pytest.mark.browser
@needs_browser
def test_the_history_marks_code_that_was_given_not_generated(
    tab: Tab, live: LiveServer, llm: ScriptedLLM
) -> None:
    r = httpx.post(f"{live.url}/execute", json={"code": "print('handed in')"}, timeout=60)
    run_id = r.json()["run_id"]
    page = tab.open("/history")
    row = page.locator(f"#runs .run-row[data-run-id='{run_id}']")
    row.wait_for()
    assert row.locator("a.prompt-link").inner_text() == "code given (no model)"
    row.locator("a.prompt-link").click()
    page.locator("#run .attempt").first.wait_for()
    assert "Code given" in page.locator("#run .origin-code").inner_text()
    assert "handed in" in page.locator("#run .attempt").inner_text()
    assert llm.requests == []


@pytest.mark.browser
@needs_browser
def test_a_runs_page_says_how_many_candidates_agree(
    tab: Tab, live: LiveServer, llm: ScriptedLLM
) -> None:
    seeds = {101: "print('ok')", 102: "print('no')", 103: "print('ok')"}
    llm.responder = lambda body: fenced(seeds[body["seed"]])
    r = httpx.post(f"{live.url}/run", json={"prompt": "ok?", "candidates": 3}, timeout=60)
    page = tab.open(f"/history/{r.json()['run_id']}")
    page.locator("#run .agreement").wait_for()
    assert page.locator("#run .agreement").inner_text() == "2 of 3 candidates agree"
    assert page.locator("#run .examples").count() == 0  # the prompt gave none

    llm.responder = None
    llm.script(fenced("def double(x):\n    return 2 * x\n"))
    prompt = "Write double(x). For example double(2) == 4 and double(-1) == -2."
    r = httpx.post(f"{live.url}/run", json={"prompt": prompt, "candidates": 1}, timeout=60)
    page = tab.open(f"/history/{r.json()['run_id']}")
    page.locator("#run .examples").wait_for()
    assert page.locator("#run .examples").inner_text() == "the prompt's 2 examples hold"


@pytest.mark.browser
@needs_browser
def test_with_a_token_the_history_shows_only_after_it_is_given(
    browser: Any, guarded: LiveServer, llm: ScriptedLLM
) -> None:
    llm.script(fenced("print('secret stuff')"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(
        f"{guarded.url}/run", json={"prompt": "the private prompt"}, headers=auth, timeout=60
    )
    assert r.status_code == 200
    t = Tab(browser, guarded.url)
    try:
        page = t.open("/history")
        page.locator("#token-form").wait_for()
        assert "private prompt" not in page.content()
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
        page.locator("#runs a.prompt-link", has_text="the private prompt").wait_for()
        # Kept for the tab: another page asks no more.
        page = t.open("/history")
        page.locator("#runs a.prompt-link", has_text="the private prompt").wait_for()
        assert page.locator("#token-form").is_hidden()
    finally:
        t.context.close()
    assert t.outside == [] and t.dialogs == []


# --- a page that keeps up (tokens, Stop, keys, resuming, timeouts, phones) ------------


@pytest.mark.browser
@needs_browser
def test_the_models_reply_shows_as_it_is_written(tab: Tab, llm: ScriptedLLM) -> None:
    resume = threading.Event()
    llm.script(Reply(fenced("print('streamed')"), resume=resume))
    tab.open("/")
    try:
        turn = tab.send("print streamed")
        # Half the reply is written and the model is still at it: the page shows that half.
        turn.locator("pre.reply", has_text="Here is the code").wait_for()
        assert turn.locator("pre.code").count() == 0
        assert "the model is writing" in turn.locator(".attempt").inner_text()
    finally:
        resume.set()
    turn.locator(".status.ok").wait_for()
    assert turn.locator("pre.reply").count() == 0  # the code replaces the raw reply
    assert "print('streamed')" in turn.locator("pre.code").inner_text()
    said = turn.locator(".attempt-status").inner_text()
    # Model time and run time, apart.
    assert said.startswith("ran cleanly · model ") and " · code " in said and "tokens" in said


AT_BOTTOM = "innerHeight + scrollY >= document.documentElement.scrollHeight - 2"


@pytest.mark.browser
@needs_browser
def test_the_page_follows_the_stream_unless_scrolled_up(tab: Tab, llm: ScriptedLLM) -> None:
    lines = fenced("print('\\n'.join(map(str, range(60))))")
    resume = threading.Event()
    llm.script(lines, Reply(lines, resume=resume))
    page = tab.open("/")
    page.set_viewport_size({"width": 800, "height": 500})
    tab.ask("print sixty lines")
    assert page.evaluate(AT_BOTTOM)
    try:
        turn = tab.send("print them again")
        turn.locator("pre.reply").wait_for()
        page.mouse.wheel(0, -100_000)  # the user scrolls up to read
        page.wait_for_function("scrollY === 0")
    finally:
        resume.set()
    turn.locator(".status.ok").wait_for()
    assert page.evaluate("scrollY") == 0


@pytest.mark.browser
@needs_browser
def test_stop_interrupts_the_code_and_the_run_is_recorded_cancelled(
    tab: Tab, live: LiveServer, llm: ScriptedLLM
) -> None:
    llm.script(
        fenced("import time\nprint('working', flush=True)\ntime.sleep(100)"),
        fenced("print('still here')"),
    )
    page = tab.open("/")
    assert page.locator("#stop").is_hidden()
    turn = tab.send("work for a long time", attempts=1, timeout=110)
    turn.locator(".outputs", has_text="working").wait_for()
    page.click("#stop")
    turn.locator(".status.bad").wait_for()
    assert turn.locator(".status").inner_text().startswith("stopped after")
    assert "stopped (cancelled)" in turn.locator(".attempt-status").inner_text()
    page.wait_for_function("!document.getElementById('send').disabled")
    assert page.locator("#stop").is_hidden()
    run_id = turn.locator(".status a").get_attribute("href").rsplit("/", 1)[1]
    record = httpx.get(f"{live.url}/runs/{run_id}").json()
    assert record["status"] == "error" and record["error_kind"] == "cancelled"
    # The kernel was interrupted, not left sleeping: the session takes the next prompt.
    assert "still here" in tab.ask("say you are still here").locator(".outputs").inner_text()


@pytest.mark.browser
@needs_browser
def test_ctrl_enter_and_cmd_enter_send_the_prompt(tab: Tab, llm: ScriptedLLM) -> None:
    llm.script(fenced("print('by ctrl')"), fenced("print('by cmd')"))
    page = tab.open("/")
    for key, said in (("Control+Enter", "by ctrl"), ("Meta+Enter", "by cmd")):
        turns = page.locator(".turn").count()
        page.fill("#prompt", f"say {said}")
        page.press("#prompt", key)
        turn = page.locator(".turn").nth(turns)
        turn.locator(".status.ok").wait_for()
        assert said in turn.locator(".outputs").inner_text()
        # The status shows as the run's last event arrives; the page takes the next prompt
        # once the stream has closed, as its Send button says.
        page.wait_for_function("!document.getElementById('send').disabled")


@pytest.mark.browser
@needs_browser
def test_a_reload_reopens_the_session_and_it_goes_on(tab: Tab, llm: ScriptedLLM) -> None:
    llm.script(fenced("x = 41\nprint('first', x)"), fenced("print('then', x + 1)"))
    page = tab.open("/")
    tab.ask("set x to 41")
    session_id = page.locator("#session-label").inner_text()
    assert page.url.endswith(f"/?session={session_id}")
    page.reload()
    first = page.locator(".turn").first
    first.locator(".status.ok").wait_for()
    assert first.locator(".prompt-text").inner_text() == "set x to 41"
    assert "first 41" in first.locator(".outputs").inner_text()
    assert page.locator("#session-label").inner_text() == session_id
    # The same kernel: the variable is still there.
    assert "then 42" in tab.ask("add one to x").locator(".outputs").inner_text()

    # History links the session back to this page, with both turns.
    page = tab.open("/history")
    row = page.locator(f"#sessions tr[data-session-id='{session_id}']")
    row.locator("a.session-open", has_text="continue").click()
    page.locator(".turn").nth(1).locator(".status.ok").wait_for()
    assert page.locator(".turn .prompt-text").all_inner_texts() == ["set x to 41", "add one to x"]

    # Once closed, its link still shows its turns; the next prompt opens a new session.
    httpx.delete(f"{tab.base}/sessions/{session_id}", timeout=60)
    page = tab.open(f"/?session={session_id}")
    page.locator("#notice", has_text="This session is closed").wait_for()
    assert page.locator(".turn").count() == 2
    llm.script(fenced("print('fresh')"))
    page.fill("#prompt", "start afresh")
    page.click("#send")
    page.locator(".turn", has_text="start afresh").locator(".status.ok").wait_for()
    assert page.locator(".turn .prompt-text").all_inner_texts() == ["start afresh"]
    assert "fresh" in page.locator(".turn .outputs").inner_text()
    assert session_id not in page.url and "?session=session-" in page.url


@pytest.mark.browser
@needs_browser
def test_a_second_tab_on_the_session_sees_the_running_prompt_and_can_stop_it(
    browser: Any, tab: Tab, llm: ScriptedLLM
) -> None:
    llm.script(fenced("import time\nprint('working', flush=True)\ntime.sleep(100)"))
    first = tab.open("/")
    turn = tab.send("work for a long time", attempts=1, timeout=110)
    turn.locator(".outputs", has_text="working").wait_for()
    other = Tab(browser, tab.base)
    try:
        page = other.open("/?session=" + first.locator("#session-label").inner_text())
        page.locator(".status", has_text="still running").wait_for()
        page.click("#stop")
        page.locator(".turn .prompt-text", has_text="work for a long time").wait_for()
        assert page.locator(".turn .status").inner_text().startswith("stopped after")
        page.wait_for_function("!document.getElementById('send').disabled")
        assert page.locator("#stop").is_hidden()
    finally:
        other.context.close()
    # The tab that sent it sees it end the same way.
    turn.locator(".status.bad").wait_for()
    assert turn.locator(".status").inner_text().startswith("stopped after")
    assert other.outside == [] and other.dialogs == []


@pytest.mark.browser
@needs_browser
def test_a_timeout_reads_as_a_timeout_not_as_an_interrupt(
    tab: Tab, llm: ScriptedLLM, tmp_path: Path
) -> None:
    llm.script(fenced("print('spinning', flush=True)\nwhile True:\n    pass"))
    tab.open("/")
    turn = tab.ask("spin forever", attempts=1, timeout=1)
    assert "stopped after 1 s (timeout)" in turn.locator(".attempt-status").inner_text()
    shown = turn.inner_text()
    for word in ("KeyboardInterrupt", "SendGuard", "on_sigint", "autocoder output cap"):
        assert word not in shown
    assert turn.locator(".traceback, pre.error").count() == 0
    assert "spinning" in turn.locator(".outputs").inner_text()
    tab.page.screenshot(path=str(tmp_path / "timeout.png"), full_page=True)
    # The run's own page says the same.
    turn.locator("a", has_text="open the run").click()
    tab.page.locator("#run .attempt").first.wait_for()
    said = tab.page.locator("#run .attempt").inner_text()
    assert "stopped after 1 s (timeout)" in said and "KeyboardInterrupt" not in said


@pytest.mark.browser
@needs_browser
def test_with_a_token_downloads_keep_the_servers_file_names(
    browser: Any, guarded: LiveServer, llm: ScriptedLLM
) -> None:
    llm.script(fenced("open('made.txt', 'w').write('made')\nprint('ok')"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    run = httpx.post(
        f"{guarded.url}/run", json={"prompt": "make a file"}, headers=auth, timeout=60
    ).json()
    stem = Path(run["notebook"]).stem
    t = Tab(browser, guarded.url)
    try:
        page = t.open(f"/history/{run['run_id']}")
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
        page.locator("#run .attempt").first.wait_for()
        for label, name in (
            ("notebook", f"{stem}.ipynb"),
            ("made.txt (4 bytes)", "made.txt"),
            ("notebook with its files (.zip)", f"{stem}.zip"),
        ):
            with page.expect_download() as info:
                page.get_by_role("link", name=label, exact=True).click()
            assert info.value.suggested_filename == name
    finally:
        t.context.close()
    assert t.outside == [] and t.dialogs == []


@pytest.mark.browser
@needs_browser
def test_history_fits_a_phone_screen(
    browser: Any, live: LiveServer, llm: ScriptedLLM, tmp_path: Path
) -> None:
    llm.script(fenced("print('ok')"))
    prompt = "summarise_the_quarterly_revenue_by_region_and_product_line " * 3
    httpx.post(f"{live.url}/run", json={"prompt": prompt}, timeout=60)
    session = httpx.post(f"{live.url}/sessions", json={}, timeout=60).json()
    httpx.delete(f"{live.url}/sessions/{session['session_id']}", timeout=60)
    t = Tab(browser, live.url)
    try:
        page = t.page
        page.set_viewport_size({"width": 390, "height": 844})
        t.open("/history")
        page.locator("#runs .run-row").first.wait_for()
        page.locator("#sessions .session-row").first.wait_for()
        width = page.evaluate("document.documentElement.scrollWidth")
        page.screenshot(path=str(tmp_path / "history-390.png"), full_page=True)
        assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    finally:
        t.context.close()


CONTRAST = """
(sel) => {
  const lum = (rgb) => {
    const [r, g, b] = rgb.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const parse = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = parse(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  return [...document.querySelectorAll(sel)].filter((el) => el.textContent.trim()).map((el) => {
    const a = lum(parse(getComputedStyle(el).color).slice(0, 3)), b = lum(background(el));
    return [el.className, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
  });
}
"""


@pytest.mark.browser
@needs_browser
def test_grey_text_is_readable(tab: Tab, live: LiveServer, llm: ScriptedLLM) -> None:
    llm.script(fenced("# a comment\nprint('ok')"))
    run = httpx.post(f"{live.url}/run", json={"prompt": "comment"}, timeout=60).json()
    page = tab.open(f"/history/{run['run_id']}")
    page.locator("#run .attempt").first.wait_for()
    found = page.evaluate(CONTRAST, ".muted, pre.code .c")
    assert {c for c, _ in found} >= {"muted", "c"}
    low = [(c, round(r, 2)) for c, r in found if r < 4.5]
    assert low == [], "grey text below WCAG AA's 4.5:1"
