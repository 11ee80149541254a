"""The run store: records are canonical, the index is a cache that survives damage and distrust."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from autocoder.notebook import record_path, write_record
from autocoder.records import Attempt, ErrorKind, RunResult
from autocoder.store.sqlite import SqliteStore


def a_run(run_id: str, started_at: str = "2026-12-02T10:00:00+00:00") -> RunResult:
    failed = Attempt(
        number=1,
        status="error",
        code="while True: pass\n",
        reply="```python\nwhile True: pass\n```",
        error_kind=ErrorKind.TIMEOUT,
        error="stopped after 5 s (timeout)",
        tokens=12,
        model="scripted",
        duration=5.1,
    )
    ok = Attempt(number=2, status="success", code="print(2)\n", output="2\n", tokens=7, model="m")
    return RunResult(
        status="success",
        filename="",
        code=ok.code,
        output=ok.output,
        error="",
        run_id=run_id,
        prompt="print two",
        model="scripted",
        attempts=[failed, ok],
        started_at=started_at,
        duration=5.3,
    )


def test_an_index_rebuilt_from_scratch_recovers_every_field(tmp_path: Path) -> None:
    runs = [a_run(f"20261202-10000{i}-abc", f"2026-12-02T10:00:0{i}+00:00") for i in range(3)]
    for run in runs:
        write_record(run, tmp_path)
    store = SqliteStore(tmp_path)
    store.open()
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store.path}{suffix}").unlink(missing_ok=True)
    store.open()
    try:
        page, total = store.list(limit=10)
        assert total == 3 and [r.run_id for r in page] == [r.run_id for r in reversed(runs)]
        for run in runs:
            assert store.get(run.run_id) == run
    finally:
        store.close()
    assert (record_path(tmp_path, runs[0].run_id).stat().st_mode & 0o222) == 0  # read-only


def test_a_corrupt_page_behind_an_intact_header_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = a_run("20261202-100000-abc")
    write_record(run, tmp_path)
    store = SqliteStore(tmp_path)
    store.open()
    with store._lock:
        store.db.executescript(
            "CREATE TABLE filler (x); "
            + "".join("INSERT INTO filler VALUES (randomblob(900));" for _ in range(50))
        )
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    raw = bytearray(store.path.read_bytes())
    page = 4096
    assert raw[:16] == b"SQLite format 3\x00" and len(raw) > 3 * page
    raw[2 * page : 3 * page] = b"\xff" * page  # header intact, one page garbage
    store.path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        store.open()
    assert "rebuilding it from the records" in caplog.text
    try:
        assert store.get(run.run_id) == run
        assert store.list(limit=10)[1] == 1
    finally:
        store.close()


def test_the_index_keys_by_file_name_and_skips_symlinks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = tmp_path / ".autocoder" / "records"
    records.mkdir(parents=True)
    liar = a_run("20261202-100000-abc").model_dump(mode="json")
    liar["run_id"] = "../../etc/passwd"
    (records / "20261202-100000-abc.json").write_text(json.dumps(liar))
    secret = tmp_path / "secret.txt"
    secret.write_text("top-secret-content")
    (records / "20261202-100001-abc.json").symlink_to(secret)
    (records / "20261202-100002-abc.json").write_text("not json: top-secret-content")
    store = SqliteStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        store.open()
    try:
        assert store.list(limit=10) == ([], 0)
        assert store.get("20261202-100001-abc") is None
    finally:
        store.close()
    assert "top-secret-content" not in caplog.text and "etc/passwd" not in caplog.text


def test_records_respect_the_umask(tmp_path: Path) -> None:
    from autocoder.notebook import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_runs_from_before_records_existed_are_imported_once_from_the_old_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier autocoder kept whole records only in `<notebooks>/runs.sqlite`."""
    import sqlite3

    runs = [a_run(f"20261201-09000{i}-old", f"2026-12-01T09:00:0{i}+00:00") for i in range(2)]
    legacy = tmp_path / "runs.sqlite"
    db = sqlite3.connect(legacy)
    db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
    rows = [(r.run_id, r.model_dump_json()) for r in runs]
    rows += [("../../etc/passwd", runs[0].model_dump_json()), ("20261201-090009-bad", "{")]
    db.executemany("INSERT INTO runs VALUES (?, ?)", rows)
    db.commit()
    db.close()

    store = SqliteStore(tmp_path)
    with caplog.at_level(logging.INFO, logger="autocoder.store"):
        store.open()
    try:
        page, total = store.list(limit=10)
        assert total == 2 and {r.run_id for r in page} == {r.run_id for r in runs}
        for run in runs:
            assert store.get(run.run_id) == run
    finally:
        store.close()
    # The old index left the folder the user browses; the records are canonical from now on.
    assert not legacy.exists()
    assert (tmp_path / ".autocoder" / "legacy" / "runs.sqlite").is_file()
    assert "20261201-090009-bad" in caplog.text
    store.open()
    try:
        assert store.list(limit=10)[1] == 2
    finally:
        store.close()


def test_an_unreadable_old_index_is_moved_aside_and_the_store_opens(tmp_path: Path) -> None:
    (tmp_path / "runs.sqlite").write_bytes(b"not a database at all" * 100)
    store = SqliteStore(tmp_path)
    store.open()
    try:
        assert store.list(limit=10) == ([], 0)
    finally:
        store.close()
    assert not (tmp_path / "runs.sqlite").exists()


def test_filtered_list_pages_read_an_index_not_the_records(tmp_path: Path) -> None:
    """A status or a prompt search scans a covering index: no row's whole record is read."""
    store = SqliteStore(tmp_path)
    store.open()
    try:
        for where in ("status = 'error'", "prompt LIKE '%sine%'"):
            for what in ("count(*)", "run_id, started_at, status, prompt, model, duration"):
                plan = store.db.execute(
                    f"EXPLAIN QUERY PLAN SELECT {what} FROM runs WHERE {where} "
                    "ORDER BY started_at DESC, nb_mtime DESC, run_id DESC"
                ).fetchall()
                assert "COVERING INDEX" in str(plan), (where, what, plan)
    finally:
        store.close()
