"""Result folders: one run per folder, held by one process at a time, knowing what run it holds, and finished only
when every result file is in place.

- A lock file (`.jaxtrace.lock`, holding the writer's host and pid) keeps a second process out while a run writes
  the folder; a lock left by a dead process on this host is taken over.
- `run.json` records the run's identity (model weights and config, task data and options, objective, search
  hyperparameters; see `jaxtrace.runs.identity`). A folder that holds a run is refused unless the run is resumed
  with the same identity (a mismatch names the field) or the user asks to `--overwrite` it. A folder that holds
  only a run's identity (a run that ended before its first checkpoint) holds the start of that run: the same run
  starts there afresh, resumed or not; another is refused. Resuming a folder that holds no run at all is refused.
- `--overwrite` replaces a run only once the new one has finished: the old run's files are set aside in
  `.replaced/` while the new run writes the folder, removed when it ends well and put back when it fails (an error
  or an interrupt). A run killed meanwhile leaves them there: the next run that ends well removes them, the next
  `--overwrite` that fails puts them back.
- Result files are written into `.staging/` and moved into place with the folder's `finished` file (e.g.
  `circuit.json`) last, after removing the old one (Orbax's collective writes go straight into place, atomic by
  themselves): a killed or failed write never leaves a folder that looks finished, and a finished folder always
  holds the files of one run. The old `finished` file is removed only once every file is staged, so a write that
  fails there (a full disk) leaves the folder as it was.
- Every failure to create or write the folder is one `ResultFolderError` line naming the folder or file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

import jax

from jaxtrace.core.errors import first_line
from jaxtrace.engine.mesh import is_writer
from jaxtrace.io.files import read_json, write_json

LOCK = ".jaxtrace.lock"
IDENTITY = "run.json"
STAGING = ".staging"
REPLACED = ".replaced"  # the files of the run an --overwrite replaces, until the new run has finished


class FolderBusyError(FileExistsError):
    """Another process holds the result folder."""


class ResultFolderError(OSError):
    """The result folder cannot be created or written (the message names it)."""


def check_out(path: str | Path) -> Path:
    """`path` (a run's `--out`), after checking that it is a folder or can be made one (neither it nor the nearest
    existing folder above it is a file) and, if it exists, that a file can be written in it. Cheap, so a command
    can check before it loads a model."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ResultFolderError(f"--out {path} is a file, not a folder")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ResultFolderError(f"--out {path}: {parent} is a file, not a folder")
            break
    if path.is_dir():  # a file can be made in it (root ignores permission bits, not a read-only file system)
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as error:
            raise ResultFolderError(f"--out {path}: cannot write to the folder ({error.strerror or error})") \
                from None
    return path


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def identity_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """"field: saved -> current" for every field where two identities differ. `defaults` (nested like `current`):
    a field the saved identity lacks (a setting newer than the run) is no difference where the current value is
    its default, which does what the run did before the setting existed."""
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    default = _flatten(json.loads(json.dumps(defaults or {})))
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not (key not in old and key in default and new[key] == default[key])]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultFolder:
    """The output folder of one run (use as a context manager: it holds the lock while open).

    `identity`: the run's identity (JSON-able dict); `finished`: the file whose presence means the run finished;
    `resume`: continue the run the folder holds (same identity); `overwrite`: discard whatever it holds;
    `resumable`: whether the kind of run can resume at all (for the refusal's advice); `defaults`: the identity's
    settings at their defaults (`identity_differences`). `with_results`: writers of files every `publish` adds to
    its own (e.g. the list of skipped data, `jaxtrace.runs.common.result_folder`).
    """

    def __init__(self, path: str | Path, identity: dict, finished: str = "circuit.json", resume: bool = False,
                 overwrite: bool = False, resumable: bool = True, defaults: dict | None = None):
        self.path, self.identity, self.finished, self.defaults = Path(path), identity, finished, defaults
        self.resume, self.overwrite, self.resumable = resume, overwrite, resumable
        self._locked = self._replacing = False
        self.with_results: dict[str, Callable[[Path], None]] = {}

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def has_checkpoints(self) -> bool:
        """Whether the folder holds saved progress: a finished epoch (an Orbax step folder, named by the epoch count)
        in `checkpoints/` or in a search's folder below it, or a finished method there (a comparison's `.npz`)."""
        if not self.checkpoints.is_dir():
            return False
        entries = [*self.checkpoints.iterdir(), *self.checkpoints.glob("*/*")]
        return any(p.name.isdigit() or p.suffix == ".npz" for p in entries)

    def holds_run(self) -> bool:
        """Whether the folder holds (part of) a run: its identity, checkpoints or a finished result."""
        return (self.path / IDENTITY).is_file() or (self.path / self.finished).exists() or self.has_checkpoints()

    def only_started(self) -> bool:
        """Whether the folder holds a run's identity and nothing more: no checkpoint, no finished result."""
        return (self.path / IDENTITY).is_file() and not (self.path / self.finished).exists() \
            and not self.has_checkpoints()

    def __enter__(self) -> ResultFolder:
        check_out(self.path)
        with self._writing("cannot create the folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path, os.W_OK):
            raise ResultFolderError(f"--out {self.path}: the folder is not writable")
        if is_writer():
            with self._writing("cannot write to the folder"):
                self._lock()
        try:
            self._check()
            _sync("jaxtrace-result-folder")
            if is_writer():
                with self._writing("cannot write to the folder"):
                    if self.overwrite:
                        self._set_aside()
                    write_json(self.path / IDENTITY, {"identity": self.identity})
        except BaseException:
            self._put_back()
            self._unlock()
            raise
        return self

    @contextlib.contextmanager
    def _writing(self, what: str):
        """A file system error of the block (a read-only or full disk) as one ResultFolderError naming --out."""
        try:
            yield
        except FolderBusyError:
            raise
        except OSError as error:
            raise ResultFolderError(f"--out {self.path}: {what} ({error.strerror or error})") from None

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self._drop_replaced()
            else:
                self._put_back()
        finally:
            self._unlock()

    def _check(self) -> None:
        if self.overwrite:
            return
        if not self.holds_run():
            if self.resume and self.resumable:
                from jaxtrace.io.checkpoints import CheckpointError

                raise CheckpointError(f"no checkpoint to resume from in {self.checkpoints}: {self.path} holds no run "
                                      "(no run.json, checkpoint or result); run without --resume to start it")
            return
        started = self.only_started()
        if not self.resume and not started:
            what = "a finished run" if (self.path / self.finished).exists() else "an unfinished run"
            advice = "pass --resume to continue (or re-report) it, " if self.resumable else ""
            raise FileExistsError(f"{self.path} already holds {what}: {advice}pass --overwrite to replace it, or "
                                  "choose another --out")
        saved_file = self.path / IDENTITY
        if not saved_file.is_file():
            raise ValueError(f"{self.path} holds a run without {IDENTITY} (from an older jaxtrace?): cannot tell "
                             "whether it is this run; use --overwrite or another --out")
        saved = read_json(saved_file, "run identity")
        differences = identity_differences(saved.get("identity", {}) if isinstance(saved, dict) else {},
                                           self.identity, self.defaults)
        if differences and started and not self.resume:
            raise FileExistsError(f"{self.path} holds the start of a different run, with no checkpoint "
                                  f"({'; '.join(differences[:4])}" + ("; ..." if len(differences) > 4 else "")
                                  + "): pass --overwrite to replace it, or choose another --out")
        if differences:
            raise ValueError(f"cannot resume {self.path}: it holds a different run ({'; '.join(differences[:4])}"
                             + ("; ..." if len(differences) > 4 else "") + "); use --overwrite or another --out")

    def _lock(self) -> None:
        lock = self.path / LOCK
        mine = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock.read_text(errors="replace").split()
                if len(holder) == 2 and holder[0] == socket.gethostname() and holder[1].isdigit() \
                        and not _pid_alive(int(holder[1])):
                    lock.unlink(missing_ok=True)  # left by a process that died
                    continue
                who = f"process {holder[1]} on {holder[0]}" if len(holder) == 2 else "another process"
                raise FolderBusyError(f"{self.path} is in use by {who} (lock {lock}); wait for it, or remove the "
                                      "lock if no run uses the folder") from None
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            self._locked = True
            return

    def _unlock(self) -> None:
        if self._locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self._locked = False

    def _entries(self) -> list[Path]:
        """What a run wrote in the folder (not the lock, nor the run set aside)."""
        return [entry for entry in self.path.iterdir() if entry.name not in (LOCK, REPLACED)]

    @staticmethod
    def _remove(entry: Path) -> None:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def _set_aside(self) -> None:
        """For --overwrite: move the run the folder holds into `.replaced/` (kept until the new run ends). A
        `.replaced/` left by a killed --overwrite is kept instead of an unfinished run beside it, and dropped for a
        finished one."""
        replaced = self.path / REPLACED
        if replaced.is_dir():
            if not (self.path / self.finished).exists():
                for entry in self._entries():  # the killed run's start: the run it replaced is the one to keep
                    self._remove(entry)
                self._replacing = True
                return
            shutil.rmtree(replaced)  # the killed run had finished: it is the one to keep
        entries = self._entries()
        replaced.mkdir()
        self._replacing = True
        for entry in entries:
            os.replace(entry, replaced / entry.name)

    def _put_back(self) -> None:
        """After a failed --overwrite: the new run's files removed, the replaced run's put back (best effort: what
        cannot be moved stays in `.replaced/`)."""
        if not (self._replacing and is_writer()):
            return
        self._replacing = False
        replaced = self.path / REPLACED
        with contextlib.suppress(OSError):
            for entry in self._entries():
                self._remove(entry)
            for entry in replaced.iterdir():
                os.replace(entry, self.path / entry.name)
            replaced.rmdir()

    def _drop_replaced(self) -> None:
        """After a run that ended well: the run it replaced is gone for good."""
        self._replacing = False
        if is_writer():
            shutil.rmtree(self.path / REPLACED, ignore_errors=True)

    def publish(self, writers: dict[str, Callable[[Path], None]],
                collective: dict[str, Callable[[Path], None]] | None = None) -> None:
        """Write result files: `writers[name](path)` (process 0) into the staging folder, then move them into place
        with the `finished` file last; `collective[name](path)` (every process, e.g. an Orbax save, atomic by itself)
        writes in place, after the old `finished` file is gone.

        A writer that fails (e.g. on a full disk) leaves the folder as it was, an earlier finished result included;
        a failure after that leaves a folder without its `finished` file. Either is a `ResultFolderError` naming the
        file (or the Orbax writer's own one-line error)."""
        staging = self.path / STAGING
        writers = {**self.with_results, **writers}
        try:
            failed = self._stage(staging, writers) if is_writer() else None
            if _any(failed is not None):  # every process stops if process 0 could not stage the files
                raise failed or ResultFolderError(f"{self.path}: process 0 could not write the results")
            if is_writer():
                with contextlib.suppress(FileNotFoundError):
                    (self.path / self.finished).unlink()
            _sync("jaxtrace-publish")
            for name, write in (collective or {}).items():
                try:
                    write(self.path / name)
                except Exception as error:  # e.g. Orbax's one-line CheckpointError, on a full disk
                    raise ResultFolderError(f"{first_line(error) or name}; "
                                            f"{self.path} holds no finished result{self._advice}") from error
            if not is_writer():
                return
            for name in [*sorted(set(writers) - {self.finished}), self.finished]:
                source, target = staging / name, self.path / name
                if not source.exists():
                    continue
                try:
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    os.replace(source, target)
                except OSError as error:
                    raise self._write_error(name, error, "holds no finished result") from error
        finally:
            if is_writer():
                shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, staging: Path, writers: dict[str, Callable[[Path], None]]) -> Exception | None:
        """Write every file into a fresh staging folder; the error (a ResultFolderError for an OSError) or None."""
        shutil.rmtree(staging, ignore_errors=True)
        name = STAGING
        try:
            staging.mkdir()
            for name, write in writers.items():
                write(staging / name)
        except OSError as error:
            return self._write_error(name, error, "is unchanged")
        except Exception as error:  # raised again by `publish`
            return error
        return None

    @property
    def _advice(self) -> str:
        return "; once it can be written, --resume writes the results again" if self.resumable else ""

    def _write_error(self, name: str, error: OSError, state: str) -> ResultFolderError:
        """`error` on writing the result file `name`, saying what state the folder is left in."""
        failure = ResultFolderError(f"{self.path / name}: cannot write it ({error.strerror or error}); "
                                    f"{self.path} {state}{self._advice}")
        failure.__cause__ = error
        return failure


def _any(flag: bool) -> bool:
    """Whether `flag` is true on process 0 (every process gets its value; multi-host runs)."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _sync(name: str) -> None:
    """Wait for every process (multi-host runs)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
