"""Errors that name what went wrong, written for people, never a stack trace. Three kinds, by who
must act: the caller (InputError), nobody in particular for this edit (EditError), the operator
(SetupError)."""

from __future__ import annotations


class InputError(ValueError):
    """The request cannot be served as given (bad image, prompt, or value); the message says why.
    ``field``: the request input it is about, where there is one (the command line names its flag)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EditError(RuntimeError):
    """The edit ran but could not produce a trustworthy image (numerical failure, out of memory, flagged)."""


class SetupError(RuntimeError):
    """The server is set up wrong: a setting's value, the weights, or what this machine has. The
    operator must act; no request can fix it."""
