"""The user cache folder (`$JAXTRACE_CACHE`, else `$XDG_CACHE_HOME/jaxtrace`, else `~/.cache/jaxtrace`) and file
digests kept there, so a large checkpoint is hashed once.

A remembered digest is keyed by the file's path, size, mtime, inode and ctime: a file whose bytes were replaced
keeps none of them by accident, and its ctime cannot be set back (`cp -p`, `rsync -t` and `tar` restore the mtime,
and writing in place keeps the inode and size, but every change of a file sets its ctime to the present)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

from jaxtrace.io.files import write_json

log = logging.getLogger("jaxtrace")


def cache_dir() -> Path:
    root = os.environ.get("JAXTRACE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                    "jaxtrace")
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: list[Path]) -> str:
    """SHA-256 over the SHA-256s of `paths` (in order), each computed once per version of the file (path, size,
    mtime, inode, ctime) and remembered in the cache folder."""
    digest = hashlib.sha256()
    for file_digest in _file_digests(paths):
        digest.update(file_digest.encode())
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """The SHA-256 of a file, computed once per version of the file and remembered in the cache folder."""
    return _file_digests([path])[0]


def remember_sha256(path: Path, digest: str) -> None:
    """Record the SHA-256 of a file just written (so that `cached_sha256` need not hash it again)."""
    index = _read_index()
    _remember(index, _key(Path(path)), digest)
    _write_index(index)


def _key(path: Path) -> str:
    """The file's version: path, size, mtime, inode and ctime (which no copy or archive tool can set)."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}"


def _remember(index: dict, key: str, digest: str) -> None:
    """Record a file version's digest, forgetting the file's other versions."""
    path = key.rsplit(":", 4)[0]
    for old in [k for k in index if k.rsplit(":", 4)[0] == path]:
        del index[old]
    index[key] = digest


def _read_index() -> dict:
    try:
        index = json.loads((cache_dir() / "digests.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _write_index(index: dict) -> None:
    index_path = cache_dir() / "digests.json"
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(index_path, index, indent=None)
    except OSError:
        pass  # a read-only cache only costs hashing again


def _file_digests(paths: list[Path]) -> list[str]:
    index = _read_index()
    digests, changed = [], False
    for path in paths:
        key = _key(Path(path))
        if key not in index:
            _remember(index, key, sha256_file(Path(path)))
            changed = True
        digests.append(index[key])
    if changed:
        _write_index(index)
    return digests


def enable_compilation_cache(folder: Path | None = None, min_seconds: float = 0.5) -> Path | None:
    """Keep XLA's compiled programs that took at least `min_seconds` to compile in `folder` (default: the cache
    folder's `compile/`) with JAX's persistent compilation cache, so that a second identical run loads them instead
    of compiling them again. Takes effect for a process's compilations from the first one on: call it before any.

    A folder that cannot be written is not used (None; one line says so, and every program is compiled anew). JAX
    warns twice a line for every entry it cannot read (a damaged file: the program is compiled again, the entry is
    never replaced) or write; those warnings become one line per process naming the folder."""
    import jax

    folder = Path(folder or cache_dir() / "compile")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        log.warning(f"compiled-program cache {folder} cannot be written ({error.strerror or error}): every program "
                    "is compiled anew (--no-compile-cache says the same without this line)")
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    previous = warnings.showwarning
    if isinstance(previous, functools.partial) and previous.func is _one_line_cache_warnings:
        previous = previous.keywords["previous"]  # enabled again in this process: replaced, not stacked
    warnings.showwarning = functools.partial(_one_line_cache_warnings, folder=folder, said=set(), previous=previous)
    return folder


_CACHE_WARNINGS = {"Error reading persistent compilation cache entry": "cannot be read",
                   "Error writing persistent compilation cache entry": "cannot be written"}


def _one_line_cache_warnings(message, category, filename, lineno, file=None, line=None, *, folder: Path,
                             said: set, previous):
    """`warnings.showwarning` for JAX's compilation-cache warnings: one line per kind and process, the rest as
    `previous` shows them."""
    text = str(message)
    kind = next((words for start, words in _CACHE_WARNINGS.items() if text.startswith(start)), None)
    if kind is None:
        return previous(message, category, filename, lineno, file, line)
    if kind not in said:
        said.add(kind)
        reason = text.split(": ", 1)[-1]
        log.warning(f"compiled-program cache {folder}: an entry {kind} ({reason}); its program was compiled "
                    f"again (remove {folder} to rebuild the cache)")
