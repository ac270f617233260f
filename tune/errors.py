"""The error a search raises when it cannot start or resume as asked."""


class SearchError(RuntimeError):
    """The search cannot start or resume as asked; the message says what to change."""
