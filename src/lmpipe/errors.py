"""One exception hierarchy for the whole project.

User errors (bad config, bad input data, missing files) derive from :class:`LmpipeError` and carry
enough context (file, line, key) to be fixed without a traceback. The CLI prints them as one line
and exits 2; anything else is an internal error (exit 1).
"""

from __future__ import annotations


class LmpipeError(Exception):
    """Base class for errors the user can fix. ``str(err)`` is the one line the CLI prints."""


class ConfigError(LmpipeError):
    """params.yaml (or an override) has an unknown key, a wrong type or an impossible value."""


class DataError(LmpipeError):
    """Input data is missing, malformed or does not match the expected schema."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line


class EngineError(LmpipeError):
    """The compute engine failed a stage: a Ray task lost its worker or node more often than Ray
    retries it. The stage's outputs are left as they were."""


class ChecksumError(DataError):
    """A downloaded file does not match its expected sha256."""


class ValidationFailed(LmpipeError):
    """A Great Expectations suite failed; the message summarises which expectations."""


class FingerprintMismatch(LmpipeError):
    """Token shards or a model were produced with a different tokenizer than the one given."""
