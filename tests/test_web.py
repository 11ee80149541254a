"""The web page, as a person uses it: a real server, real kernels, the scripted model, and
headless Chromium (Debian's, driven by Playwright) with every outside host blocked."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from autocoder.testing import ScriptedLLM, fenced
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

    def ask(self, prompt: str, attempts: int | None = None) -> Any:
        """Type a prompt on the run page and wait for its final status."""
        page = self.page
        turns = page.locator(".turn").count()
        page.fill("#prompt", prompt)
        if attempts:
            page.fill("#max_attempts", str(attempts))
        page.click("#send")
        turn = page.locator(".turn").nth(turns)
        turn.locator(".status.ok, .status.bad").wait_for()
        return turn


@pytest.fixture
def tab(browser: Any, live: LiveServer) -> Iterator[Tab]:
    t = Tab(browser, live.url)
    yield t
    t.context.close()
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
    page = tab.open("/docs")
    page.locator(".swagger-ui .info .title").wait_for()
    assert "autocoder" in page.locator(".swagger-ui .info .title").inner_text()
    page.locator(".opblock-summary-path", has_text="/run").first.wait_for()
    page = tab.open("/redoc")
    page.locator("h1", has_text="autocoder").first.wait_for()


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
        page.locator("a.download", has_text="notebook").click()
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
def test_a_runs_page_says_how_many_candidates_agree(
    tab: Tab, live: LiveServer, llm: ScriptedLLM
) -> None:
    seeds = {101: "print('ok')", 102: "print('no')", 103: "print('ok')"}
    llm.responder = lambda body: fenced(seeds[body["seed"]])
    r = httpx.post(f"{live.url}/run", json={"prompt": "ok?", "candidates": 3}, timeout=60)
    page = tab.open(f"/history/{r.json()['run_id']}")
    page.locator("#run .agreement").wait_for()
    assert page.locator("#run .agreement").inner_text() == "2 of 3 candidates agree"


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
