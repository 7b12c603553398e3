"""Which exceptions are the user's to read: their message is shown as is, without a traceback."""

from __future__ import annotations


def user_message(error: BaseException) -> str | None:
    from app.cli import CliError
    from app.pipeline import QuestionError
    from app.registry import ModelNotAvailableError
    from decoding.settings import SettingsError
    from retrieval.errors import RetrievalError

    known = CliError | QuestionError | RetrievalError | ModelNotAvailableError | SettingsError
    return str(error) if isinstance(error, known) else None
