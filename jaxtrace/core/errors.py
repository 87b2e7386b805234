"""Errors in one line: what the command line prints, and what the messages that wrap a library's error quote.

A leaf module (it imports nothing from the package), so that every layer can use it."""

from __future__ import annotations

# Errors whose first line already says what went wrong (the package raises these with a full message).
EXPECTED = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, MemoryError, RuntimeError)


def first_line(error: BaseException) -> str:
    """The first line of the error's message ("" when it has none)."""
    return (str(error).strip().splitlines() or [""])[0]


def typed_line(error: BaseException, limit: int = 200) -> str:
    """`Type: first line` (cut to `limit` characters), or only the type's name when the message is empty: a
    library's error, whose message alone may not say what kind of failure it was."""
    first = first_line(error)
    return f"{type(error).__name__}: {first[:limit]}" if first else type(error).__name__


def one_line(error: BaseException) -> str:
    """One line saying what went wrong: the message of an error we raise, or a summary of a library's."""
    first = first_line(error)
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or first}"
    if first and (isinstance(error, EXPECTED) or type(error).__module__.startswith("jaxtrace")):
        return first
    return typed_line(error, 300)

