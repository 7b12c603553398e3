"""Errors retrieval raises; each message is written for the person using the app."""


class RetrievalError(Exception):
    """Base class: the message is safe and clear enough to show a user as is."""


class IngestError(RetrievalError):
    """A file could not be read or indexed; nothing already indexed was changed."""


class EmptyIndexError(RetrievalError):
    """A question was asked with no documents indexed."""


class ContextTooLongError(RetrievalError):
    """The documents do not fit in the target model's context window (never cut silently)."""
