"""The host side of a task's objective: which pairs go together, how they are packed, and where they are placed.

A batch of pair indices (in task order or a seeded epoch's order of a run's pairs) is split into G data groups (one
per `data` device of the mesh), each group packed on its own (`jaxtrace.core.packing`) to a shape shared by every
batch that runs with it, so one compiled program serves a whole run. Batches are numpy `Batch` records with a
leading group axis; `put` sends them to the devices, each group to its own `data` shard.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtrace.core.packing import Packer
from jaxtrace.core.records import Batch, PairArrays
from jaxtrace.engine import mesh as meshes
from jaxtrace.tasks import EncodedTask

PackShape = tuple[int, int]  # (packed rows W, logit positions Q) per group


class Batcher:
    """Batches of `batch_size` pairs of `task`, packed into rows of `row_width` tokens (default: the longer of the
    longest pair and four average pairs); `share_prefix=False` recomputes the prompt tokens base and counterfactual
    share (for checks)."""

    def __init__(self, task: EncodedTask, batch_size: int = 32, mesh: Mesh | None = None,
                 row_width: int | None = None, share_prefix: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task, self.batch_size, self.mesh = task, batch_size, mesh
        self.groups = mesh.shape["data"] if mesh is not None else 1
        self.slots = math.ceil(batch_size / self.groups)  # pair slots per group
        self.packer = Packer(task.arrays, task.pad_id, self.slots, row_width, share_prefix=share_prefix)
        self.prefix_length = int(self.packer.prefix_len.max())  # X: cached prefix tokens per pair (0: none)
        self.in_order = self.chunks(np.arange(len(task)))      # the task in order, for evaluation
        self.in_order_shape = self.shape(self.in_order)

    def chunks(self, order: np.ndarray) -> list[np.ndarray]:
        """Consecutive index chunks of at most `batch_size` pairs."""
        return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def epoch(self, key: jax.Array, epoch: int, pairs: np.ndarray | None = None) -> list[np.ndarray]:
        """The pair-index batches of one run's epoch: a permutation seeded by (key, epoch) of the run's pair indices
        `pairs` (e.g. a bootstrap resample, with repetitions; default: every pair of the task once)."""
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch),
                                                  len(self.task) if pairs is None else len(pairs)))
        return self.chunks(order if pairs is None else np.asarray(pairs)[order])

    def group_index(self, idx: np.ndarray) -> np.ndarray:
        """[G, B] the pair of every slot of a batch (padding slots repeat the first pair)."""
        total = self.groups * self.slots
        return np.concatenate([idx, np.full(total - len(idx), idx[0])]).reshape(self.groups, self.slots)

    def _groups(self, idx: np.ndarray) -> list[np.ndarray]:
        return [idx[g * self.slots: (g + 1) * self.slots] for g in range(self.groups)]

    def shape(self, batches: list[np.ndarray]) -> PackShape:
        """(rows, logit positions) per group that fit every batch of pairs in `batches`: packing them all to it gives
        one shape, hence one compilation."""
        sizes = [self.packer.sizes(group) for idx in batches for group in self._groups(idx) if len(group)]
        return tuple(int(n) for n in np.max(sizes, 0))

    def batch(self, idx: np.ndarray, shape: PackShape | None = None) -> Batch:
        """The host batch of pairs `idx`: pair arrays [G, B, ...] and packed rows [G, W, S] etc., packed to at least
        `shape`."""
        rows, n_logits = np.maximum(shape or (0, 0), self.shape([idx]))
        arrays, index = self.task.arrays, self.group_index(idx)
        weight = (np.arange(index.size) < len(idx)).astype(np.float32).reshape(index.shape)
        pairs = PairArrays(index=arrays.index[index], prompt_ids=arrays.ids[index, 0, : arrays.cf_ids.shape[1]],
                           cf_ids=arrays.cf_ids[index], cf_mask=arrays.cf_mask[index],
                           noise_mask=arrays.noise_mask[index], target_ids=arrays.target_ids[index],
                           target_valid=arrays.target_valid[index], sign=arrays.sign[index],
                           keep=arrays.keep[index], weight=weight)
        packed = [self.packer.pack(group, rows, n_logits) for group in self._groups(idx)]
        return Batch(pairs, jax.tree.map(lambda *xs: np.stack(xs), *packed))

    def put(self, tree, group_axis: int = 0):
        """A host pytree on the devices: its group axis split over the mesh's `data` axis."""
        if self.mesh is None:
            return jax.device_put(tree)
        return meshes.put_groups(tree, self.mesh, group_axis)

    def replicate(self, tree):
        """A pytree (gates, optimiser state) on the devices, whole on every device of the mesh."""
        return jax.device_put(tree) if self.mesh is None else meshes.replicate(tree, self.mesh)
