"""The user cache folder (`$JAXTRACE_CACHE`, else `$XDG_CACHE_HOME/jaxtrace`, else `~/.cache/jaxtrace`) and file
digests kept there, so a large checkpoint is hashed once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jaxtrace.io.files import write_json


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
    """SHA-256 over the SHA-256s of `paths` (in order), each computed once per (path, size, mtime) and remembered
    in the cache folder."""
    digest = hashlib.sha256()
    for file_digest in _file_digests(paths):
        digest.update(file_digest.encode())
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """The SHA-256 of a file, computed once per (path, size, mtime) and remembered in the cache folder."""
    return _file_digests([path])[0]


def remember_sha256(path: Path, digest: str) -> None:
    """Record the SHA-256 of a file just written (so that `cached_sha256` need not hash it again)."""
    index = _read_index()
    index[_key(Path(path))] = digest
    _write_index(index)


def _key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


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
            index[key], changed = sha256_file(Path(path)), True
        digests.append(index[key])
    if changed:
        _write_index(index)
    return digests


def enable_compilation_cache(folder: Path | None = None, min_seconds: float = 0.5) -> Path:
    """Keep XLA's compiled programs that took at least `min_seconds` to compile in `folder` (default: the cache
    folder's `compile/`) with JAX's persistent compilation cache, so that a second identical run loads them instead
    of compiling them again. Takes effect for a process's compilations from the first one on: call it before any."""
    import jax

    folder = Path(folder or cache_dir() / "compile")
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
