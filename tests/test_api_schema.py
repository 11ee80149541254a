"""The OpenAPI document tells the truth: schemathesis, against the real server, with and
without a token, with every check, on every operation (`/run`, `/execute` and their streams
included). Runs it starts end at once: the scripted model answers immediately with code that
prints, code sent to `/execute` is short, and the server's limits keep attempts and timeouts
short."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer
from tests.test_api import make_settings

pytestmark = pytest.mark.timeout(120)
TOKEN = "schema-test-token"


class AnyModel(list[str]):
    """The scripted endpoint serves whatever model a generated request names."""

    def __contains__(self, name: object) -> bool:
        return True


@pytest.fixture(scope="module", params=["open", "token"])
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    llm_server: ScriptedLLM,
) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    llm_server.script()
    llm_server.responder = lambda body: fenced("print('ok')")
    served_models = llm_server.models
    llm_server.models = AnyModel(served_models)
    token = request.param == "token"
    config = make_settings(
        tmp_path_factory.mktemp("schema"),
        llm_server,
        pool_size=1,
        max_concurrent_runs=4,
        max_queued_runs=32,
        max_prompt_chars=200,
        max_code_chars=200,  # POST /execute runs what it is sent, as it is
        max_request_attempts=2,
        max_request_timeout=2.0,
        timeout=2.0,
        max_sessions=2,  # each session keeps a kernel started
        languages="python",  # the others' kernels start on demand: tests/test_languages.py
        api_token=TOKEN if token else None,
    )
    try:
        with LiveServer(config) as live:
            yield live, ({"Authorization": f"Bearer {TOKEN}"} if token else {})
    finally:
        llm_server.responder = None
        llm_server.models = served_models


@pytest.fixture(scope="module")
def api_schema(served: tuple[LiveServer, dict[str, str]]) -> Any:
    live, headers = served
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", headers=headers)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=True,  # the same examples every run: CI is not where to discover new ones
)
def test_every_operation_keeps_its_documented_promises(
    case: Any, served: tuple[LiveServer, dict[str, str]]
) -> None:
    case.call_and_validate(headers=served[1], excluded_checks=same_name_files(case))


def same_name_files(case: Any) -> list[Any]:
    """A form cannot say that its files' names differ, and schemathesis names every part of
    `files` alike: the server rightly refuses two files of one name (422), so a form with
    several files is not held to "valid data is accepted"."""
    body = case.body if isinstance(case.body, dict) else {}
    files = body.get("files")
    if case.media_type == "multipart/form-data" and isinstance(files, list) and len(files) > 1:
        return [schemathesis.checks.positive_data_acceptance]
    return []
