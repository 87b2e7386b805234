"""Files written atomically: a temporary file in the same folder, then a rename, so a reader (or a killed writer)
never sees half a file. Every writer of the package goes through these."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed onto `path` when the block succeeds, removed otherwise.
    An OSError (a missing or read-only folder, a full disk) is raised again naming `path`, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot be written: {path.parent} is not a folder", str(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename in (None, tmp, str(tmp)):
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(payload, indent=indent))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """A JSON file's value, or a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid {what} ({error})") from None
