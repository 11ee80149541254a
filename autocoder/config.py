"""One typed settings object, read once from the environment (and flags)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from autocoder.errors import ConfigError

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"


class Settings(BaseSettings):
    """Everything autocoder can be told. Env vars are `AUTOCODER_<NAME>` except the OpenAI ones."""

    # No deadline or limit may be inf (none at all) or nan (which slips past every bound).
    model_config = SettingsConfigDict(
        env_prefix="AUTOCODER_", extra="ignore", populate_by_name=True, allow_inf_nan=False
    )

    # The model endpoint.
    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    model: str | None = None
    llm_timeout: float = Field(120.0, gt=0, description="Seconds one model request may take.")
    llm_retries: int = Field(
        2, ge=0, le=10, description="Transport retries on 429/5xx/connection errors."
    )
    max_tokens: int = Field(1024, gt=0)
    retry_policy: Literal["auto", "conversation", "regenerate", "reconsider", "review"] = "auto"

    # The run loop.
    timeout: float = Field(10.0, gt=0, description="Seconds one attempt's code may run.")
    max_attempts: int = Field(5, ge=1, le=50)
    candidates: int = Field(
        0,
        ge=0,
        le=16,
        description="Programs drawn per attempt, each run in a fresh kernel; the answer is "
        "the result most of them agree on (see candidates.py). 0: 5 for the embedded model "
        "(2 first, more only when those disagree), 1 for a model endpoint.",
    )
    max_output_bytes: int = Field(1_000_000, ge=1024, description="Output kept per attempt.")
    notebooks_dir: Path = Path("notebooks")
    autofile_dir: Path = Path("autofile")

    max_upload_mb: int = Field(
        25, ge=1, description="Megabytes one input file, and all of a run's together, may have."
    )
    max_files: int = Field(10, ge=0, description="Input files one run may be given.")
    kernel_python: Path | None = Field(
        None, description="Another interpreter (with ipykernel) to run the kernels with."
    )
    languages: str = Field(
        "all",
        description="The languages offered besides Python, comma-separated "
        "(bash,javascript,typescript,r), or `all` of those whose kernels are installed.",
    )

    kernel_start: Literal["fork", "exec"] = Field(
        "fork",
        description="fork: kernels forked from a zygote that has imported ipykernel (fast; "
        "needs a root server and the bwrap sandbox, else exec); exec: a new process per kernel.",
    )

    magic_record: bool = Field(
        default=False,
        description="Record %autocoder runs as notebooks (the CLI and API always do).",
    )

    # The sandbox.
    sandbox: Literal["bwrap", "none"] = "bwrap"
    # The upper bounds keep every limit within what setrlimit and bwrap can take (64 bits).
    memory_mb: int = Field(1024, ge=64, le=1 << 30)
    cpu_seconds: int = Field(
        300, ge=1, le=1 << 40, description="CPU time a kernel may use over its life."
    )
    max_processes: int = Field(64, ge=4, le=1 << 30)
    max_open_files: int = Field(256, ge=32, le=1 << 30)
    max_file_mb: int = Field(256, ge=1, le=1 << 30)
    max_run_disk_mb: int = Field(
        512,
        ge=0,
        le=1 << 30,
        description="Megabytes a run's (or a session's) working directory may hold: a "
        "size-capped tmpfs, so what the code writes there counts against its memory too; "
        "0: no cap (see docs/security.md).",
    )
    allow_network: bool = False

    # Remote kernels: every run's kernel from a Jupyter Kernel or Enterprise Gateway.
    gateway_url: str | None = Field(
        None,
        description="Base URL of a Jupyter Kernel/Enterprise Gateway (http://host:8888) that "
        "starts the kernels instead of this host.",
    )
    gateway_token: SecretStr | None = Field(
        None, description="The gateway's token (its KG_AUTH_TOKEN / EG_AUTH_TOKEN)."
    )
    gateway_kernel: str = Field(
        "autocoder-sandbox", min_length=1, description="The kernelspec the gateway starts."
    )

    @field_validator("gateway_url", mode="after")
    @classmethod
    def _gateway_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    # The service.
    host: str = "127.0.0.1"
    port: int = Field(5005, ge=0, le=65535)
    api_token: SecretStr | None = None
    allowed_hosts: str = Field(
        "",
        description="Comma-separated names clients may reach the server by (Host header) "
        "besides loopback and AUTOCODER_HOST; '*' for any.",
    )
    pool_size: int = Field(2, ge=0, le=64)
    max_concurrent_runs: int = Field(4, ge=1, le=256)
    max_queued_runs: int = Field(16, ge=0)
    max_prompt_chars: int = Field(20_000, ge=1)
    max_code_chars: int = Field(
        200_000, ge=1, description="The longest code `POST /execute` takes, in characters."
    )
    max_request_attempts: int = Field(10, ge=1)
    max_request_timeout: float = Field(120.0, gt=0)
    max_request_candidates: int = Field(
        8, ge=1, le=16, description="The most candidates one request may ask for."
    )
    queue_timeout: float = Field(
        60.0, gt=0, description="Seconds a request may wait for a run slot before it gets 503."
    )
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a client may take to send a request's headers."
    )
    body_timeout: float = Field(
        60.0, gt=0, le=3600, description="Seconds a client may take to send a request's body."
    )
    shutdown_grace: float = Field(
        10.0, ge=0, description="Seconds running requests get to finish at shutdown."
    )
    max_sessions: int = Field(
        8, ge=0, le=1024, description="Sessions (each one kernel kept started) open at once."
    )
    session_idle_timeout: float = Field(
        900.0, gt=0, description="Seconds a session may sit unused before it is closed."
    )
    session_max_age: float = Field(
        4 * 3600.0, gt=0, description="Seconds a session may live, used or not."
    )
    # The run store: SQLite next to the notebooks unless a PostgreSQL URL is given, which
    # every replica of the service shares (see docs/scale.md).
    database_url: SecretStr | None = Field(
        None, description="postgresql://... to keep the run store in PostgreSQL."
    )
    replica_lease: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="Seconds a replica's heartbeat stays valid; after that its running runs "
        "are marked interrupted by whichever replica notices (PostgreSQL store only).",
    )
    database_file_mb: int = Field(
        25,
        ge=0,
        le=1024,
        description="Megabytes a produced file may have to be copied into PostgreSQL; larger "
        "ones are served only by the replica that ran the code.",
    )
    session_context_chars: int = Field(
        6000,
        ge=500,
        description="Characters of what a session holds (earlier prompts and code, names, "
        "files) told to the model with each prompt.",
    )

    # The embedded model.
    home: Path = Path("~/.cache/autocoder")
    # The 1.5B: on the task benchmark it was right three times as often as the 0.5B and gave
    # half its confident wrong answers, at about three times its time (README, docs/quality.md).
    local_model: Literal["0.5b", "1.5b"] = "1.5b"
    model_path: Path | None = None
    local_n_ctx: int = Field(
        4096, ge=512, le=32768, description="Context tokens of the embedded model."
    )
    local_threads: int = Field(
        0,
        ge=0,
        description="CPU threads for the embedded model; 0: each step takes one or all we may "
        "use, whichever its steps show faster.",
    )
    local_slots: int = Field(
        8,
        ge=1,
        le=64,
        description="Sequences the embedded model generates together (candidates of a run, "
        "several users); more wait their turn.",
    )
    model_keep_alive: float = Field(
        300.0,
        ge=0,
        le=86400,
        description="Seconds the embedded model's server stays up with nothing using it, shared "
        "by every autocoder process with this AUTOCODER_HOME; 0: each process starts its own "
        "and stops it when it ends.",
    )

    @field_validator("home", "notebooks_dir", "autofile_dir", "model_path", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @field_validator("*", mode="after")
    @classmethod
    def _utf8(cls, v: Any) -> Any:
        """Python hands over argv and the environment with bytes that are not UTF-8 kept as
        lone surrogates, which no request, header or record can carry."""
        text = v.get_secret_value() if isinstance(v, SecretStr) else v
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid UTF-8") from None
        return v

    @property
    def api_key(self) -> str | None:
        return self.openai_api_key.get_secret_value() if self.openai_api_key else None

    @property
    def uses_remote_endpoint(self) -> bool:
        """A configured endpoint wins; otherwise the embedded model answers."""
        return bool(self.openai_base_url or self.openai_api_key)


def without_credentials(url: str) -> str:
    """A URL as messages and shared records may name it: no user, password or token."""
    parts = urlparse(url)
    host = parts.hostname or ""
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; flags given as overrides win (None means 'not given')."""
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given)


def prepare_dirs(settings: Settings) -> None:
    """Create the directories runs are saved in and check that each can be written to, so a
    bad one is one clear ConfigError before anything runs, not a failure after the code ran."""
    writable_dir(settings.notebooks_dir, "notebooks", "AUTOCODER_NOTEBOOKS_DIR")
    writable_dir(settings.autofile_dir, "code files", "AUTOCODER_AUTOFILE_DIR")
    if not settings.uses_remote_endpoint:
        writable_dir(settings.home, "embedded model", "AUTOCODER_HOME")


def writable_dir(path: Path, what: str, name: str) -> None:
    """Make `path` a directory we can write to, or ConfigError naming it and the setting."""
    where = f"cannot keep the {what} in {str(path)!r} ({name})"
    try:
        # Run records are JSON, which cannot carry a path Python only decoded with escapes.
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: the path is not valid UTF-8") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Permission bits say nothing to root or about a read-only mount: try a real write.
        fd, probe = tempfile.mkstemp(prefix=".autocoder-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise ConfigError(f"{where}: it exists and is not a directory") from None
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise ConfigError(f"{where}: {str(blocker)!r} is a file, not a directory") from None
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror or e}") from None
