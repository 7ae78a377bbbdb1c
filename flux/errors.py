"""Errors that are the caller's to fix or that name what went wrong, never a stack trace."""


class InputError(ValueError):
    """The request cannot be served as given (bad image, prompt, or setting); the message says why."""


class EditError(RuntimeError):
    """The edit ran but could not produce a trustworthy image (numerical failure, out of memory, flagged)."""
