"""The embedded model's OpenAI-compatible server, generating concurrent requests together.

llama-cpp-python's server answers one request at a time and drops `n`, so the K candidates of an
attempt were generated one after another. Here one engine thread owns the llama.cpp context and
keeps up to `--slots` sequences in one unified KV cache: every decode step carries one token for
each generating sequence plus prompt chunks of sequences being read (continuous batching, as
llama.cpp's own server does), so K candidates, or several users, share each pass over the weights.

A new sequence whose prompt starts like one already in the cache (a live sequence, or a finished
one kept as cache) copies that prefix (`llama_memory_seq_cp`) and reads only the rest: the K
candidates of an attempt read their prompt once, and a retry reuses the system prompt.

Run as `python -m autocoder.local_server --model FILE ...` by `local_model.LocalModelServer`,
which owns the process. It imports nothing of autocoder's engine and binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import json
import logging
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 8 << 20
# How often a request's handler looks whether its client is still there (seconds).
GONE_EVERY = 0.5
# Sampling as llama-cpp-python's server samples by default.
TOP_K = 40
MIN_P = 0.05
DEFAULT_TOP_P = 0.95
DEFAULT_TEMPERATURE = 0.8
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks one
# A sequence waits for another that is still reading a prompt starting like its own, rather
# than read the same tokens again, when that saves at least this many tokens.
SHARE_AT_LEAST = 16


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400 and this message."""


# --- Threads ------------------------------------------------------------------------------------


class ThreadChoice:
    """How many threads the next decode step gets, chosen by what such steps took lately.

    llama.cpp's threads meet at spinning barriers after every operation. On 2 shared cores, two
    threads generated five candidates 1.6x as fast as one on an idle machine; beside one busy
    process in another session (where the scheduler gives each session its share, so the
    model's two threads got one core) each step took 3.2 s instead of 0.26, a thread that
    loses its core stalling the other at every barrier. So neither count is right for long.

    Steps that generate the same number of rows keep a recent time per thread count, and the
    faster count is used. The other is tried again after a number of steps that grows with how
    far apart the two were (12 times as long: ~120 steps; twice: 20), doubling while it keeps
    losing. The count in use is left at once when it gets slower than the other's last time,
    and tried again after `PROBE_EVERY` steps: what slowed it is often brief (a candidate's
    kernel importing pandas while its siblings are still being generated). A step that reads
    a prompt is too costly to try both ways and follows the latest verdict.
    """

    PROBE_EVERY = 10
    MOST_BETWEEN = 200
    WEIGHT = 0.5  # of the newest step in a recent time

    def __init__(self, most: int, adapt: bool = True) -> None:
        self.most = most
        self.adapt = adapt and most > 1
        self.prefer = most  # an idle machine is the first guess, tried at the second step
        self.recent: dict[tuple[int, int], float] = {}
        self.between = 2
        self.since = 0

    def pick(self, rows: int | None) -> int:
        """Threads for a step generating `rows` tokens (None: a step that reads a prompt)."""
        if not self.adapt or rows is None:
            return self.prefer
        self.since += 1
        if self.since >= self.between:
            self.since = 0
            return self._other(self.prefer)
        return self.prefer

    def record(self, rows: int | None, threads: int, seconds: float) -> None:
        if not self.adapt or rows is None:
            return
        key = (rows, threads)
        old = self.recent.get(key)
        trying = threads != self.prefer
        # A try's figure replaces the last one, taken under another load.
        self.recent[key] = seconds if old is None or trying else old + self.WEIGHT * (seconds - old)
        mine = self.recent.get((rows, self.prefer))
        theirs = self.recent.get((rows, self._other(self.prefer)))
        if mine is None or theirs is None:
            return
        ratio = max(mine, theirs) / min(mine, theirs)
        if trying and theirs >= mine:  # the other count stays the slower: try it less often
            self.between = min(
                self.MOST_BETWEEN, max(2 * self.between, round(self.PROBE_EVERY * ratio))
            )
        elif trying:  # a try that won
            self.prefer = threads
            self.between, self.since = min(self.MOST_BETWEEN, round(self.PROBE_EVERY * ratio)), 0
        elif theirs < mine:  # the count in use got slower, perhaps only while a kernel runs
            self.prefer = self._other(self.prefer)
            self.between, self.since = self.PROBE_EVERY, 0

    def _other(self, threads: int) -> int:
        return 1 if threads == self.most else self.most


# --- Text out of tokens ---------------------------------------------------------------------


class TextOut:
    """A sequence's text as it may be shown: UTF-8 split across tokens is joined first, and
    text that could be the start of a stop string is held back until it is known not to be.
    `feed` returns what can be shown now and whether a stop string was reached (the stop
    string itself and anything after it are never shown)."""

    def __init__(self, stops: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, piece: bytes) -> tuple[str, bool]:
        self._held += self._decoder.decode(piece)
        found = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if found:
            text, self._held = self._held[: min(found)], ""
            return text, True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._held)), keep, -1):
                if self._held.endswith(stop[:n]):
                    keep = n
                    break
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return text, False

    def flush(self) -> str:
        """What is left once the sequence ends for another reason than a stop string."""
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text


# --- What the engine is asked ---------------------------------------------------------------


@dataclass
class Choice:
    """One sequence to generate: a choice of a request."""

    request: Request
    index: int
    seed: int
    out: TextOut
    generated: int = 0


@dataclass
class Request:
    """A chat completion as the engine sees it. Events go to `events`: (index, text, None)
    for text, (index, "", finish_reason) at a choice's end, (None, message, "error") on failure."""

    prompt: list[int]
    n: int
    max_new: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    events: queue.Queue[tuple[int | None, str, str | None]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)  # tokens per choice, set as each ends

    def __post_init__(self) -> None:
        self.generated = [0] * self.n


@dataclass
class Slot:
    """One sequence id of the context. `cached` is exactly what the KV cache holds for it;
    with no `choice` it is idle and its cache can seed a later sequence's prefix."""

    seq: int
    cached: list[int] = field(default_factory=list)
    choice: Choice | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to read
    next_token: int | None = None  # sampled, not yet decoded
    sampler: Any = None
    used: float = 0.0
    reserved: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --- The engine -----------------------------------------------------------------------------


class Engine:
    """The one thread that owns the llama.cpp context; requests reach it through `submit`."""

    def __init__(self, args: argparse.Namespace) -> None:
        import llama_cpp
        from llama_cpp import _internals, llama_chat_format

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_mmap = True
        mparams.use_mlock = False
        self.model = _internals.LlamaModel(path_model=args.model, params=mparams, verbose=True)
        self.vocab = self.model.vocab
        self.n_ctx_seq = args.n_ctx
        self.n_batch = args.n_batch
        self.threads = ThreadChoice(args.threads, bool(args.adapt_threads))
        self._threads_now = args.threads
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = args.n_ctx * args.kv_factor
        cparams.n_batch = args.n_batch
        cparams.n_ubatch = args.n_ubatch
        cparams.n_seq_max = args.slots
        cparams.kv_unified = True
        cparams.n_threads = args.threads
        cparams.n_threads_batch = args.threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.embeddings = False
        cparams.no_perf = True
        self.context = _internals.LlamaContext(model=self.model, params=cparams, verbose=True)
        self.ctx = self.context.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.kv_total = llama_cpp.llama_n_ctx(self.ctx)
        self.batch = llama_cpp.llama_batch_init(args.n_batch, 0, 1)
        self.slots = [Slot(seq=i) for i in range(args.slots)]
        meta = self.model.metadata()
        eos, bos = self.model.token_eos(), self.model.token_bos()
        self.chat = llama_chat_format.Jinja2ChatFormatter(
            template=meta["tokenizer.chat_template"],
            eos_token=self.model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.model.token_get_text(bos) if bos != -1 else "",
        )
        # Loading is logged in full; from here on only warnings (not every thread switch).
        logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.waiting: deque[Choice] = deque()
        self._piece = ctypes.create_string_buffer(256)
        self._tokenize = threading.Lock()

    # Called from HTTP threads.

    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            prompt = self.chat(messages=messages).prompt  # type: ignore[arg-type]
        except Exception as e:  # the template's own refusal (bad roles, missing content)
            raise BadRequest(f"messages could not be formatted: {e}") from None
        with self._tokenize:
            return list(self.model.tokenize(prompt.encode(), add_bos=False, special=True))

    def submit(self, request: Request) -> None:
        self.inbox.put(request)

    # The engine thread.

    def run(self) -> None:
        while True:
            busy = any(s.choice is not None for s in self.slots) or self.waiting
            try:
                request = self.inbox.get(timeout=None if not busy else 0)
                self._accept(request)
                while True:
                    self._accept(self.inbox.get_nowait())
            except queue.Empty:
                pass
            try:
                self._step()
            except Exception as e:  # never leave a client waiting on a dead engine
                print(f"autocoder.local_server: engine error: {e!r}", flush=True)
                for slot in self.slots:
                    if slot.choice is not None:
                        slot.choice.request.events.put((None, f"generation failed: {e}", "error"))
                        self._free(slot)
                        self._forget(slot)
                for choice in self.waiting:
                    choice.request.events.put((None, f"generation failed: {e}", "error"))
                self.waiting.clear()

    def _accept(self, request: Request) -> None:
        base = request.seed if request.seed is not None else None
        for i in range(request.n):
            seed = RANDOM_SEED if base is None else (base + i) & 0xFFFFFFFF
            self.waiting.append(Choice(request, i, seed, TextOut(request.stops)))

    def _step(self) -> None:
        for slot in self.slots:
            if slot.choice is not None and slot.choice.request.cancelled.is_set():
                self._free(slot)
        self.waiting = deque(c for c in self.waiting if not c.request.cancelled.is_set())
        self._assign()
        self._decode()

    def _assign(self) -> None:
        """Give waiting choices free slots, in order, while the KV cache can hold what they
        may need; a choice whose prompt another slot is reading waits to share it."""
        reserved = sum(s.reserved for s in self.slots if s.choice is not None)
        while self.waiting:
            choice = self.waiting[0]
            prompt = choice.request.prompt
            free = [s for s in self.slots if s.choice is None]
            if not free:
                return
            live = max((common_prefix(s.cached, prompt) for s in self.slots), default=0)
            reading = max(
                (common_prefix(s.cached + s.todo, prompt) for s in self.slots if s.todo),
                default=0,
            )
            if reading - live >= SHARE_AT_LEAST:
                return  # read once, then copied
            best_own = max(free, key=lambda s: (common_prefix(s.cached, prompt), -s.used))
            own = common_prefix(best_own.cached, prompt)
            shared = min(max(own, live), len(prompt) - 1)
            need = len(prompt) - shared + choice.request.max_new
            if reserved + need > self.kv_total and reserved > 0:
                return
            self.waiting.popleft()
            reserved += need
            self._start(best_own, choice, shared)

    def _start(self, slot: Slot, choice: Choice, shared: int) -> None:
        prompt = choice.request.prompt
        own = min(common_prefix(slot.cached, prompt), shared)
        if own == shared:
            self.ll.llama_memory_seq_rm(self.mem, slot.seq, shared, -1)
        else:
            source = max(self.slots, key=lambda s: common_prefix(s.cached, prompt))
            self.ll.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            self.ll.llama_memory_seq_cp(self.mem, source.seq, slot.seq, 0, shared)
        slot.cached = prompt[:shared]
        slot.todo = prompt[shared:]
        slot.choice = choice
        slot.next_token = None
        slot.used = time.monotonic()
        slot.reserved = len(slot.todo) + choice.request.max_new
        slot.sampler = self._sampler(choice)

    def _sampler(self, choice: Choice) -> Any:
        ll, req = self.ll, choice.request
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if req.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(TOP_K))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(req.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(MIN_P, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(req.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(choice.seed))
        return chain

    def _free(self, slot: Slot) -> None:
        """End a slot's choice; what it decoded stays as cache for later prefixes."""
        if slot.sampler is not None:
            self.ll.llama_sampler_free(slot.sampler)
        slot.sampler = None
        slot.choice = None
        slot.todo = []
        slot.next_token = None
        slot.reserved = 0

    def _forget(self, slot: Slot) -> None:
        self.ll.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.cached = []

    def _plan(self, fill: bool) -> list[tuple[Slot, list[int], bool]]:
        """What the next decode carries: (slot, tokens, wants logits) — one token for each
        generating slot, then prompt chunks up to n_batch tokens."""
        plan: list[tuple[Slot, list[int], bool]] = []
        room = self.n_batch
        for slot in self.slots:
            if slot.choice is not None and slot.next_token is not None:
                plan.append((slot, [slot.next_token], True))
                room -= 1
        if fill:
            for slot in sorted(self.slots, key=lambda s: s.used):
                if slot.choice is not None and slot.todo and room > 0:
                    chunk = slot.todo[:room]
                    plan.append((slot, chunk, len(chunk) == len(slot.todo)))
                    room -= len(chunk)
        return plan

    def _decode(self) -> None:
        ll, batch = self.ll, self.batch
        fill = True
        while True:
            plan = self._plan(fill)
            if not plan:
                return
            n = 0
            rows: list[tuple[Slot, int]] = []
            for slot, tokens, logits in plan:
                pos = len(slot.cached)
                for j, token in enumerate(tokens):
                    batch.token[n] = token
                    batch.pos[n] = pos + j
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = slot.seq
                    batch.logits[n] = logits and j == len(tokens) - 1
                    n += 1
                if logits:
                    rows.append((slot, n - 1))
            batch.n_tokens = n
            generating = None if n > len(rows) else len(rows)
            threads = self.threads.pick(generating)
            if threads != self._threads_now:
                ll.llama_set_n_threads(self.ctx, threads, threads)
                self._threads_now = threads
            began = time.perf_counter()
            status = ll.llama_decode(self.ctx, batch)
            took = time.perf_counter() - began
            if status == 0:
                self.threads.record(generating, threads, took)
                break
            if status != 1:
                raise RuntimeError(f"llama_decode returned {status}")
            # The KV cache is full: drop idle caches, then stop reading prompts, then end
            # the newest generating choice; the decode is retried each time.
            idle = [s for s in self.slots if s.choice is None and s.cached]
            if idle:
                for slot in idle:
                    self._forget(slot)
            elif fill and any(len(t) > 1 or s.todo for s, t, _ in plan):
                fill = False
            else:
                newest = max((s for s in self.slots if s.choice is not None), key=lambda s: s.used)
                self._finish(newest, "length")
        for slot, tokens, _ in plan:
            slot.cached.extend(tokens)
            if slot.todo:
                slot.todo = slot.todo[len(tokens) :]
        for slot, row in rows:
            token = ll.llama_sampler_sample(slot.sampler, self.ctx, row)
            self._emit(slot, token)

    def _emit(self, slot: Slot, token: int) -> None:
        choice = slot.choice
        assert choice is not None
        if self.ll.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, "stop")
            return
        choice.generated += 1
        size = self.ll.llama_token_to_piece(self.vocab, token, self._piece, 256, 0, False)
        text, stopped = choice.out.feed(self._piece.raw[: max(size, 0)])
        if text:
            choice.request.events.put((choice.index, text, None))
        if stopped:
            self._finish(slot, "stop", flush=False)
        elif choice.generated >= choice.request.max_new:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    def _finish(self, slot: Slot, reason: str, *, flush: bool = True) -> None:
        choice = slot.choice
        assert choice is not None
        if flush and (text := choice.out.flush()):
            choice.request.events.put((choice.index, text, None))
        choice.request.generated[choice.index] = choice.generated
        choice.request.events.put((choice.index, "", reason))
        self._free(slot)


# --- HTTP ---------------------------------------------------------------------------------------


def parse_request(body: dict[str, Any], engine: Engine) -> tuple[Request, bool, bool]:
    """(the engine's request, stream?, include usage in the stream?) or BadRequest."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a 'role'")
        if isinstance(m.get("content"), list):  # content parts: the text ones
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))

    def number(name: str, default: float, low: float, high: float) -> float:
        value = body.get(name)
        if value is None:
            return default
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not low <= value <= high
        ):
            raise BadRequest(f"'{name}' must be a number from {low} to {high}")
        return float(value)

    n = int(number("n", 1, 1, len(engine.slots)))
    temperature = number("temperature", DEFAULT_TEMPERATURE, 0, 2)
    top_p = number("top_p", DEFAULT_TOP_P, 0, 1)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("'seed' must be an integer")
    stop = body.get("stop") or []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("'stop' must be a string or a list of strings")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise BadRequest("'max_tokens' must be a positive integer")
    prompt = engine.tokenize_chat(messages)
    room = engine.n_ctx_seq - len(prompt)
    if room < 1:
        raise BadRequest(
            f"the prompt is {len(prompt)} tokens; the model's context holds {engine.n_ctx_seq}"
        )
    stream = bool(body.get("stream"))
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    request = Request(
        prompt=prompt,
        n=n,
        max_new=min(max_tokens or room, room),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stops=stops,
    )
    return request, stream, usage


def make_handler(engine: Engine, alias: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # As model servers do: without it, a body written after its headers (or an SSE chunk
        # after the last) waits for the client's delayed ACK, up to 40 ms.
        disable_nagle_algorithm = True
        server_version = "autocoder-local"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(
                status,
                {"error": {"message": message, "type": "invalid_request_error", "code": status}},
            )

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                model = {"id": alias, "object": "model", "owned_by": "me", "permissions": []}
                self._json(200, {"object": "list", "data": [model]})
            elif self.path.rstrip("/") == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, f"no route {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise BadRequest(f"the body must be JSON of at most {MAX_BODY} bytes")
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                request, stream, usage = parse_request(body, engine)
            except (BadRequest, ValueError) as e:
                self._error(400, str(e))
                return
            started = time.monotonic()
            engine.submit(request)
            try:
                if stream:
                    self._stream(request, usage)
                else:
                    self._complete(request)
            except OSError:
                pass  # the client went away
            finally:
                request.cancelled.set()
                self.close_connection = self.close_connection or stream
            print(
                f"autocoder.local_server: n={request.n} prompt={len(request.prompt)} "
                f"in {time.monotonic() - started:.1f}s",
                flush=True,
            )

        def _gone(self) -> bool:
            """Whether the client closed its connection (a closed socket reads as EOF)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _events(self, request: Request) -> Iterator[tuple[int, str, str | None]]:
            """The engine's events until every choice ended; stops if the client leaves.
            Looked for while tokens flow too: a client that timed out waiting for a whole
            reply (nothing is written to it until the end) would otherwise keep its slot
            and the CPU until the last token, and its retry would queue behind it."""
            ended = 0
            looked = time.monotonic()
            while ended < request.n:
                try:
                    event = request.events.get(timeout=GONE_EVERY)
                except queue.Empty:
                    event = None
                if time.monotonic() - looked >= GONE_EVERY:
                    if self._gone():
                        raise ConnectionAbortedError()
                    looked = time.monotonic()
                if event is None:
                    continue
                index, text, reason = event
                if reason == "error" or index is None:
                    raise _EngineFailed(text)
                ended += reason is not None
                yield index, text, reason

        def _complete(self, request: Request) -> None:
            texts = [""] * request.n
            reasons = ["stop"] * request.n
            try:
                for index, text, reason in self._events(request):
                    texts[index] += text
                    if reason is not None:
                        reasons[index] = reason
            except _EngineFailed as e:
                self._error(500, str(e))
                return
            self._json(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": alias,
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": texts[i]},
                            "logprobs": None,
                            "finish_reason": reasons[i],
                        }
                        for i in range(request.n)
                    ],
                    "usage": _usage(len(request.prompt), sum(request.generated)),
                },
            )

        def _stream(self, request: Request, include_usage: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

            def send(choices: list[dict[str, Any]], **extra: Any) -> None:
                chunk = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": alias,
                    "choices": choices,
                    **extra,
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            for i in range(request.n):
                send(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ]
                )
            try:
                for index, text, reason in self._events(request):
                    if text:
                        send([{"index": index, "delta": {"content": text}, "finish_reason": None}])
                    if reason is not None:
                        send([{"index": index, "delta": {}, "finish_reason": reason}])
            except _EngineFailed as e:
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e)}})}\n\n".encode())
            if include_usage:
                send([], usage=_usage(len(request.prompt), sum(request.generated)))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


class _EngineFailed(Exception):
    pass


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m autocoder.local_server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model_alias", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n_ctx", type=int, default=4096, help="context of one sequence")
    parser.add_argument("--kv_factor", type=int, default=2, help="KV cache, in n_ctx")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--n_batch", type=int, default=256)
    parser.add_argument("--n_ubatch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="the most threads a step uses")
    parser.add_argument(
        "--adapt_threads", type=int, default=1, help="1: each step uses 1 or --threads, as faster"
    )
    args = parser.parse_args(argv)
    engine = Engine(args)
    try:
        server = Server(("127.0.0.1", args.port), make_handler(engine, args.model_alias))
    except OSError as e:
        print(
            f"autocoder.local_server: cannot bind 127.0.0.1:{args.port}: {e.strerror}", flush=True
        )
        sys.exit(1)
    threading.Thread(target=engine.run, name="engine", daemon=True).start()
    print(
        f"autocoder.local_server: {args.model_alias} on 127.0.0.1:{args.port}, "
        f"{len(engine.slots)} slots, KV cache {engine.kv_total} tokens",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
