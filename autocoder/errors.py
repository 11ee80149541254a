"""autocoder's own failures. Failures of generated code are data (see `runner.ErrorKind`), not these."""

from __future__ import annotations


class AutocoderError(Exception):
    """Root of every error autocoder raises about itself."""


class ConfigError(AutocoderError, ValueError):
    """A setting is wrong or missing; the message names the setting to fix."""


class LLMError(AutocoderError, ConnectionError):
    """The model endpoint could not give an answer (down, refusing, unknown model)."""


class KernelStartError(AutocoderError, RuntimeError):
    """A kernel could not be started (bad kernelspec, sandbox unavailable)."""


class SandboxUnavailable(KernelStartError):
    """The requested sandbox cannot run on this machine; the message says why and what to set."""


class StoreUnavailable(AutocoderError, ConnectionError):
    """The shared run store (PostgreSQL) cannot be reached or did not answer in time."""


class DiskFull(AutocoderError, OSError):
    """The disk holding the run records has no room for one more; the message names the directory."""


class APIError(AutocoderError):
    """A request to an autocoder server (`autocoder.client`) was refused or never answered.

    `status_code` is the HTTP status (None when the server could not be reached) and `detail`
    the server's own message, which says what to fix; `str()` has both, and the URL."""

    def __init__(self, message: str, *, status_code: int | None, detail: str, url: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail
        self.url = url
