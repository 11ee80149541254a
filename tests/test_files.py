"""The user's data: a CSV goes in (multipart or `--file`), a summary and a plot come out.

Real uvicorn, real sandboxed kernels, the scripted model; one test asks the embedded model.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest

from autocoder.config import Settings, load_settings
from autocoder.files import InputFile
from autocoder.notebook import record_path
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import SANDBOX, SECRET, LiveServer, autocoder_cmd
from tests.venvs import venv_importing_ours

pytestmark = pytest.mark.timeout(120)

SALES = b"month,revenue\n2024-01,100\n2024-01,50\n2024-02,70\n2024-03,30\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ANALYSIS = """\
import pandas as pd
import matplotlib.pyplot as plt

df = pd.read_csv("sales.csv")
by_month = df.groupby("month", as_index=False)["revenue"].sum()
by_month.to_csv("summary.csv", index=False)
by_month.plot(x="month", y="revenue", kind="bar")
plt.savefig("revenue.png")
plt.show()
print(by_month.to_string(index=False))
"""


def make_settings(root: Path, llm: ScriptedLLM, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_base_url": llm.base_url,
        "openai_api_key": SECRET,
        "notebooks_dir": root / "notebooks",
        "autofile_dir": root / "autofile",
        "sandbox": SANDBOX,
        "timeout": 30.0,
        "llm_retries": 0,
        "pool_size": 1,
        "max_upload_mb": 1,
        "max_files": 3,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    with LiveServer(make_settings(tmp_path_factory.mktemp("files"), llm_server)) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=90) as c:
        yield c


def user_message(request: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in request["messages"] if m["role"] == "user")


def test_a_csv_posted_as_multipart_comes_back_as_a_summary_and_a_plot(
    client: httpx.Client, llm: ScriptedLLM, live: LiveServer
) -> None:
    llm.script(fenced(ANALYSIS))
    r = client.post(
        "/run",
        data={"prompt": "load sales.csv and plot revenue by month"},
        files=[("files", ("sales.csv", SALES, "text/csv"))],
    )
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["status"] == "success", result["error"]
    assert "2024-01" in result["output"] and "150" in result["output"]

    # The model was told the file's name, size and what pandas sees in it, and what it can import.
    asked = llm.requests[0]
    assert "sales.csv" in user_message(asked)
    assert re.search(r"month \((object|str)\), revenue \(int64\)", user_message(asked))
    assert "pandas" in asked["messages"][0]["content"]

    listed = {f["name"]: f for f in result["files"]}
    assert set(listed) == {"summary.csv", "revenue.png"}  # the input is not listed
    assert listed["revenue.png"]["media_type"] == "image/png"
    summary = client.get(listed["summary.csv"]["url"])
    assert summary.status_code == 200
    kept = Path(result["workdir"])
    assert summary.content == (kept / "summary.csv").read_bytes()
    assert summary.content.decode().splitlines() == [
        "month,revenue",
        "2024-01,150",
        "2024-02,70",
        "2024-03,30",
    ]
    png = client.get(listed["revenue.png"]["url"])
    assert png.content == (kept / "revenue.png").read_bytes()
    assert png.content.startswith(PNG_MAGIC) and len(png.content) == listed["revenue.png"]["size"]

    # plt.show() reaches the API's outputs and the notebook as image/png.
    shown = [o for o in result["outputs"] if "image/png" in o.get("data", {})]
    assert shown and base64.b64decode(shown[0]["data"]["image/png"]).startswith(PNG_MAGIC)
    nb = nbformat.read(result["notebook"], as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert any("image/png" in o.get("data", {}) for o in cells[-1].outputs)
    assert "revenue.png" in nb.cells[-1].source  # the notebook links what the code wrote

    # The record served later says the same, with the same addresses; the record itself, the
    # engine's, names the files and leaves where HTTP serves them to the API.
    again = client.get(f"/runs/{result['run_id']}").json()
    assert {f["name"]: f["url"] for f in again["files"]} == {
        name: f"/runs/{result['run_id']}/files/{name}" for name in ("summary.csv", "revenue.png")
    }
    record = json.loads(record_path(Path(result["notebook"]).parent, result["run_id"]).read_text())
    assert {f["url"] for f in record["files"]} == {""}


async def test_the_model_is_told_what_pandas_sees_in_each_data_file(
    runner: Runner, llm: ScriptedLLM
) -> None:
    """Read in the run's own sandboxed kernel before the model is asked; the code then starts
    from an empty namespace all the same."""
    inputs = [
        InputFile("sales.csv", SALES),
        InputFile("semi.csv", b"city;people\nOslo;700000\nBergen;290000\n"),
        InputFile("orders.json", b'[{"id": 1, "total": 9.5}, {"id": 2, "total": 3.0}]'),
        InputFile("broken.json", b'{"id": 1,'),
        InputFile("notes.txt", b"remember the milk\n"),
    ]
    names = "('view', 'views', 'csv', 'json', 'warnings', 'pandas', 'pd', 'found')"
    llm.script(fenced(f"print([n for n in {names} if n in dir()])"))
    result = await runner.run("what is in these files?", inputs=inputs)

    told = user_message(llm.requests[0])
    # (pandas 3 calls a column of text `str`, earlier ones `object`)
    assert re.search(
        r"pd.read_csv\('sales.csv'\) gives 4 rows x 2 columns: month \((object|str)\), revenue "
        r"\(int64\)",
        told,
    )
    assert "2024-02       70" in told  # its first rows, as pandas prints them
    assert "pd.read_csv('semi.csv', sep=';') gives 2 rows x 2 columns" in told
    assert "json.load gives a list of 2 dict with keys ['id', 'total']" in told
    assert (
        "pd.read_json('orders.json') gives 2 rows x 2 columns: id (int64), total (float64)" in told
    )
    assert "broken.json" in told and "reading it fails: JSONDecodeError" in told
    assert "remember the milk" in told  # not a data file: its first lines, as before
    assert result.output == "[]\n"


def test_the_input_is_read_only_for_the_code(client: httpx.Client, llm: ScriptedLLM) -> None:
    llm.script(fenced("open('sales.csv', 'a').write('hacked')"))
    r = client.post(
        "/run",
        data={"prompt": "append to sales.csv", "max_attempts": "1"},
        files=[("files", ("sales.csv", SALES, "text/csv"))],
    )
    result = r.json()
    assert result["status"] == "error" and "PermissionError" in result["error"]


def test_a_missing_package_is_its_own_kind_and_the_retry_says_do_without(
    client: httpx.Client, llm: ScriptedLLM
) -> None:
    llm.script(fenced("import polarsx_not_here\nprint(1)"), fenced("print('done without')"))
    result = client.post("/run", json={"prompt": "use polars", "max_attempts": 2}).json()
    first, second = result["attempts"]
    assert first["error_kind"] == "missing_module"
    assert second["status"] == "success"
    retry = user_message(llm.requests[1])
    assert "polarsx_not_here" in retry and "Do without it" in retry


BAD_UPLOADS: list[tuple[str, dict[str, Any], int, str]] = [
    ("too big a file", {"files": [("files", ("big.csv", b"x" * (1024 * 1024 + 1)))]}, 413, "MB"),
    (
        "too big together",
        {"files": [("files", (f"p{i}.csv", b"x" * 400_000)) for i in range(3)]},
        413,
        "MB",
    ),
    (
        "too many files",
        {"files": [("files", (f"f{i}.txt", b"x")) for i in range(4)]},
        422,
        "AUTOCODER_MAX_FILES",
    ),
    ("far too many files", {"files": [("files", (f"f{i}.txt", b"x")) for i in range(9)]}, 422, ""),
    ("a slash", {"files": [("files", ("../etc.csv", b"x"))]}, 422, "separator"),
    ("a leading dot", {"files": [("files", (".bashrc", b"x"))]}, 422, "dot"),
    ("a control char", {"raw": "a\x01b.csv"}, 422, "control"),
    ("a NUL", {"raw": "a\x00b.csv"}, 422, "control"),
    ("a raw path", {"raw": "../../x.csv"}, 422, "separator"),
    ("an empty file", {"files": [("files", ("empty.csv", b""))]}, 422, "empty"),
    (
        "a duplicate",
        {"files": [("files", ("a.csv", b"1")), ("files", ("a.csv", b"2"))]},
        422,
        "two files",
    ),
    ("an unknown field", {"files": [("files", ("a.csv", b"1"))], "extra": "x"}, 422, ""),
    # Names that look alike, or hide what they are (issue 29).
    (
        "one name in NFC and NFD",
        {"files": [("files", ("caf\u00e9.csv", b"1")), ("files", ("cafe\u0301.csv", b"2"))]},
        422,
        "two files are named 'caf\u00e9.csv'",
    ),
    (
        "A.csv beside a.csv",
        {"files": [("files", ("A.csv", b"1")), ("files", ("a.csv", b"2"))]},
        422,
        "differ only in case",
    ),
    ("a right-to-left override", {"raw": "evil\u202ecsv.exe"}, 422, "U+202E"),
    ("a left-to-right isolate", {"raw": "a\u2066b.csv"}, 422, "U+2066"),
    ("a zero-width space", {"raw": "a\u200b.csv"}, 422, "U+200B"),
    ("a fullwidth solidus", {"raw": "etc\uff0fpasswd"}, 422, "looks like a path separator"),
    ("a division slash", {"raw": "etc\u2215passwd"}, 422, "looks like a path separator"),
    ("a fullwidth backslash", {"raw": "a\uff3cb.csv"}, 422, "looks like a path separator"),
    ("a fullwidth dot", {"raw": "\uff0ebashrc"}, 422, "dot"),
    ("three spaces", {"raw": "   "}, 422, "only whitespace"),
    ("Hangul fillers", {"raw": "\u3164\u3164"}, 422, "only whitespace"),
    ("a trailing space", {"raw": "sales.csv "}, 422, "ends with whitespace"),
    ("a name that is not UTF-8", {"raw": b"caf\xe9.csv"}, 422, "not valid UTF-8"),
]


def multipart_with_name(filename: str | bytes) -> bytes:
    return (
        b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nread it\r\n'
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="'
        + (filename if isinstance(filename, bytes) else filename.encode())
        + b'"\r\nContent-Type: text/csv\r\n\r\nx\r\n--B--\r\n'
    )


@pytest.mark.parametrize(("name", "upload", "status", "says"), BAD_UPLOADS, ids=lambda v: v)
def test_bad_uploads_get_a_4xx_that_names_the_rule_and_start_no_run(
    client: httpx.Client,
    llm: ScriptedLLM,
    live: LiveServer,
    name: str,
    upload: dict[str, Any],
    status: int,
    says: str,
) -> None:
    llm.script(fenced("print('must not run')"))
    before = sorted(p.name for p in live.settings.notebooks_dir.iterdir())
    data = {"prompt": "read the file"}
    if "extra" in upload:
        data["extra"] = upload["extra"]
    if "raw" in upload:  # a name no well-behaved client would send
        r = client.post(
            "/run",
            content=multipart_with_name(upload["raw"]),
            headers={"content-type": "multipart/form-data; boundary=B"},
        )
    else:
        r = client.post("/run", data=data, files=upload["files"])
    assert r.status_code == status, (name, r.status_code, r.text)
    assert says in r.text
    assert llm.requests == []
    assert sorted(p.name for p in live.settings.notebooks_dir.iterdir()) == before


def test_a_name_sent_in_nfd_is_stored_in_nfc_the_form_a_prompt_types(
    client: httpx.Client, llm: ScriptedLLM
) -> None:
    """macOS spells many names in NFD; the prompt (and the model) spell them in NFC."""
    llm.script(fenced("print(open('caf\u00e9.csv').read().strip())"))
    r = client.post(
        "/run",
        data={"prompt": "print caf\u00e9.csv"},
        files=[("files", ("cafe\u0301.csv", b"espresso\n"))],
    )
    result = r.json()
    assert r.status_code == 200 and result["status"] == "success", r.text
    assert result["output"].strip() == "espresso"
    told = user_message(llm.requests[0])
    assert "caf\u00e9.csv" in told and "cafe\u0301" not in told


def test_a_multipart_body_cut_off_midway_starts_no_run(live: LiveServer, llm: ScriptedLLM) -> None:
    llm.script(fenced("print('must not run')"))
    before = sorted(p.name for p in live.settings.notebooks_dir.iterdir())
    host, port = live.url.removeprefix("http://").split(":")
    body = (
        b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n'
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.csv"\r\n\r\n'
        b"month,revenue\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /run HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n"
            + f"Content-Length: {len(body) + 1000}\r\n\r\n".encode()
            + body
        )
        s.shutdown(socket.SHUT_WR)
        s.recv(65536)
    assert llm.requests == []
    assert sorted(p.name for p in live.settings.notebooks_dir.iterdir()) == before


def test_a_wrong_content_type_is_a_4xx(client: httpx.Client, llm: ScriptedLLM) -> None:
    r = client.post("/run", content=b"prompt=hi", headers={"content-type": "text/csv"})
    assert r.status_code == 422
    r = client.post(
        "/run", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert 400 <= r.status_code < 500
    assert llm.requests == []


def test_downloads_never_leave_the_runs_directory(
    client: httpx.Client, llm: ScriptedLLM, live: LiveServer
) -> None:
    secret = live.settings.autofile_dir / "outside.txt"
    secret.write_text("not yours")
    llm.script(
        fenced(
            "import os\n"
            "open('ok.txt', 'w').write('fine')\n"
            f"os.symlink({str(secret)!r}, 'link.txt')\n"
            "os.symlink('/etc', 'etcdir')\n"
        )
    )
    result = client.post("/run", json={"prompt": "leave a symlink"}).json()
    assert result["status"] == "success", result["error"]
    assert [f["name"] for f in result["files"]] == ["ok.txt"]
    run = result["run_id"]
    assert client.get(f"/runs/{run}/files/ok.txt").text == "fine"
    for name in (
        "link.txt",
        "etcdir/passwd",
        "../../outside.txt",
        "..%2F..%2Foutside.txt",
        "%2Fetc%2Fpasswd",
        "ok.txt%00",
    ):
        r = client.get(f"/runs/{run}/files/{name}")
        assert 400 <= r.status_code < 500, (name, r.status_code)
        assert "not yours" not in r.text and "root:" not in r.text


def test_the_cli_takes_files_and_says_where_the_outputs_are(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sales.csv").write_bytes(SALES)
    llm.script(fenced(ANALYSIS))
    env = {**cli_env, "AUTOCODER_TIMEOUT": "30"}
    proc = subprocess.run(
        [*autocoder_cmd(), "run", "--file", "data/sales.csv", "plot revenue by month"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    files_line = next(line for line in proc.stdout.splitlines() if line.startswith("files:"))
    kept = Path(files_line.split(None, 1)[1])
    assert "summary.csv" in proc.stdout and "revenue.png" in proc.stdout
    assert (kept / "revenue.png").read_bytes().startswith(PNG_MAGIC)
    assert (kept / "summary.csv").read_text().startswith("month,revenue\n2024-01,150")

    for bad, says in ((["--file", "nope.csv"], "not a file"), (["--file", ".hidden"], "")):
        if bad[1] == ".hidden":
            (tmp_path / ".hidden").write_text("x")
            says = "dot"
        proc = subprocess.run(
            [*autocoder_cmd(), "run", *bad, "read it"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_kernel_python_without_ipykernel_is_one_line(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run(
        [*autocoder_cmd(), "run", "--kernel-python", str(fake), "print 1"],
        env=cli_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "ipykernel" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_the_embedded_model_plots_a_sine_wave(tmp_path: Path) -> None:
    """No OPENAI_* settings: the embedded model answers."""
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        assert var not in os.environ or pytest.skip(f"{var} is set")
    settings = Settings(
        notebooks_dir=tmp_path / "nb",
        autofile_dir=tmp_path / "af",
        sandbox=SANDBOX,  # type: ignore[arg-type]
        timeout=30.0,
        model_keep_alive=0,  # its own model server, ended with it
    )
    runner = Runner(settings)
    try:
        # The plumbing is what is tested here (a real model's plot arrives as a PNG); how often
        # the small model gets a vaguer prompt right is bench/tasks.py's to measure.
        result = await runner.run(
            "import numpy and matplotlib.pyplot, then plot a sine wave and show it"
        )
    finally:
        await runner.close()
    shown = [o for a in result.attempts for o in a.outputs if "image/png" in o.get("data", {})] + [
        f for f in result.files if f.media_type == "image/png"
    ]
    assert shown, (result.error, [a.error for a in result.attempts])


@pytest.mark.asyncio
async def test_kernels_can_run_with_another_interpreter_under_the_sandbox(
    settings: Settings, llm: ScriptedLLM, tmp_path: Path
) -> None:
    env = tmp_path / "env"
    python = venv_importing_ours(env)
    llm.script(fenced("import sys\nprint(sys.prefix)"))
    runner = Runner(settings.model_copy(update={"kernel_python": python}))
    try:
        result = await runner.run("which python runs me?")
    finally:
        await runner.close()
    assert result.status == "success", result.error
    assert result.output.strip() == str(env)
