"""Which exceptions are the user's to read: their message is shown as is, without a traceback."""

from __future__ import annotations

from app.registry import ModelNotAvailableError
from decoding.settings import SettingsError
from retrieval.errors import RetrievalError


class CliError(Exception):
    """A command-line mistake (missing file, no documents); printed as one line, exit status 1."""


class QuestionError(ValueError):
    """The question or its settings are not acceptable; the message is for the user."""


def user_message(error: BaseException) -> str | None:
    """The message to show for an expected failure, or None for a bug (which keeps its traceback)."""
    known = CliError | QuestionError | RetrievalError | ModelNotAvailableError | SettingsError
    return str(error) if isinstance(error, known) else None
