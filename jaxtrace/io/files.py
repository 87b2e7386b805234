"""Files written atomically: a temporary file in the same folder, then a rename, so a reader (or a killed writer)
never sees half a file. Every writer of the package goes through these. A file gets the permissions any other new
file of the user gets (0666 less the umask), not a temporary file's private 0600."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import secrets
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
        tmp = _new_file(path)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename in (None, tmp, str(tmp)):
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


def _new_file(path: Path) -> str:
    """A new empty file next to `path` with a name no other writer uses, created as `open` would create it
    (mode 0666 less the umask; `tempfile.mkstemp` makes it 0600, which a rename would keep)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


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
