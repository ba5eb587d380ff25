"""Errors a user can fix: shown as one line, without a traceback."""

from __future__ import annotations


class UsageError(Exception):
    """A bad command line or a bad layer set-up; the message says what and which path."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
