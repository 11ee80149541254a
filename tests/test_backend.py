"""Which model answers: a configured endpoint wins, otherwise the embedded one."""

from __future__ import annotations

from pathlib import Path

import pytest

from autocoder.config import DEFAULT_OPENAI_URL, load_settings
from autocoder.errors import ConfigError
from autocoder.llm import OpenAIChat, connect
from autocoder.prompts import Conversation, Reconsider, choose_policy


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "AUTOCODER_MODEL",
        "AUTOCODER_MODEL_PATH",
        "AUTOCODER_RETRY_POLICY",
    ):
        monkeypatch.delenv(name, raising=False)


async def test_a_base_url_picks_that_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("AUTOCODER_MODEL", "qwen2.5-coder")
    chat = await connect(load_settings())
    try:
        assert isinstance(chat, OpenAIChat)
        assert chat.backend == "openai"
        assert chat.base_url == "http://127.0.0.1:11434/v1"
        assert chat.model == "qwen2.5-coder"
    finally:
        await chat.close()


async def test_a_key_alone_means_openai_with_its_default_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    chat = await connect(load_settings())
    try:
        assert isinstance(chat, OpenAIChat)
        assert chat.base_url == DEFAULT_OPENAI_URL
        assert chat.model == "gpt-4o-mini"
    finally:
        await chat.close()


def test_nothing_configured_means_the_embedded_model() -> None:
    assert load_settings().uses_remote_endpoint is False


async def test_a_missing_own_gguf_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOCODER_MODEL_PATH", str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="AUTOCODER_MODEL_PATH"):
        await connect(load_settings(home=tmp_path))


def test_the_retry_policy_follows_the_backend_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(choose_policy(load_settings(), "openai"), Conversation)
    assert isinstance(choose_policy(load_settings(), "local"), Reconsider)
    monkeypatch.setenv("AUTOCODER_RETRY_POLICY", "conversation")
    assert isinstance(choose_policy(load_settings(), "local"), Conversation)
