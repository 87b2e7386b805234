"""Orbax checkpoints of a search: one atomic step per finished epoch (z, optimizer state, RNG key + JSON metadata);
and the finished methods of a comparison (`FinishedMethods`: one NumPy file each).

The search's typed `RunState` and `RunProgress` are converted here, at the file boundary: a step holds `state`, the
array pytree {"z", "opt_state", "keys"}, and `meta`, the JSON object {"configs", "epochs_done", "histories", "steps",
"seconds", "unchanged", "settled"} (see `RunProgress.to_dict`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import traceback
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jaxtrace.core.errors import typed_line
from jaxtrace.engine.loop import RunProgress, RunState
from jaxtrace.engine.methods import MethodResult
from jaxtrace.io.files import atomic_path

DEBUG_LOG = logging.getLogger("jaxtrace.debug")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, cannot be read or cannot be written (a one-line message naming it)."""


# What Orbax's synchronous and asynchronous paths raise (asyncio's CancelledError is not an Exception).
_ERRORS = (Exception, asyncio.CancelledError)
# Where the code lives whose errors in background threads come after a CheckpointError has said it all.
_BACKGROUND_CODE = tuple(str(Path(module.__file__).parent) for module in (ocp, asyncio))


def _from_background_code(filename: str) -> bool:
    return filename.startswith(_BACKGROUND_CODE)


def _orbax_record_to_debug_log(record: logging.LogRecord) -> bool:
    """A filter of absl's logger: Orbax's records go to `DEBUG_LOG`, others pass."""
    if not _from_background_code(record.pathname):
        return True
    DEBUG_LOG.debug(record.getMessage(), exc_info=record.exc_info)
    return False


def _unraisable_to_debug_log(unraisable, previous) -> None:
    """An unraisable exception raised in Orbax's or asyncio's code goes to `DEBUG_LOG`, any other to `previous`."""
    frames = traceback.extract_tb(unraisable.exc_traceback)
    if not any(_from_background_code(frame.filename) for frame in frames):
        return previous(unraisable)
    DEBUG_LOG.debug(f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}",
                    exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def quiet_background_errors() -> None:
    """Send what Orbax's and asyncio's background threads print on their own to `DEBUG_LOG` (DEBUG level) instead
    of stderr, for the rest of the process: Orbax's logged errors with their tracebacks (a failed save) and the
    exceptions of callbacks that arrive after their event loop closed (a damaged checkpoint; some come at exit).
    Each of these failures is already a one-line `CheckpointError`."""
    absl = logging.getLogger("absl")
    if _orbax_record_to_debug_log not in absl.filters:
        absl.addFilter(_orbax_record_to_debug_log)
        sys.unraisablehook = functools.partial(_unraisable_to_debug_log, previous=sys.unraisablehook)


class EpochCheckpoints:
    """`directory/<epochs done>/` holding `state` (array pytree) and `meta` (JSON). Orbax writes each step to a
    temporary folder and renames it when complete, so a killed run never leaves a half-written step behind."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))
        except _ERRORS as error:  # Orbax raises many types (OSError, ValueError, ...)
            raise CheckpointError(f"cannot open the checkpoints in {self.directory} ({typed_line(error)})") from error

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, epochs_done: int, state: RunState, progress: RunProgress) -> None:
        """Write a step and wait for it (Orbax writes asynchronously; its errors, e.g. a full disk, surface here).
        The signature of `run_searches`' `on_epoch`."""
        try:
            self.manager.save(epochs_done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.to_dict()), meta=ocp.args.JsonSave(progress.to_dict())))
            self.manager.wait_until_finished()
        except _ERRORS as error:
            done = []
            with contextlib.suppress(*_ERRORS):
                done = [s for s in self.steps() if s < epochs_done]
            kept = f"; the checkpoints {done} are intact" if done else ""
            raise CheckpointError(f"cannot save checkpoint {self.directory / str(epochs_done)} "
                                  f"({typed_line(error)}){kept}") from error

    def restore(self, abstract_state: RunState, epochs_done: int | None = None) -> tuple[RunState, RunProgress]:
        """(state, progress) of a step (default: the latest), restored into the structure of `abstract_state` (see
        `initial_state`), or a CheckpointError saying what is left intact."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        step = steps[-1] if epochs_done is None else epochs_done
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state.to_dict()), meta=ocp.args.JsonRestore()))
            return RunState.from_dict(restored.state), RunProgress.from_dict(restored.meta)
        except _ERRORS as error:  # Orbax raises many types for damaged files (and `from_dict` a ValueError)
            earlier = [s for s in steps if s < step]
            hint = (f"the earlier checkpoints {earlier} are intact: move {self.directory / str(step)} away to resume "
                    f"from epoch {earlier[-1]}" if earlier else "no earlier checkpoint exists: --overwrite starts "
                    "the run again")
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read "
                                  f"({typed_line(error)}); {hint}") from error

    def close(self, quiet: bool = False) -> None:
        """Finish pending writes and close; `quiet`: ignore a failure (when another error is on its way)."""
        try:
            self.manager.close()
        except _ERRORS as error:
            if not quiet:
                raise CheckpointError(f"cannot finish writing the checkpoints in {self.directory} "
                                      f"({typed_line(error)})") from error


def save_tree(path: str | Path, tree: Any) -> None:
    """Write an array pytree with Orbax (replacing an older copy); a failure is a one-line CheckpointError."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(Path(path).absolute(), tree, force=True)
        checkpointer.wait_until_finished()
    except _ERRORS as error:
        with contextlib.suppress(*_ERRORS):
            checkpointer.close()
        raise CheckpointError(f"cannot write {Path(path).absolute()} ({typed_line(error)})") from error
    checkpointer.close()


def load_tree(path: str | Path) -> Any:
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(Path(path).absolute())
    finally:
        checkpointer.close()


class FinishedMethods:
    """The finished methods of a comparison, one file each (`directory/<method>.npz`: its circuits' masks
    `mask_<size>`, its `scores`, and `meta`, the JSON of its sizes, effects, wall time and extras), and the arrays of
    the methods' memo (`directory/memo.arrays.npz`, e.g. the single effects). Written atomically, read back
    exactly."""

    MEMO = "memo.arrays.npz"  # no method's name has a dot

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()

    def save(self, name: str, result: MethodResult, memo: dict[str, Any]) -> None:
        """Write a finished method's result and the memo's arrays (the memo first: a result never lacks it)."""
        self._write(self.directory / self.MEMO,
                    {key: value for key, value in memo.items() if isinstance(value, np.ndarray)})
        sizes = list(result.circuits)
        meta = {"sizes": sizes, "effects": [result.circuits[size][1] for size in sizes], "seconds": result.seconds,
                "extras": dict(result.extras)}
        arrays = {f"mask_{size}": np.asarray(result.circuits[size][0]) for size in sizes}
        if result.scores is not None:
            arrays["scores"] = np.asarray(result.scores)
        self._write(self.directory / f"{name}.npz", {**arrays, "meta": np.array(json.dumps(meta))})

    def load(self) -> tuple[dict[str, MethodResult], dict[str, np.ndarray]]:
        """({method: its result}, the memo's arrays) of the methods finished so far (none without the folder)."""
        results, memo = {}, {}
        for path in sorted(self.directory.glob("*.npz")) if self.directory.is_dir() else []:
            try:
                with np.load(path, allow_pickle=False) as saved:
                    arrays = dict(saved)
                if path.name == self.MEMO:
                    memo = arrays
                    continue
                meta = json.loads(str(arrays["meta"]))
                circuits = {size: (arrays[f"mask_{size}"], effect)
                            for size, effect in zip(meta["sizes"], meta["effects"], strict=True)}
                results[path.stem] = MethodResult(circuits, arrays.get("scores"), meta["seconds"], meta["extras"])
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
                raise CheckpointError(f"finished method {path} cannot be read ({typed_line(error)}); move it away to "
                                      "run the method again") from error
        return results, memo

    @staticmethod
    def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as file:
                np.savez(file, **arrays)
        except OSError as error:
            raise CheckpointError(f"cannot save {path} ({error.strerror or error})") from error
