"""The model: one small interface, the OpenAI-compatible client behind it, prompts and code extraction."""

from __future__ import annotations

import abc
import ast
import asyncio
import importlib
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from autocoder.config import DEFAULT_OPENAI_URL, Settings
from autocoder.errors import ConfigError, LLMError

if TYPE_CHECKING:
    import openai

DEFAULT_REMOTE_MODEL = "gpt-4o-mini"

Message = dict[str, str]
# Called with each piece of the reply as the model writes it.
OnToken = Callable[[str], Awaitable[None]]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


PYTHON_FENCES = ("python", "py", "python3", "ipython")


def extract_code(
    reply: str, fences: tuple[str, ...] = PYTHON_FENCES, *, any_fence: bool = False
) -> str:
    """The code in a model's reply: its blocks fenced as the language (Python unless `fences`
    says otherwise), else any unnamed fenced block, else all of it.

    Several such blocks are joined in order (models sometimes split a program); a reply
    with no fence is taken whole, as the original AutoCoder did. With `any_fence`, blocks
    fenced as another language are taken last, so that code in the wrong language reaches
    the syntax check and the model is told what it wrote.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(reply)]
    wanted = {f.lower() for f in fences}
    named = [b for lang, b in blocks if lang in wanted]
    chosen = named or [b for lang, b in blocks if lang in {"", "code"}]
    if not chosen and any_fence:
        chosen = [b for _, b in blocks]
    if not blocks:
        text = reply.strip()
        return "" if _looks_like_prose(text) else text + "\n"
    code = "\n\n".join(b.strip("\n") for b in chosen).strip("\n")
    return code + "\n" if code.strip() else ""


def _looks_like_prose(text: str) -> bool:
    """Prose, or a bare value (`4`, `'Saturday'`): a model sampled with some temperature often
    answers the question instead of writing a program, and a value that "runs" computed nothing."""
    if not text:
        return True
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        first = text.splitlines()[0]
        return not any(ch in first for ch in "=()[]:#") and len(text.split()) > 3
    return _is_bare_value(tree)


def _is_bare_value(tree: ast.Module) -> bool:
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return False
    value = tree.body[0].value
    if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub | ast.UAdd):
        value = value.operand
    return isinstance(value, ast.Constant)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def clean_traceback(traceback: list[str] | str) -> str:
    """A traceback as plain text: ANSI colours stripped, IPython's cell noise trimmed."""
    text = traceback if isinstance(traceback, str) else "\n".join(traceback)
    text = strip_ansi(text)
    lines = [ln.rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if not set(ln) <= {"-"} or not ln]
    return "\n".join(lines).strip("\n")


def cut_middle(text: str, limit: int) -> str:
    """Keep the head and the tail of `text` within about `limit` characters."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n... [{cut:,} characters cut] ...\n{text[-tail:]}"


@dataclass
class Completion:
    text: str
    model: str
    duration: float
    completion_tokens: int = 0


class LLM(abc.ABC):
    """A model that completes chat messages. One method to implement."""

    backend: str = "openai"
    model: str = ""

    @abc.abstractmethod
    async def complete(
        self,
        messages: list[Message],
        *,
        temperature: float,
        max_tokens: int,
        model: str | None = None,
        on_token: OnToken | None = None,
        seed: int | None = None,
    ) -> Completion:
        """Return the model's reply or raise LLMError / ConfigError. With `on_token`, the
        reply is also handed over piece by piece as it is written (a model that cannot
        stream may hand it over whole, once). `seed` makes a sampled reply repeatable where
        the endpoint allows (several candidates each have their own)."""

    async def resolve_model(self) -> str:
        """The model's name, asking the endpoint when it was not configured."""
        return self.model

    async def close(self) -> None:
        return None


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIChat(LLM):
    """Any OpenAI-compatible chat endpoint (OpenAI, xAI, Ollama, vLLM, llama.cpp's server)."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str | None,
        settings: Settings,
        backend: str = "openai",
    ) -> None:
        self.base_url = base_url
        self.backend = backend
        self.model = model or ""
        self.settings = settings
        # Start-up time: openai builds its hundreds of types at import (0.3-0.8 s), which a
        # command that never asks the model (`autocoder --help`, the magic's import) skips;
        # connect() imports it in a thread, while the run's kernel starts.
        import openai

        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "not-needed",
            timeout=settings.llm_timeout,
            max_retries=settings.llm_retries,
        )

    async def resolve_model(self) -> str:
        """Ask a local server which model it serves when none is configured."""
        if self.model:
            return self.model
        import openai  # start-up time, as in __init__ (imported by then)

        try:
            page = await self.client.models.list()
        except openai.APIError as e:
            raise self._translate(e) from e
        ids = [m.id for m in page.data]
        if not ids:
            raise ConfigError(f"the endpoint {self.base_url} lists no models: set AUTOCODER_MODEL")
        self.model = ids[0]
        return self.model

    async def complete(
        self,
        messages: list[Message],
        *,
        temperature: float,
        max_tokens: int,
        model: str | None = None,
        on_token: OnToken | None = None,
        seed: int | None = None,
    ) -> Completion:
        import openai  # start-up time, as in __init__ (imported by then)

        model = model or await self.resolve_model()
        if on_token is not None:
            return await self._stream(messages, temperature, max_tokens, model, on_token, seed)
        start = time.monotonic()
        try:
            reply: Any = await self.client.chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                temperature=temperature,
                max_tokens=max_tokens,
                # Only when asked: a request without one is what it always was.
                extra_body=None if seed is None else {"seed": seed},
            )
        except openai.APIError as e:
            raise self._translate(e) from e
        if not reply.choices:
            raise LLMError(f"the model endpoint {self.base_url} answered with no choices")
        text = reply.choices[0].message.content or ""
        usage = getattr(reply, "usage", None)
        return Completion(
            text=text,
            model=reply.model or model,
            duration=time.monotonic() - start,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )

    async def _stream(
        self,
        messages: list[Message],
        temperature: float,
        max_tokens: int,
        model: str,
        on_token: OnToken,
        seed: int | None = None,
    ) -> Completion:
        """The reply as server-sent chunks, each handed to `on_token` as it arrives.

        The usage is asked for (`stream_options`); a server that ignores it (llama.cpp's
        sends one chunk per token) is counted by its chunks. The client's timeout then
        bounds each wait for the next chunk, not the whole reply.
        """
        import httpx  # start-up time, as openai in __init__ (imported by then)
        import openai

        start = time.monotonic()
        pieces: list[str] = []
        chunks = 0
        tokens = 0
        answered = ""
        seen_choice = False
        try:
            stream: Any = await self.client.chat.completions.create(  # type: ignore[call-overload]
                model=model,
                messages=messages,
                temperature=temperature,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=None if seed is None else {"seed": seed},
            )
            async with stream:
                async for chunk in stream:
                    answered = chunk.model or answered
                    usage = getattr(chunk, "usage", None)
                    if usage is not None:
                        tokens = getattr(usage, "completion_tokens", 0) or tokens
                    if not chunk.choices:
                        continue
                    seen_choice = True
                    piece = chunk.choices[0].delta.content
                    if piece:
                        chunks += 1
                        pieces.append(piece)
                        await on_token(piece)
        except openai.APIError as e:
            raise self._translate(e) from e
        except httpx.HTTPError as e:  # the connection broke off mid-reply
            raise LLMError(
                f"the model endpoint {self.base_url} (OPENAI_BASE_URL) broke off its reply: "
                f"{_short(str(e) or type(e).__name__)}"
            ) from e
        if not seen_choice:
            raise LLMError(f"the model endpoint {self.base_url} answered with no choices")
        return Completion(
            text="".join(pieces),
            model=answered or model,
            duration=time.monotonic() - start,
            completion_tokens=tokens or chunks,
        )

    def _translate(self, e: openai.APIError) -> Exception:
        import openai  # start-up time, as in __init__ (imported by then)

        where = f"the model endpoint {self.base_url} (OPENAI_BASE_URL)"
        if isinstance(e, openai.APITimeoutError):
            return LLMError(
                f"{where} did not answer within {self.settings.llm_timeout:g} s "
                "(AUTOCODER_LLM_TIMEOUT)"
            )
        if isinstance(e, openai.APIConnectionError):
            return LLMError(f"cannot reach {where}: {e.__cause__ or e}")
        if isinstance(e, openai.AuthenticationError):
            return ConfigError(f"{where} refused the API key: check OPENAI_API_KEY")
        if isinstance(e, openai.NotFoundError):
            return ConfigError(
                f"{where} answered 404 for the model {self.model!r}: set AUTOCODER_MODEL "
                "to a model it serves (or check OPENAI_BASE_URL)"
            )
        if isinstance(e, openai.RateLimitError):
            return LLMError(f"{where} is rate limiting requests (HTTP 429) after retries")
        if isinstance(e, openai.APIStatusError):
            return LLMError(f"{where} answered HTTP {e.status_code}: {_short(e.message)}")
        return LLMError(f"{where} failed: {_short(str(e))}")

    async def close(self) -> None:
        await self.client.close()


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def connect(settings: Settings) -> LLM:
    """The model the settings ask for: a configured endpoint, else the embedded one.

    The client's library is imported in a thread: the loop meanwhile goes on starting the
    run's kernel, in its own process."""
    await asyncio.to_thread(importlib.import_module, "openai")
    if settings.uses_remote_endpoint:
        base_url = settings.openai_base_url or DEFAULT_OPENAI_URL
        if not settings.api_key and not _is_loopback(base_url):
            raise ConfigError(
                f"OPENAI_API_KEY is not set, and {base_url} needs one "
                "(set it, or point OPENAI_BASE_URL at a local server)"
            )
        model = settings.model
        if not model and base_url.rstrip("/") == DEFAULT_OPENAI_URL:
            model = DEFAULT_REMOTE_MODEL
        return OpenAIChat(
            base_url=base_url, api_key=settings.api_key, model=model, settings=settings
        )
    from autocoder import keepalive  # the embedded model's code, only when it is used

    server = keepalive.get_server(settings)
    base_url = await server.ensure()
    return OpenAIChat(
        base_url=base_url,
        api_key=None,
        model=server.model_name,
        settings=settings,
        backend="local",
    )
