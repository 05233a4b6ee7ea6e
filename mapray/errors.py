"""The error a user sees as one line: a bad config, a missing path, an unreadable input, an unwritable output.

Raised before Ray starts or any model loads wherever the problem can be known then; the CLI prints it as
`mapray: error: <message>` and exits 2, the Python API raises it as it is.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key or path."""

    def __init__(self, message: str = ""):
        # one line whatever it quotes (a path or value with a line break in it): the CLI prints one line
        super().__init__("\\n".join(str(message).splitlines()))


class ChurnExceeded(ConfigError):
    """A run's selection changed more than its `diff.max_churn` allows: its results stay unpublished (the CLI
    exits 3, so a scheduler tells it from a bad config)."""


def first_line(e: object) -> str:
    """The first line of an error's text (libraries put the useful part there), stripped; an exception without
    text gives its type's name."""
    lines = str(e).strip().splitlines()
    if lines:
        return lines[0].strip()
    return type(e).__name__ if isinstance(e, BaseException) else ""
