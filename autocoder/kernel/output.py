"""Collecting a kernel's outputs as nbformat outputs, within a byte limit (head and tail)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from autocoder.inside import output_cap
from autocoder.records import ErrorInfo, ErrorKind, Execution

OutputCallback = Callable[[dict[str, Any]], None]


class OutputCollector:
    """Turns iopub messages into nbformat outputs, keeping at most `limit` bytes (head and tail).

    Past the limit nothing more is stored except a bounded tail of the stream text. Our
    kernels cut their output to the limit before sending it (output_cap): a message carrying
    output_cap.CUT_KEY stands for that many bytes the server never received, and one carrying
    LOST_KEY says output was lost in the kernel. This cap is the backstop for what bypasses it.
    """

    def __init__(self, limit: int, on_output: OutputCallback | None = None) -> None:
        self.limit = limit
        self.head_budget = limit // 2
        self.tail_budget = limit - self.head_budget
        self.outputs: list[dict[str, Any]] = []
        self.tail = ""
        self.tail_name = "stdout"
        self.total = 0
        self.dropped = 0
        self.cut_at_source = False
        self.lost = 0
        # None until the output first goes over the limit; then what the head may still take.
        self.head_room: int | None = None
        self.error: ErrorInfo | None = None
        self.on_output = on_output
        # Set once autocoder interrupted the code itself (a timeout, a flood): the
        # KeyboardInterrupt that follows is ours, not an output of the code. It is neither
        # streamed nor kept among the outputs; `error` still says the interrupt took.
        self.stopped = False

    @property
    def over(self) -> bool:
        return self.cut_at_source or self.total > self.limit

    def add(self, msg: dict[str, Any]) -> None:
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "clear_output":
            if not self.over:
                self.outputs.clear()
            return
        if kind not in {"stream", "display_data", "execute_result", "error", "update_display_data"}:
            return
        if kind == "update_display_data":
            return
        cut = content.get(output_cap.CUT_KEY)
        if isinstance(cut, int) and cut > 0:
            self.total += cut
            self.dropped += cut
            self.cut_at_source = True
            self._close_head()
            self.head_room = 0  # what follows comes after the gap
            if kind == "stream":
                return  # the kernel's own line about the cut; finish() says how much in all
        lost = content.get(output_cap.LOST_KEY)
        if isinstance(lost, int):
            self.lost += max(lost, 1)
        out = output_of(kind, content)
        if kind == "error":
            out = without_unknown_source(out)
            out["traceback"] = without_own_frames(out["traceback"])
            self.error = ErrorInfo(
                ename=out["ename"], evalue=out["evalue"], traceback=list(out["traceback"])
            )
            if self.stopped:
                return
        size = _size(out)
        self.total += size
        if self.on_output is not None:
            self.on_output(_preview(out))
        # Up to the limit everything is kept; past it, the head and a tail of the stream text.
        if kind == "error" or not self.over or isinstance(cut, int):
            self._append(out)
            return
        self._close_head()
        if kind == "stream":
            self._cut_stream(out)
        self.dropped += size

    def _close_head(self) -> None:
        """Over the limit: keep what fits in the head budget, stream text past it as the tail."""
        if self.head_room is not None:
            return
        kept, self.outputs, self.head_room = self.outputs, [], self.head_budget
        for out in kept:
            if out["output_type"] == "error":
                self.outputs.append(out)
            elif out["output_type"] == "stream":
                self._cut_stream(out)
            elif self.head_room >= (size := _size(out)) and not self.tail:
                self.outputs.append(out)
                self.head_room -= size

    def _cut_stream(self, out: dict[str, Any]) -> None:
        assert self.head_room is not None
        text = out["text"]
        room = min(self.head_room, len(text)) if not self.tail else 0
        if room:
            self._append({**out, "text": text[:room]})
            self.head_room -= room
        # Slice before joining: one flushed message can be hundreds of MB.
        text = text[max(room, len(text) - self.tail_budget) :]
        if text:
            self.tail = (self.tail + text)[-self.tail_budget :]
            self.tail_name = out["name"]
            self.head_room = 0

    def _append(self, out: dict[str, Any]) -> None:
        last = self.outputs[-1] if self.outputs else None
        if (
            out["output_type"] == "stream"
            and last is not None
            and last["output_type"] == "stream"
            and last["name"] == out["name"]
        ):
            last["text"] += out["text"]
        else:
            self.outputs.append(out)

    def execution(self, kind: ErrorKind | None, duration: float) -> Execution:
        """What was collected, as the record of one execution."""
        outputs = self.finish()
        stdout, stderr, text = texts(outputs)
        return Execution(
            outputs=outputs,
            stdout=stdout,
            stderr=stderr,
            text=text,
            error=self.error,
            kind=kind,
            duration=duration,
            truncated=self.over,
            output_bytes=self.total,
        )

    def finish(self) -> list[dict[str, Any]]:
        if self.over:
            cut = self.total - sum(_size(o) for o in self.outputs) - len(self.tail.encode())
            self._append(
                {
                    "output_type": "stream",
                    "name": self.tail_name,
                    "text": f"\n... [{cut:,} bytes of output cut] ...\n",
                }
            )
            if self.tail:
                self._append({"output_type": "stream", "name": self.tail_name, "text": self.tail})
        for out in self.outputs:
            if out["output_type"] == "stream":
                out["text"] = _join_crlf(out["text"])
        return self.outputs


_OWN_FRAME = re.compile(r"^\s*File \"?<autocoder ")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def without_own_frames(traceback: list[str]) -> list[str]:
    """A traceback without the frames of autocoder's own code in the kernel (the output cap's
    interrupt guard, the assert explainer): they say nothing about the user's code, to the
    user or to the model. IPython sends one frame per entry; a plain Python traceback, one
    entry of many frames, is filtered line by line."""
    kept = []
    for entry in traceback:
        if not isinstance(entry, str):
            kept.append(entry)
            continue
        if _OWN_FRAME.match(_ANSI.sub("", entry)):
            continue
        if "<autocoder " in entry and "\n" in entry:
            entry = _drop_plain_frames(entry)
        kept.append(entry)
    return kept


def _drop_plain_frames(text: str) -> str:
    """`  File "<autocoder …>", line N, in f` and the lines indented under it, dropped."""
    out: list[str] = []
    skipping = False
    for line in text.split("\n"):
        plain = _ANSI.sub("", line)
        if plain.startswith("  File "):
            skipping = bool(_OWN_FRAME.match(plain))
        elif not plain.startswith("    "):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


def output_of(kind: str, content: dict[str, Any]) -> dict[str, Any]:
    """An iopub message's content as an nbformat v4 output, in the shape the notebook schema
    asks for whatever the kernel sent (a value of the wrong type is dropped or made a string).

    nbformat's `output_from_msg` does the same by validating each output against the schema
    (importing nbformat costs every command 2 s, and validating a flood's text costs a run);
    tests/test_notebook.py validates what comes out of here.
    """
    if kind == "stream":
        text = content.get("text")
        return {
            "output_type": "stream",
            "name": content.get("name")
            if content.get("name") in {"stdout", "stderr"}
            else "stdout",
            "text": text if isinstance(text, str) else str(text or ""),
        }
    if kind == "error":
        traceback = content.get("traceback")
        return {
            "output_type": "error",
            "ename": str(content.get("ename", "")),
            "evalue": str(content.get("evalue", "")),
            "traceback": [str(e) for e in traceback] if isinstance(traceback, list) else [],
        }
    metadata = content.get("metadata")
    out: dict[str, Any] = {
        "output_type": kind,
        "data": _mimebundle(content.get("data")),
        "metadata": metadata if isinstance(metadata, dict) else {},
    }
    if kind == "execute_result":
        count = content.get("execution_count")
        valid = isinstance(count, int) and not isinstance(count, bool) and count >= 0
        out["execution_count"] = count if valid else None
    return out


def _mimebundle(data: object) -> dict[str, Any]:
    """Mimetype → value; a value not JSON is text (or a list of lines), else it is left out."""
    if not isinstance(data, dict):
        return {}
    return {
        str(mime): value
        for mime, value in data.items()
        if _is_json_mime(str(mime))
        or isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(line, str) for line in value))
    }


def _is_json_mime(mime: str) -> bool:
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


def kind_of(outcome: str, collector: OutputCollector) -> ErrorKind | None:
    """What an execution's end means, most telling first."""
    if outcome == "died":
        return ErrorKind.KERNEL_DIED
    if collector.lost:
        return ErrorKind.OUTPUT_LOST
    if collector.over:
        return ErrorKind.OUTPUT_LIMIT
    if outcome == "timeout":
        return ErrorKind.TIMEOUT
    if collector.error is not None:
        return ErrorKind.EXCEPTION
    return None


def _join_crlf(text: str) -> str:
    return text.replace("\r\n", "\n")


def _size(out: dict[str, Any]) -> int:
    if out["output_type"] == "stream":
        text = out["text"]
        # isascii() is O(1); encoding a flood just to measure it would copy it once more.
        return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
    data = out.get("data", {})
    return sum(len(v) if isinstance(v, str) else len(str(v)) for v in data.values())


def _preview(out: dict[str, Any]) -> dict[str, Any]:
    """A small copy of an output for progress events (no large payloads)."""
    if out["output_type"] == "stream":
        return {"output_type": "stream", "name": out["name"], "text": out["text"][:4096]}
    if out["output_type"] == "error":
        return {"output_type": "error", "ename": out["ename"], "evalue": out["evalue"]}
    plain = out.get("data", {}).get("text/plain", "")
    return {
        "output_type": out["output_type"],
        "mimetypes": sorted(out.get("data", {})),
        "text": plain[:4096] if isinstance(plain, str) else "",
    }


# What IPython shows for the source of a compiled frame (pandas' Cython ones): a line per frame
# that says nothing. The frame's own line (file, line, function) is kept.
_NO_SOURCE = re.compile(
    r"\s*(?:-*>)?\s*\d*\s*'Could not get source, probably due dynamically evaluated source code\.'\s*"
)


def without_unknown_source(content: dict[str, Any]) -> dict[str, Any]:
    """An error's content without IPython's "Could not get source" lines, before the page,
    the notebook or the model sees its traceback."""
    entries = content.get("traceback")
    if not entries or not any("Could not get source" in str(e) for e in entries):
        return content
    kept = [
        "\n".join(
            line for line in str(e).split("\n") if not _NO_SOURCE.fullmatch(_ANSI.sub("", line))
        )
        for e in entries
    ]
    return {**content, "traceback": kept}


def texts(outputs: list[dict[str, Any]]) -> tuple[str, str, str]:
    """stdout, stderr and the answer text (stdout plus text/plain of results) of some outputs."""
    stdout: list[str] = []
    stderr: list[str] = []
    text: list[str] = []
    for out in outputs:
        if out["output_type"] == "stream":
            (stdout if out["name"] == "stdout" else stderr).append(out["text"])
            if out["name"] == "stdout":
                text.append(out["text"])
        elif out["output_type"] in {"execute_result", "display_data"}:
            plain = out.get("data", {}).get("text/plain")
            if isinstance(plain, str):
                text.append(plain if plain.endswith("\n") else plain + "\n")
    return "".join(stdout), "".join(stderr), "".join(text)
