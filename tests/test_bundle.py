"""A notebook that works with files re-runs where Jupyter runs it: from its own folder, on this
machine, or unpacked from the run's zip somewhere else.

Real uvicorn, real sandboxed kernels, the scripted model; the notebooks are re-executed with
nbclient in a kernel whose working directory is the notebook's folder, as JupyterLab's is.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import nbformat
import pytest
from nbclient import NotebookClient

from autocoder import files
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer
from tests.test_files import ANALYSIS, SALES, make_settings

pytestmark = pytest.mark.timeout(180)

LOAD = "import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(len(df), 'rows')"
TOTAL = "print('total', int(df['revenue'].sum()))"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    with LiveServer(make_settings(tmp_path_factory.mktemp("bundle"), llm_server)) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=90) as c:
        yield c


def analyse(client: httpx.Client, llm: ScriptedLLM) -> dict[str, Any]:
    llm.script(fenced(ANALYSIS))
    r = client.post(
        "/run",
        data={"prompt": "sum sales.csv by month, save and plot it"},
        files=[("files", ("sales.csv", SALES, "text/csv"))],
    )
    assert r.status_code == 200
    result = r.json()
    assert result["status"] == "success", result["error"]
    return result


def rerun(path: Path) -> nbformat.NotebookNode:
    """Run All, as JupyterLab does it: the kernel starts in the notebook's own folder."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )


def links(nb: nbformat.NotebookNode) -> list[str]:
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return [part.split(")")[0] for part in text.split("](")[1:]]


def test_a_run_given_a_file_re_runs_from_its_notebooks_folder(
    client: httpx.Client, llm: ScriptedLLM
) -> None:
    result = analyse(client, llm)
    notebook = Path(result["notebook"])
    replayed = rerun(notebook)
    assert "2024-01      150" in printed(replayed)
    # It read and wrote in the folder beside the notebook, as the run did in its own directory.
    folder = notebook.with_name(notebook.stem + "_files")
    assert (folder / "sales.csv").read_bytes() == SALES
    assert {"sales.csv", "summary.csv", "revenue.png"} <= set(os.listdir(folder))
    assert (folder / "summary.csv").read_text().splitlines()[1] == "2024-01,150"
    assert not (notebook.parent / "summary.csv").exists()
    # Its links work from where the notebook is, never through the API's root-relative URLs.
    saved = nbformat.read(notebook, as_version=4)
    assert links(saved) and all(not link.startswith("/") for link in links(saved))
    for link in links(saved):
        assert (notebook.parent / unquote(link)).is_file(), link
    # What the API serves is the run's own copy.
    served = client.get(f"/runs/{result['run_id']}/files/summary.csv")
    assert served.status_code == 200 and served.text.splitlines()[1] == "2024-01,150"


def test_the_bundle_unpacks_anywhere_into_a_notebook_that_re_runs(
    client: httpx.Client, llm: ScriptedLLM, tmp_path: Path
) -> None:
    result = analyse(client, llm)
    r = client.get(f"/runs/{result['run_id']}/bundle")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    stem = Path(result["notebook"]).stem
    assert r.headers["content-disposition"] == f'attachment; filename="{stem}.zip"'
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == sorted(
            [
                f"{stem}.ipynb",
                f"{stem}_files/sales.csv",
                f"{stem}_files/summary.csv",
                f"{stem}_files/revenue.png",
            ]
        )
        z.extractall(tmp_path / "elsewhere")
    replayed = rerun(tmp_path / "elsewhere" / f"{stem}.ipynb")
    assert "2024-03       30" in printed(replayed)


def test_the_bundle_leaves_out_links_the_code_left(
    client: httpx.Client, llm: ScriptedLLM, tmp_path: Path
) -> None:
    llm.script(
        fenced(
            "import os\n"
            "open('kept.txt', 'w').write('mine')\n"
            "os.symlink('/etc/passwd', 'passwd')\n"
            "os.mkdir('inner')\n"
            "open('inner/deep.txt', 'w').write('deep')\n"
            "os.symlink('/etc', 'etc')\n"
        )
    )
    result = client.post("/run", json={"prompt": "leave some links"}).json()
    assert result["status"] == "success", result["error"]
    with zipfile.ZipFile(io.BytesIO(client.get(f"/runs/{result['run_id']}/bundle").content)) as z:
        names = {n.split("/", 1)[1] for n in z.namelist() if "/" in n}
        assert names == {"kept.txt", "inner/deep.txt"}
        assert all(b"root:" not in z.read(n) for n in z.namelist())


def test_a_session_given_a_file_re_runs_from_its_notebooks_folder(
    client: httpx.Client, llm: ScriptedLLM
) -> None:
    created = client.post(
        "/sessions", files=[("files", ("sales.csv", SALES, "text/csv"))], data={}
    ).json()
    sid = created["session_id"]
    try:
        llm.script(fenced(LOAD), fenced(TOTAL))
        for prompt in ("load sales.csv into df", "print the total revenue"):
            r = client.post(f"/sessions/{sid}/run", json={"prompt": prompt})
            assert r.json()["status"] == "success", r.json()["error"]
    finally:
        client.delete(f"/sessions/{sid}")
    notebook = Path(created["notebook"])
    assert printed(rerun(notebook)) == "4 rows\ntotal 250\n"
    assert (notebook.with_name(f"{sid}_files") / "sales.csv").read_bytes() == SALES


def test_no_bundle_for_an_unknown_run(client: httpx.Client) -> None:
    r = client.get("/runs/20990101-000000-abcdef/bundle")
    assert r.status_code == 404 and "no run" in r.json()["detail"]


def test_files_under_a_run_are_opened_without_following_links(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("a")
    (tmp_path / "real" / "sub").mkdir()
    (tmp_path / "real" / "sub" / "b.txt").write_text("b")
    (tmp_path / "real" / "link.txt").symlink_to(tmp_path / "real" / "a.txt")
    (tmp_path / "real" / "linked").symlink_to(tmp_path / "real" / "sub")
    os.mkfifo(tmp_path / "real" / "pipe")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert files.names_beneath(tmp_path / "real") == ["a.txt", "sub/b.txt"]
    for name in ("link.txt", "linked/b.txt", "pipe", "../real/a.txt", "sub/../a.txt"):
        assert files.open_beneath(tmp_path / "real", name) is None, name
    assert files.open_beneath(tmp_path / "alias", "a.txt") is None
    assert files.names_beneath(tmp_path / "alias") == []
    opened = files.open_beneath(tmp_path / "real", "sub/b.txt")
    assert opened is not None
    with opened:
        assert opened.read() == b"b"
