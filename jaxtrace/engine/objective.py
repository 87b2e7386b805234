"""A task's objective ready to run: the static spec, the parameters on the devices, the batcher and the cache; and
the evaluation of many masks at once.

    objective = build_objective(model, task, "attn_pattern")   # precomputes the cache (see `precompute_cache`)
    objective.evaluate_masks(masks)                             # [M] mean effect of M masks [M, L, C]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtrace.core import objective as core
from jaxtrace.core.metrics import METRICS, PROBABILITY_RATIO, Metric, get_metric
from jaxtrace.core.models import GatedLM, functional
from jaxtrace.core.options import option
from jaxtrace.core.records import Batch, Cache
from jaxtrace.core.sites import SITES, gate_shape, get_site, source_bytes_per_pair
from jaxtrace.engine import mesh as meshes
from jaxtrace.engine.batcher import Batcher, PackShape
from jaxtrace.tasks import EncodedTask


class MetricNaNError(FloatingPointError):
    """The metric is not finite for some examples."""


ATTENTION = ("auto", "explicit", "fused")


def resolve_attention(attention: str) -> str:
    """"auto": explicit patterns on CPU (where XLA's fused attention is no faster at these lengths), fused attention on
    GPU and TPU (flash kernels; no T×T tensor cached)."""
    if attention != "auto":
        return attention
    return "fused" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "explicit"


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """What is measured, and how much of it at once."""

    site: str = option("attn_pattern", "gate site or component set", choices=tuple(SITES))
    metric: str | None = option(None, "the effect measured (default: the task's; accuracy trains on the logit "
                                "difference)", choices=tuple(METRICS))
    batch_size: int = option(32, "pairs per batch")
    memory_gb: float = option(2.0, "memory budget of one batched mask evaluation on a device (sets how many masks run "
                              "at once)")
    attention: str = option("auto", "attention with explicit patterns, or fused (jax.nn.dot_product_attention; "
                            "attn_pattern then caches the counterfactual's queries and keys, not its patterns): auto "
                            "is explicit on CPU, fused on GPU and TPU", choices=ATTENTION)

    def __post_init__(self):
        get_site(self.site)
        if self.attention not in ATTENTION:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.metric is not None:
            get_metric(self.metric)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.memory_gb) and self.memory_gb > 0):
            raise ValueError(f"--memory-gb must be a positive number, got {self.memory_gb}")

    @property
    def memory_budget(self) -> int:
        return int(self.memory_gb * 2**30)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A task's gated objective at one site: `spec` (what the compiled programs are specialised on), `params` (the
    model's, placed on the mesh), `batcher` (host batches) and `cache` (the z-independent terms of every pair,
    pair-major on the host; None: recomputed in every call)."""

    spec: core.ObjectiveSpec
    params: object
    batcher: Batcher
    cache: Cache | None

    @property
    def task(self) -> EncodedTask:
        return self.batcher.task

    @property
    def site(self) -> str:
        return self.spec.site

    @property
    def metric(self) -> Metric:
        return self.spec.metric

    @property
    def shape(self) -> tuple[int, int]:
        """[L, C] of the gates."""
        return gate_shape(self.spec.config, self.spec.site)

    @property
    def n_components(self) -> int:
        return math.prod(self.shape)

    def inputs(self, idx: np.ndarray, shape: PackShape | None = None) -> tuple[Batch, Cache | None]:
        """The host batch of pairs `idx` and its slice of the cache, both with a leading group axis."""
        cache = None if self.cache is None else self.cache.take(self.batcher.group_index(idx))
        return self.batcher.batch(idx, shape), cache

    def mask_effects(self, masks, memory_budget: int = 2 << 30) -> np.ndarray:
        return mask_effects(self, masks, memory_budget)

    def evaluate_masks(self, masks, memory_budget: int = 2 << 30) -> np.ndarray:
        """[M] mean effect over the task of each of M masks [M, L, C]."""
        return mask_effects(self, masks, memory_budget).mean(1)

    def effects(self, z) -> np.ndarray:
        """[N] per-pair effects of gates z [L, C] (soft or binary), checked to be finite."""
        return mask_effects(self, np.asarray(z)[None])[0]


def build_objective(model: GatedLM, task: EncodedTask, site: str, batch_size: int = 32, cache: bool | None = None,
                    cache_limit_bytes: int = 4 << 30, metric: str | Metric = PROBABILITY_RATIO,
                    row_width: int | None = None, mesh: Mesh | None = None, share_prefix: bool = True,
                    attention: str = "auto") -> Objective:
    """The objective of `task` at `site` on batches of `batch_size` pairs.

    `cache=True` precomputes the counterfactual sources, prefix keys and values and ungated outputs once
    (`precompute_cache`); `cache=False` recomputes them in every call (the reference's way; for checks); `None`
    caches when they fit in `cache_limit_bytes`. On a `mesh` (`jaxtrace.engine.mesh`) a batch is split into one
    group of pairs per `data` device and the parameters are sharded over `model`. `attention`: see
    `resolve_attention` (both forms give the same effects and gradients).
    """
    get_site(site)
    metric = get_metric(metric)
    check_task_fits(task, model.config)
    check_metric(task, metric)
    noise_std = None
    if task.noise is not None:  # the embedding std is measured on the model
        noise_std = (task.noise.std if task.noise.std is not None else
                     task.noise.scale * float(jnp.std(model.embed_tokens[...].astype(jnp.float32))))
    batcher = Batcher(task, batch_size, mesh, row_width, share_prefix)
    apply, params = functional(model)
    if mesh is not None:
        params = meshes.shard_params(params, mesh)
    spec = core.ObjectiveSpec(apply, model.config, site, metric, noise_std,
                              0 if task.noise is None else task.noise.seed, batcher.prefix_length,
                              resolve_attention(attention))
    cache_bytes = len(task) * source_bytes_per_pair(model.config, site, task.arrays.cf_ids.shape[1],
                                                    spec.prefix_length, "fused" if spec.fused else "explicit")
    if cache is None:
        cache = cache_bytes <= cache_limit_bytes
    elif cache and cache_bytes > cache_limit_bytes:
        advice = ("; head_out gates the same heads with memory linear in length, and so does attn_pattern with "
                  "--attention fused" if site == "attn_pattern" and not spec.fused else "")
        raise MemoryError(f"caching {site} sources needs {cache_bytes / 2**30:.1f} GiB, over the "
                          f"{cache_limit_bytes / 2**30:.1f} GiB limit; use cache=False{advice}")
    objective = Objective(spec, params, batcher, None)
    return dataclasses.replace(objective, cache=precompute_cache(objective)) if cache else objective


def check_metric(task: EncodedTask, metric: Metric) -> None:
    """Refuse a ratio metric on a task with invariance pairs."""
    if task.arrays.keep.any() and metric.trained.ratio:
        raise ValueError(f"the task has invariance pairs, which {metric.name} cannot score: use logit_difference "
                         "or accuracy")


def check_task_fits(task: EncodedTask, config, model: str | None = None) -> None:
    """Refuse token ids outside the model's vocabulary (a tokenizer of another model) and rows longer than its
    positions: both would give results that look valid. `model` names the model in the message."""
    arrays = task.arrays
    the_model = "the model" if model is None else f"the model {model}"
    top = int(max(arrays.ids.max(), arrays.cf_ids.max(), arrays.target_ids.max()))
    if top >= config.vocab_size or min(arrays.ids.min(), arrays.cf_ids.min()) < 0:
        raise ValueError(f"the task has token id {top}, outside the {config.vocab_size}-token vocabulary of "
                         f"{the_model}: the tokenizer does not belong to this model (--tokenizer)")
    lengths = arrays.mask.sum(-1).max(-1)  # [N] longest prompt + target row of each pair
    longest = int(np.argmax(lengths))
    if lengths[longest] > config.max_positions:
        label = task.pairs[longest].label or f"pair {longest}"
        raise ValueError(f"{label}: a prompt with its target takes {int(lengths[longest])} tokens, more than the "
                         f"{config.max_positions} positions of {the_model}")


@functools.lru_cache(maxsize=None)
def _precompute_program(spec: core.ObjectiveSpec, mesh: Mesh | None):
    return meshes.jit(jax.vmap(functools.partial(core.precompute, spec), in_axes=(None, 0)), mesh)


def precompute_cache(objective: Objective) -> Cache:
    """The z-independent terms of every pair of the task, pair-major on the host ([N, ...] leaves)."""
    batcher = objective.batcher
    program = _precompute_program(objective.spec, batcher.mesh)
    chunks = []
    for idx in batcher.in_order:
        group_cache = program(objective.params, batcher.put(batcher.batch(idx, batcher.in_order_shape)))
        # [G, B, ...] -> [G * B, ...], the real pairs only
        chunks.append(jax.tree.map(lambda a: np.asarray(a).reshape(-1, *a.shape[2:])[: len(idx)], group_cache))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)


@functools.lru_cache(maxsize=None)
def _mask_program(spec: core.ObjectiveSpec, mesh: Mesh | None, start_layer: int = 0):
    """[M, G * B] effects of M masks [M, L, C] on one batch: one jitted, vmapped program per spec, mesh and start
    layer. With `start_layer`, every mask's gates are 0 below it: those layers run once per batch, ungated, and each
    mask's forward starts from their residual stream."""
    if not start_layer:
        effects = lambda params, z, batch, cache: core.batch_effects(spec, params, z, batch, cache)  # noqa: E731
        return meshes.jit(jax.vmap(effects, in_axes=(None, 0, None, None)), mesh)

    def group(params, masks, batch, cache):  # [M, B]
        initial = core.residual_entering(spec, params, batch, cache, start_layer)
        return jax.vmap(lambda z: core.group_effects(spec, params, z, batch, cache, start_layer=start_layer,
                                                     initial=initial))(masks)

    def effects(params, masks, batch, cache):
        per_group = jax.vmap(group, in_axes=(None, None, 0, 0))(params, masks, batch, cache)  # [G, M, B]
        return jnp.moveaxis(per_group, 0, 1).reshape(masks.shape[0], -1)

    return meshes.jit(effects, mesh)


SKIP_MIN_MASKS = 8  # fewer masks are evaluated from the embeddings (a start layer's program is not worth compiling)
START_LAYERS = 8    # the layers mask evaluation may start at: 0 and up to 7 more, evenly spaced


def start_layers(objective: Objective, masks: np.ndarray) -> np.ndarray:
    """[M] the layer each mask's evaluation starts at: the highest of `START_LAYERS` evenly spaced layers at or below
    its lowest gated layer (0 for every mask when there are fewer than `SKIP_MIN_MASKS` or no cache)."""
    n_layers = objective.shape[0]
    if len(masks) < SKIP_MIN_MASKS or objective.cache is None:
        return np.zeros(len(masks), np.int64)
    gated = (masks != 0).any(-1)  # [M, L]
    lowest = np.where(gated.any(1), gated.argmax(1), n_layers - 1)
    starts = np.unique(np.linspace(0, n_layers - 1, min(START_LAYERS, n_layers)).astype(np.int64))
    return starts[np.searchsorted(starts, lowest, side="right") - 1]


def masks_per_chunk(objective: Objective, n_masks: int, memory_budget: int) -> int:
    """How many masks one vmapped call evaluates: the budget (per device) over one mask's activation bytes for one
    data group of a batch (a device holds one group).

    Per mask, a packed batch keeps about 4 residual-width and 2 MLP-width vectors and one attention row (over
    prefix slots and row keys) per token and layer-step, plus the logits and log-softmax at its logit positions
    (float32).
    """
    c, batcher = objective.spec.config, objective.batcher
    rows, n_logits = batcher.in_order_shape
    width, keys = batcher.packer.width, batcher.packer.width + batcher.packer.memory_width
    per_mask = 4 * (rows * width * (4 * c.d_model + 2 * c.d_ff + 2 * c.n_heads * keys)
                    + 2 * n_logits * c.vocab_size)
    return int(max(1, min(n_masks, memory_budget // per_mask)))


def mask_effects(objective: Objective, masks, memory_budget: int = 2 << 30) -> np.ndarray:
    """[M, N] effect on every pair of each of M masks [M, L, C] (binary or soft), checked finite.

    Masks are grouped by the layer their evaluation can start at (`start_layers`: the layers below their lowest gate
    compute the ungated forward, so they run once per chunk of the group's masks). Each data batch is sent once; each
    group's masks go through one jitted, vmapped program in chunks of `masks_per_chunk` (the last chunk padded, so
    every call has the same shape).
    """
    batcher = objective.batcher
    masks = np.asarray(masks, np.float32)
    n_masks = masks.shape[0]
    chunk = masks_per_chunk(objective, n_masks, memory_budget)
    starts = start_layers(objective, masks)
    groups = []  # (start layer, mask indices, padded chunks on the devices)
    for start in np.unique(starts):
        members = np.flatnonzero(starts == start)
        padded = np.concatenate([masks[members], np.repeat(masks[members[:1]], -len(members) % chunk, axis=0)])
        groups.append((int(start), members, batcher.replicate(padded)))
    out = np.empty((n_masks, len(objective.task)), np.float32)
    for idx in batcher.in_order:
        batch, cache = batcher.put(objective.inputs(idx, batcher.in_order_shape))
        for start, members, padded in groups:
            program = _mask_program(objective.spec, batcher.mesh, start)
            for first in range(0, len(members), chunk):
                values = np.asarray(program(objective.params, padded[first: first + chunk], batch, cache))
                chosen = members[first: first + chunk]
                out[chosen[:, None], idx[None, :]] = values[: len(chosen), : len(idx)]
    for mask, row in zip(masks, out):
        check_finite(objective, row, np.arange(len(objective.task)), mask)
    return out


def check_finite(objective: Objective, values: np.ndarray, idx: np.ndarray, z) -> None:
    """Raise MetricNaNError naming the pairs whose effect under gates z is not finite.

    A non-finite activation spreads to the pairs packed in the same row (a zero attention weight times NaN is NaN),
    so flagged pairs are evaluated again each alone and those still non-finite are named.
    """
    flagged = [int(i) for i, v in zip(idx, values) if not math.isfinite(float(v))]
    if not flagged:
        return
    batcher, program = objective.batcher, _mask_program(objective.spec, objective.batcher.mesh)
    z = batcher.replicate(np.asarray(z, np.float32)[None])
    alone = [i for i in flagged if not math.isfinite(float(
        program(objective.params, z, *batcher.put(objective.inputs(np.array([i]))))[0, 0]))]
    bad = [objective.task.pairs[i].label or str(i) for i in alone or flagged]
    raise MetricNaNError(f"the metric is not finite for {len(bad)} examples: {', '.join(bad[:10])}")
