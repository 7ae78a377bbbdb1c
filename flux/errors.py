"""Errors that name what went wrong, written for people, never a stack trace. Three kinds, by who
must act: the caller (InputError), nobody in particular for this edit (EditError), the operator
(SetupError).

The Cog server (coglet) shows a failed prediction's error as "<the exception's qualified name>:
<its message>" after a prefix of its own ("Prediction failed: Prediction failed: "), and a failed
setup the same way. So each class's qualified name is the words a caller or an operator reads
there ("Invalid input: input_image format BMP is not supported; ..."), not a Python name.
"""

from __future__ import annotations


class InputError(ValueError):
    """The request cannot be served as given (bad image, prompt, or value); the message says why.
    ``field``: the request input it is about, where there is one (the command line names its flag)."""

    __qualname__ = "Invalid input"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EditError(RuntimeError):
    """The edit ran but could not produce a trustworthy image (numerical failure, out of memory, flagged)."""

    __qualname__ = "Edit failed"


class SetupError(RuntimeError):
    """The server is set up wrong: a setting's value, the weights, or what this machine has. The
    operator must act; no request can fix it."""

    __qualname__ = "Setup error"
