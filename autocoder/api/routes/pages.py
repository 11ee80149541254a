"""The web page for people, and the API docs, served offline with a strict CSP.

The pages are shells: they hold no run data, so they need no token. Their scripts read the
history and the runs through the JSON API with the token the user gave (kept in the tab's
sessionStorage), so a server with AUTOCODER_API_TOKEN shows nothing to someone without it.
Swagger UI comes from the `swagger-ui-bundle-v2` package (Swagger UI 5, which reads OpenAPI
3.1); ReDoc's standalone bundle ships in `web/static/vendor/redoc` (taken from the
`drf-spectacular-sidecar` wheel). No CDN is asked.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from swagger_ui_bundle import swagger_ui_path

from autocoder.api.deps import RunId

WEB = Path(__file__).resolve().parent.parent / "web"
STATIC_PREFIX = "/static/"
SWAGGER_PREFIX = "/static/swagger/"

# Nothing from elsewhere, no inline script; outputs' HTML lives in srcdoc iframes, which
# inherit this policy and are sandboxed without scripts or this origin.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; child-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def mount(app: FastAPI) -> None:
    """The pages' routes and static assets, and the docs served from local assets."""
    app.mount(SWAGGER_PREFIX.rstrip("/"), StaticFiles(directory=swagger_ui_path), name="swagger")
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=WEB / "static"), name="static")
    app.include_router(router)
    # Jinja2Templates turns autoescape on for .html templates.
    app.state.templates = Jinja2Templates(directory=WEB / "templates")


def _page(request: Request, name: str, **context: object) -> HTMLResponse:
    templates: Jinja2Templates = request.app.state.templates
    response = templates.TemplateResponse(request, name, context)
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@router.get("/", response_class=HTMLResponse)
async def index(request: Request) -> HTMLResponse:
    return _page(request, "index.html", page="run")


@router.get("/history", response_class=HTMLResponse)
async def history(request: Request) -> HTMLResponse:
    return _page(request, "history.html", page="history")


@router.get("/history/{run_id}", response_class=HTMLResponse)
async def run_page(request: Request, run_id: RunId) -> HTMLResponse:
    return _page(request, "run.html", page="history", run_id=run_id)


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def _with_csp(html: HTMLResponse, styles_inline: bool) -> HTMLResponse:
    """The docs pages' own CSP: their one inline script allowed by its hash, nothing else."""
    body = bytes(html.body).decode()
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(body)
    )
    style = "'self' 'unsafe-inline'" if styles_inline else "'self'"
    html.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src 'self' {hashes}; style-src {style}; "
        "img-src 'self' data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )
    return html


@router.get("/docs", response_class=HTMLResponse)
async def swagger_docs() -> HTMLResponse:
    html = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="autocoder - Swagger UI",
        swagger_js_url=SWAGGER_PREFIX + "swagger-ui-bundle.js",
        swagger_css_url=SWAGGER_PREFIX + "swagger-ui.css",
        swagger_favicon_url=SWAGGER_PREFIX + "favicon-32x32.png",
        oauth2_redirect_url="/docs/oauth2-redirect",
    )
    return _with_csp(html, styles_inline=True)


@router.get("/docs/oauth2-redirect", response_class=HTMLResponse)
async def swagger_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", response_class=HTMLResponse)
async def redoc_docs() -> HTMLResponse:
    html = get_redoc_html(
        openapi_url="/openapi.json",
        title="autocoder - ReDoc",
        redoc_js_url=STATIC_PREFIX + "vendor/redoc/redoc.standalone.js",
        redoc_favicon_url=SWAGGER_PREFIX + "favicon-32x32.png",
        with_google_fonts=False,
    )
    # ReDoc writes its styles as <style> elements at run time.
    return _with_csp(html, styles_inline=True)
