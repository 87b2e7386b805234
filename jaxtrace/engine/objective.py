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
from flax import nnx
from jax.sharding import Mesh

from jaxtrace.core import edges, objective as core
from jaxtrace.core.metrics import METRICS, Metric, get_metric
from jaxtrace.core.models import GatedLM, ModelConfig, init_model, pure
from jaxtrace.core.options import option
from jaxtrace.core.records import Batch, Cache
from jaxtrace.core.search import DIRECTIONS, SearchConfig, gates_of, pgbct
from jaxtrace.core.sites import SITES, AttentionForm, gate_shape, get_site, source_bytes_per_pair
from jaxtrace.engine import mesh as meshes
from jaxtrace.engine.batcher import Batcher, PackShape
from jaxtrace.tasks import EncodedTask


class MetricNaNError(FloatingPointError):
    """The metric is not finite for some examples."""


ATTENTION = ("auto", *(form.value for form in AttentionForm))


def resolve_attention(attention: str) -> AttentionForm:
    """The attention form of `--attention`: "auto" is explicit patterns on CPU (where XLA's fused attention is no
    faster at these lengths), fused attention on GPU and TPU (flash kernels; no T×T tensor cached)."""
    if attention != "auto":
        return AttentionForm(attention)
    on_accelerator = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
    return AttentionForm.FUSED if on_accelerator else AttentionForm.EXPLICIT


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


DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of one batched mask evaluation on a device (`--memory-gb` 2)


class Programs:
    """The compiled device programs of one objective, each built on first use and kept: `precompute` (the cache of
    a batch), `mask_effects(start_layer)` (M masks on one batch), `gradients` (M gate points on one batch) and
    `training_step(search)` (R runs' PGB-CT step). `traces[name]` counts how often each was traced (one per
    compilation of a new argument shape). `fresh()` gives the same programs not yet traced (for compile timing)."""

    def __init__(self, spec: core.ObjectiveSpec, mesh: Mesh | None):
        self.spec, self.mesh = spec, mesh
        self.traces: dict[str, int] = {}
        self._built: dict[tuple, object] = {}

    def fresh(self) -> Programs:
        return Programs(self.spec, self.mesh)

    def _program(self, key: tuple, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def _counted(self, name: str, fn):
        """`fn` counting its traces under `name`."""
        def traced(*args):
            self.traces[name] = self.traces.get(name, 0) + 1
            return fn(*args)
        return traced

    def precompute(self):
        """(params, batch [G, ...]) -> the batch's `Cache` [G, B, ...]."""
        spec = self.spec
        return self._program(("precompute",), lambda: meshes.jit(self._counted("precompute", jax.vmap(
            functools.partial(core.precompute, spec), in_axes=(None, 0))), self.mesh))

    def mask_effects(self, start_layer: int = 0):
        """(params, masks [M, L, C], batch [G, ...], cache [G, ...]) -> [M, G * B] effects. With `start_layer`,
        (params, masks, batch, cache, reference [L, C] or None) -> effects: every mask's gates below the start are
        the reference's (0 without one); those layers run once per call, and each mask's forward starts from their
        residual stream."""
        return self._program(("mask_effects", start_layer), lambda: self._mask_program(start_layer))

    def _mask_program(self, start_layer: int):
        spec, name = self.spec, f"mask_effects@{start_layer}"
        if not start_layer:
            effects = lambda params, z, batch, cache: core.batch_effects(spec, params, z, batch, cache)  # noqa: E731
            return meshes.jit(self._counted(name, jax.vmap(effects, in_axes=(None, 0, None, None))), self.mesh)

        def group(params, masks, batch, cache, reference):  # [M, B]
            initial = core.residual_entering(spec, params, batch, cache, start_layer, reference)
            return jax.vmap(lambda z: core.group_effects(spec, params, z, batch, cache, start_layer=start_layer,
                                                         initial=initial))(masks)

        def effects(params, masks, batch, cache, reference):
            per_group = jax.vmap(group, in_axes=(None, None, 0, 0, None))(params, masks, batch, cache,
                                                                          reference)  # [G, M, B]
            return jnp.moveaxis(per_group, 0, 1).reshape(masks.shape[0], -1)

        return meshes.jit(self._counted(name, effects), self.mesh)

    def gradients(self):
        """(params, points [A, L, C], batch, cache) -> ([A, L, C] gradients of the batch's summed effect under the
        metric's trained form, [A, G * B] effects); padding slots weigh 0."""
        spec = self.spec
        metric = spec.metric.trained

        def summed(params, z, batch, cache):
            effects = core.batch_effects(spec, params, z, batch, cache, metric)
            return (effects * batch.pairs.weight.reshape(-1)).sum(), effects

        return self._program(("gradients",), lambda: meshes.jit(self._counted("gradients", jax.vmap(
            jax.grad(summed, argnums=1, has_aux=True), in_axes=(None, 0, None, None))), self.mesh))

    def training_step(self, search: SearchConfig):
        """(step, init) of R runs optimised together (vmapped `pgbct(...).update`):
        step(state [R, ...], params, batch [R, G, ...], cache [R, G, ...], inputs: RunInputs [R]) -> (state,
        stats [R, ...]). `search` is resolved; its λ, seed, epochs, warm start, scale, budget and sense do not enter
        the program (the per-run values are `RunInputs`)."""
        static = search.replace(lambda1=0.0, lambda2=0.0, seed=0, epochs=1, warm_start=None, scale="none",
                                budget=None, sense="for")

        def build():
            update = pgbct(self.spec, static)
            step = jax.vmap(update.update, in_axes=(0, None, 0, 0, 0))
            return meshes.jit(self._counted("training_step", step), self.mesh), update.init

        return self._program(("training_step", static), build)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A task's gated objective at one site: `spec` (what the compiled programs are specialised on: model, site,
    metric, resolved attention form), `params` (the model's, placed on the mesh; abstract `ShapeDtypeStruct`s for
    a plan), `batcher` (host batches), `cache` (the z-independent terms of every pair, pair-major on the host;
    None: recomputed in every call), `memory_budget` (bytes one batched mask evaluation may take on a device) and
    `programs` (its compiled programs)."""

    spec: core.ObjectiveSpec
    params: object
    batcher: Batcher
    cache: Cache | None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    programs: Programs | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.programs is None:
            object.__setattr__(self, "programs", Programs(self.spec, self.batcher.mesh))

    def replace(self, **changes) -> Objective:
        """The objective with fields changed (e.g. `memory_budget`); its compiled programs are kept unless the
        spec or the batcher changes."""
        if "spec" in changes or "batcher" in changes:
            changes.setdefault("programs", None)
        return dataclasses.replace(self, **changes)

    def fresh(self) -> Objective:
        """The objective with its programs not yet traced (lowering one traces anew: for compile timing)."""
        return self.replace(programs=self.programs.fresh())

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
    def attention(self) -> str:
        return self.spec.attention

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

    def mask_effects(self, masks, reference=None) -> np.ndarray:
        """[M, N] effect on every pair of each of M masks [M, L, C] (`mask_effects`)."""
        return mask_effects(self, masks, reference)

    def evaluate_masks(self, masks, reference=None) -> np.ndarray:
        """[M] mean effect over the task of each of M masks [M, L, C] (`mask_effects`)."""
        return mask_effects(self, masks, reference).mean(1)

    def circuit_effects(self, masks, direction: str = "patch", near=None) -> np.ndarray:
        """[M] mean effect over the task of each of M circuits [M, L, C] in a direction (`circuit_effects`)."""
        return circuit_effects(self, masks, direction, near).mean(1)

    def effects(self, z) -> np.ndarray:
        """[N] per-pair effects of gates z [L, C] (soft or binary), checked to be finite."""
        return mask_effects(self, np.asarray(z)[None])[0]


def build_objective(model: GatedLM | ModelConfig, task: EncodedTask, config: ObjectiveConfig | str = "attn_pattern",
                    batch_size: int | None = None, *, metric: str | Metric | None = None, attention: str | None = None,
                    memory_budget: int | None = None, mesh: Mesh | None = None, cache: bool | None = None,
                    cache_limit_bytes: int = 4 << 30, row_width: int | None = None,
                    share_prefix: bool = True) -> Objective:
    """The objective of `task` under `config` (an `ObjectiveConfig`, or a site name with `batch_size`, `metric`,
    `attention` given here, which then override the config's; `memory_budget` in bytes overrides its
    `--memory-gb`). The metric defaults to the task's own (`EncodedTask.default_metric`).

    `model` is a `GatedLM`, or a `ModelConfig` for an abstract objective (parameters as `ShapeDtypeStruct`s, no
    cache; what `jaxtrace plan` lowers): both are made here, so a plan analyses exactly the run's programs.

    `cache=True` precomputes the counterfactual sources, prefix keys and values and ungated outputs once
    (`precompute_cache`); `cache=False` recomputes them in every call (the reference's way; for checks); `None`
    caches when they fit in `cache_limit_bytes`. On a `mesh` (`jaxtrace.engine.mesh`) a batch is split into one
    group of pairs per `data` device and the parameters are sharded over `model`. `attention`: see
    `resolve_attention` (both forms give the same effects and gradients).
    """
    if isinstance(config, str):
        config = ObjectiveConfig(site=config)
    overrides = {"batch_size": batch_size, "attention": attention,
                 "metric": None if isinstance(metric, Metric) else metric}  # a Metric object is used as given
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    abstract = isinstance(model, ModelConfig)
    model_config = model if abstract else model.config
    site = config.site
    metric = get_metric(metric if isinstance(metric, Metric) else config.metric or task.default_metric)
    check_task_fits(task, model_config)
    check_metric(task, metric)
    noise_std = None
    if task.noise is not None:  # the embedding std is measured on the model (a plan's only needs to be there)
        noise_std = (task.noise.std if task.noise.std is not None else task.noise.scale if abstract else
                     task.noise.scale * float(jnp.std(model.embed_tokens[...].astype(jnp.float32))))
    batcher = Batcher(task, config.batch_size, mesh, row_width, share_prefix)
    pure_model, params = pure(nnx.eval_shape(lambda: init_model(model_config)) if abstract else model)
    params = meshes.abstract_params(params, mesh) if abstract else \
        params if mesh is None else meshes.shard_params(params, mesh)
    spec = core.ObjectiveSpec(pure_model, site, metric, noise_std,
                              0 if task.noise is None else task.noise.seed, batcher.prefix_length,
                              resolve_attention(config.attention))
    budget = config.memory_budget if memory_budget is None else memory_budget
    objective = Objective(spec, params, batcher, None, budget)
    if not resolve_cache(spec, len(task), task.arrays.cf_ids.shape[1], cache, cache_limit_bytes):
        return objective
    return objective.replace(cache=abstract_task_cache(objective) if abstract else precompute_cache(objective))


def resolve_cache(spec: core.ObjectiveSpec, pairs: int, prompt_length: int, cache: bool | None,
                  cache_limit_bytes: int) -> bool:
    """Whether the sources of `pairs` pairs of `prompt_length`-token prompts are cached, as `build_objective` decides
    for its `cache` (None: when they fit in `cache_limit_bytes`; True over the limit is a MemoryError)."""
    cache_bytes = pairs * source_bytes_per_pair(spec.config, spec.site, prompt_length, spec.prefix_length,
                                                spec.attention)
    if cache is None:
        return cache_bytes <= cache_limit_bytes
    if cache and cache_bytes > cache_limit_bytes:
        advice = ("; head_out gates the same heads with memory linear in length, and so does attn_pattern with "
                  "--attention fused" if spec.site == "attn_pattern" and not spec.fused else "")
        raise MemoryError(f"caching {spec.site} sources needs {cache_bytes / 2**30:.1f} GiB, over the "
                          f"{cache_limit_bytes / 2**30:.1f} GiB limit; use cache=False{advice}")
    return cache


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


def precompute_cache(objective: Objective) -> Cache:
    """The z-independent terms of every pair of the task, pair-major on the host ([N, ...] leaves)."""
    batcher = objective.batcher
    program = objective.programs.precompute()
    chunks = []
    for idx in batcher.in_order:
        group_cache = program(objective.params, batcher.put(batcher.batch(idx, batcher.in_order_shape)))
        # [G, B, ...] -> [G * B, ...], the real pairs only
        chunks.append(jax.tree.map(lambda a: np.asarray(a).reshape(-1, *a.shape[2:])[: len(idx)], group_cache))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)


def abstract_task_cache(objective: Objective) -> Cache:
    """The shapes (`jax.ShapeDtypeStruct`s, [N, ...] leaves) of the cache `precompute_cache` would give: an
    abstract objective's cache, from the precompute program's output shapes on one batch."""
    batcher = objective.batcher
    batch = batcher.batch(batcher.in_order[0], batcher.in_order_shape)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), batch)
    group = jax.eval_shape(objective.programs.fresh().precompute(), objective.params, shapes)  # [G, B, ...]
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(objective.task), *a.shape[2:]), a.dtype), group)


SKIP_MIN_MASKS = 8  # fewer masks are evaluated from the embeddings (a start layer's program is not worth compiling)
START_LAYERS = 8    # the layers mask evaluation may start at: 0 and up to 7 more, evenly spaced


def start_layers(objective: Objective, masks: np.ndarray, reference=None) -> tuple[np.ndarray, np.ndarray]:
    """([M] the layer each mask's evaluation starts at, [M] whether from a reference run rather than the clean run).

    Without `reference`, the layers below a mask's start are all 0 (the clean run's) or all 1 (the patched run's: a
    keep-direction circuit's complement); with it ([L, C], e.g. the circuit a greedy round extends), they are the
    reference's. The start is the highest of `START_LAYERS` evenly spaced layers at or below the lowest layer that
    differs (0 for every mask when there are fewer than `SKIP_MIN_MASKS` or no cache)."""
    n_layers = objective.shape[0]
    if len(masks) < SKIP_MIN_MASKS or objective.cache is None:
        return np.zeros(len(masks), np.int64), np.zeros(len(masks), bool)

    def lowest(differs):  # [M, L] -> [M] the lowest layer that differs from the reference
        return np.where(differs.any(1), differs.argmax(1), n_layers - 1)

    starts = np.unique(np.linspace(0, n_layers - 1, min(START_LAYERS, n_layers)).astype(np.int64))
    if reference is not None:
        layers = starts[np.searchsorted(starts, lowest((masks != reference).any(-1)), side="right") - 1]
        return layers, layers > 0
    from_clean, from_patched = lowest((masks != 0).any(-1)), lowest((masks != 1).any(-1))
    layers = starts[np.searchsorted(starts, np.maximum(from_clean, from_patched), side="right") - 1]
    return layers, (from_patched > from_clean) & (layers > 0)


def masks_per_chunk(objective: Objective, n_masks: int, share: float = 1.0) -> int:
    """How many masks one vmapped call evaluates: `share` of the objective's memory budget (per device) over one
    mask's activation bytes for one data group of a batch (a device holds one group).

    Per mask, a packed batch keeps about 4 residual-width and 2 MLP-width vectors and one attention row (over
    prefix slots and row keys) per token and layer-step, plus the logits and log-softmax at its logit positions
    (float32, as a gradient holds them; an evaluation's chunked normaliser holds less); through edges also about
    5 O residual-width vectors per token (the writers' deltas, their counterfactual outputs and a reader's float32
    copy of the deltas: XLA's analysis of SmolLM2's evaluation) and the 3H query, key and value inputs of a layer.
    """
    c, batcher = objective.spec.config, objective.batcher
    rows, n_logits = batcher.in_order_shape
    width, keys = batcher.packer.width, batcher.packer.width + batcher.packer.memory_width
    per_token = 4 * c.d_model + 2 * c.d_ff + 2 * c.n_heads * keys
    if objective.site == "edges":
        per_token += (5 * edges.n_writers(c) + 3 * c.n_heads) * c.d_model
    per_mask = 4 * (rows * width * per_token + 2 * n_logits * c.vocab_size)
    return int(max(1, min(n_masks, int(objective.memory_budget * share) // per_mask)))


def mask_effects(objective: Objective, masks, reference=None) -> np.ndarray:
    """[M, N] effect on every pair of each of M masks [M, L, C] (binary or soft), checked finite.

    Masks are sorted by the layer their evaluation can start at (`start_layers`: the layers below equal the clean
    run's, or a reference run's, and are computed once per call; the reference is `reference` [L, C] where given,
    else the patched run) — those starting from the reference run by descending start, then those from the clean run
    by ascending start, so that a chunk holding both has low starts — and evaluated in chunks of `masks_per_chunk`,
    each from the lowest start among its masks (0 if they start from both runs), by one jitted, vmapped program per
    start layer. Only the last chunk is padded (every call has the same shape). Each data batch is sent once.
    """
    batcher = objective.batcher
    masks = np.asarray(masks, np.float32)
    n_masks = masks.shape[0]
    chunk = masks_per_chunk(objective, n_masks)
    starts, referenced = start_layers(objective, masks, reference)
    gates = None if not referenced.any() else batcher.replicate(  # sent once, only where a chunk starts from it
        np.ones(objective.shape, np.float32) if reference is None else np.asarray(reference, np.float32))
    order = np.lexsort((np.where(referenced, -starts, starts), ~referenced))
    chunks = []  # (start layer, the reference's gates or None, mask indices, the chunk's masks on the devices)
    for first in range(0, n_masks, chunk):
        members = order[first: first + chunk]
        slots = np.concatenate([members, np.repeat(members[-1:], chunk - len(members))])
        run = bool(referenced[members].all())
        start = int(starts[members].min()) if run or not referenced[members].any() else 0
        chunks.append((start, gates if run else None, members, batcher.replicate(masks[slots])))
    out = np.empty((n_masks, len(objective.task)), np.float32)
    for idx in batcher.in_order:
        batch, cache = batcher.put(objective.inputs(idx, batcher.in_order_shape))
        for start, run, members, on_devices in chunks:
            program = objective.programs.mask_effects(start)
            arguments = (objective.params, on_devices, batch, cache) + ((run,) if start else ())
            values = np.asarray(program(*arguments))
            out[members[:, None], idx[None, :]] = values[: len(members), : len(idx)]
    for mask, row in zip(masks, out):
        check_finite(objective, row, np.arange(len(objective.task)), mask)
    return out


def circuit_effects(objective: Objective, masks, direction: str = "patch", near=None) -> np.ndarray:
    """[M, N] per-pair effect of each of M circuits [M, L, C] (binary or soft) in a direction. patch: IE(S), the
    effect of patching S. keep: IE(A) − IE(A \\ C), what keeping C clean while every other component is patched
    takes back of patching them all (m(C) − m(∅) for the logit difference; its mean over IE(A) is MIB's
    faithfulness). Both are larger for a better circuit and equal IE(A) for every component; all masks (and A) in
    one `mask_effects` call. `near`: a circuit [L, C] the masks differ from in a few components (a greedy round's,
    a swap search's): each mask's evaluation starts at the lowest layer where it differs from it."""
    if direction not in DIRECTIONS:
        raise ValueError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    masks = np.asarray(masks, np.float32)
    reference = None if near is None else gates_of(np.asarray(near, np.float32), direction)
    if direction == "patch":
        return mask_effects(objective, masks, reference)
    ones = np.ones((1, *objective.shape), np.float32)
    effects = mask_effects(objective, np.concatenate([gates_of(masks, "keep"), ones]), reference)
    return effects[-1:] - effects[:-1]


def check_finite(objective: Objective, values: np.ndarray, idx: np.ndarray, z) -> None:
    """Raise MetricNaNError naming the pairs whose effect under gates z is not finite.

    A non-finite activation spreads to the pairs packed in the same row (a zero attention weight times NaN is NaN),
    so flagged pairs are evaluated again each alone and those still non-finite are named.
    """
    flagged = [int(i) for i, v in zip(idx, values) if not math.isfinite(float(v))]
    if not flagged:
        return
    batcher, program = objective.batcher, objective.programs.mask_effects()
    z = batcher.replicate(np.asarray(z, np.float32)[None])
    alone = [i for i in flagged if not math.isfinite(float(
        program(objective.params, z, *batcher.put(objective.inputs(np.array([i]))))[0, 0]))]
    bad = [objective.task.pairs[i].label or str(i) for i in alone or flagged]
    raise MetricNaNError(f"the metric is not finite for {len(bad)} examples: {', '.join(bad[:10])}")
