"""Model files that pip packages ship: one file inside a package, or a file split over chunk packages, assembled
once into the user cache folder (`jaxtrace.io.cache.cache_dir() / "models"`). Packages are found, not imported."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from jaxtrace.io.cache import cache_dir, cached_sha256


@dataclasses.dataclass(frozen=True)
class ChunkedFile:
    """A file stored as chunks, each a data file of its own package (`chunks`: (package, path inside it), in
    order), whose concatenation has SHA-256 `sha256`; `install` is the pip command that installs the packages."""

    name: str
    sha256: str
    chunks: tuple[tuple[str, str], ...]
    install: str


def package_dir(package: str, install: str | None = None) -> Path:
    """The folder of an installed package, found without importing it (its imports may be unavailable)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = install or f"pip install --no-deps {package.replace('_', '-')}"
        raise FileNotFoundError(f"package {package!r} is not installed ({install})")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(package: str, name: str, install: str | None = None) -> Path:
    """A data file inside an installed package."""
    path = package_dir(package, install) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed package {package!r}")
    return path


def assembled_file(file: ChunkedFile) -> Path:
    """`file` in the cache folder's `models/`, assembled from its chunks on first use (into a temporary file, renamed
    once its SHA-256 is right); later calls check its size and (cached, `jaxtrace.io.cache`) SHA-256."""
    chunks = [packaged_file(package, name, file.install) for package, name in file.chunks]
    size = sum(chunk.stat().st_size for chunk in chunks)
    target = cache_dir() / "models" / file.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{file.name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as f:
                        while block := f.read(1 << 24):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != file.sha256:
                raise ValueError(f"{file.name} assembled from {', '.join(p for p, _ in file.chunks)} has SHA-256 "
                                 f"{digest.hexdigest()}, expected {file.sha256}: reinstall them ({file.install})")
            os.chmod(temporary, 0o644)  # mkstemp's file is private; a model file is not
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    elif target.stat().st_size != size or cached_sha256(target) != file.sha256:
        raise ValueError(f"{target} is not the expected {file.name} (wrong size or SHA-256): delete it to assemble "
                         "it again")
    return target
