"""Orbax checkpoints of a search: one atomic step per finished epoch (z, optimizer state, RNG key + JSON metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be read."""


class EpochCheckpoints:
    """`directory/<epochs done>/` holding `state` (array pytree) and `meta` (JSON). Orbax writes each step to a
    temporary folder and renames it when complete, so a killed run never leaves a half-written step behind."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, epochs_done: int, state: Any, meta: dict) -> None:
        self.manager.save(epochs_done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, epochs_done: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of a step (default: the latest), or a CheckpointError saying what is left intact."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        step = steps[-1] if epochs_done is None else epochs_done
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as error:  # Orbax raises many types for damaged files
            earlier = [s for s in steps if s < step]
            hint = (f"the earlier checkpoints {earlier} are intact: move {self.directory / str(step)} away to resume "
                    f"from epoch {earlier[-1]}" if earlier else "no earlier checkpoint exists")
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read "
                                  f"({type(error).__name__}: {error}); {hint}") from error
        return restored.state, restored.meta

    def close(self) -> None:
        self.manager.close()


def save_tree(path: str | Path, tree: Any) -> None:
    """Write an array pytree with Orbax (replacing an older copy)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def load_tree(path: str | Path) -> Any:
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(Path(path).absolute())
    finally:
        checkpointer.close()
