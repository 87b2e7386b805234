"""Memory and FLOPs of a PGB-CT run's device programs, from XLA's own compile-time analysis of abstract shapes.

    shape = TaskShape(pairs=1000, prompt_tokens=16, target_tokens=1)
    report = plan_programs(config, shape, ObjectiveConfig("attn_pattern", batch_size=32), mesh=mesh)
    report.training.total_bytes, report.training.flops, report.evaluation.total_bytes

Nothing is allocated and no weight is read: the objective is `build_objective`'s own, given a `ModelConfig` instead
of a model (abstract: parameters built with `nnx.eval_shape`), and its parameters, the packed batch, the cache slice
and the optimiser state are `jax.ShapeDtypeStruct`s with the shardings a run gives them (`jaxtrace.engine.mesh`).
The programs lowered are the objective's own (`Objective.programs`), not copies: the PGB-CT step (R runs vmapped)
and the vmapped mask evaluation (M masks per call), with the attention form the run resolves. Batches are packed on
the host exactly as a run packs them, from the task's token arrays, so the packed shapes are the run's; a task given
by its sizes (`TaskShape`) has pairs all alike, of which one batch is made (`TaskShape.encoded`), so that a plan of
any number of pairs stays small.

Each program is compiled once for `memory_analysis()` (what XLA plans for one device: argument, output, alias,
temporary and generated-code bytes) and `cost_analysis()`. XLA counts a loop's body once, so the FLOPs of the
scanned layers come from one more compilation with the layer scan unrolled by d, a divisor of the L layers that
leaves a loop of L / d iterations (`ObjectiveSpec.unroll`): the difference is (d - 1) layers' FLOPs and the total
`f + (L - 1) * layer` (for L prime or below 4 the layer is counted on a 4-layer variant: two more compilations).
That is what the scanned program executes; unrolling the whole stack would count less (XLA then merges the
backward pass's rematerialised forward with the forward itself). On a mesh the numbers are those of the
partitioned per-device program.

What XLA's analysis does not see: scratch that runtime libraries allocate inside a call (on CPU, the matmul
libraries' packed operands: measured up to 1.7x the planned temporaries of a logits-heavy mask evaluation, 1.01-1.07x
for training steps; `benchmarks/PLAN.md`), and the host (the task's cache, the compiler itself). XLA:CPU computes
bfloat16 matmuls in float32, converting the stacked weights up front, so a bfloat16 plan made on CPU holds float32
copies of the weights in its temporaries, which GPU and TPU compilers do not make.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrace.core.models import ModelConfig
from jaxtrace.core.options import option
from jaxtrace.core.records import Cache, TaskArrays
from jaxtrace.core.search import RunInputs, SearchConfig
from jaxtrace.engine import loop
from jaxtrace.engine import mesh as meshes
from jaxtrace.engine.objective import (Objective, ObjectiveConfig, abstract_task_cache, build_objective,
                                       masks_per_chunk, resolve_cache)
from jaxtrace.tasks import EncodedTask, PromptPair


@dataclasses.dataclass(frozen=True)
class TaskShape:
    """A task given by its sizes: `pairs` pairs of `prompt_tokens`-token prompts whose first `prefix_tokens` tokens
    base and counterfactual share, each scored on `targets` targets of `target_tokens` tokens; gates on every prompt
    token."""

    pairs: int = option(1000, "task shape: number of pairs")
    prompt_tokens: int = option(16, "task shape: tokens per prompt")
    target_tokens: int = option(1, "task shape: tokens per target")
    targets: int = option(2, "task shape: targets per pair (2: the odds of two answers)")
    prefix_tokens: int = option(0, "task shape: leading prompt tokens base and counterfactual share (their keys and "
                                "values are cached; at most prompt tokens - 1)")

    def __post_init__(self):
        for name in ("pairs", "prompt_tokens", "target_tokens", "targets"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if type(self.prefix_tokens) is not int or not 0 <= self.prefix_tokens < self.prompt_tokens:
            raise ValueError(f"--prefix-tokens must be between 0 and --prompt-tokens - 1 ({self.prompt_tokens - 1}), "
                             f"got {self.prefix_tokens!r}")

    def encoded(self) -> EncodedTask:
        """A task of these sizes (token ids 1 and 2 in the prompts, 3 in the targets, 0 for padding)."""
        n, p, y, u, x = self.pairs, self.prompt_tokens, self.targets, self.target_tokens, self.prefix_tokens
        length = p + u - 1
        ids = np.ones((n, y, length), np.int32)
        ids[:, :, p:] = 3
        cf_ids = np.ones((n, p), np.int32)
        cf_ids[:, x:] = 2
        arrays = TaskArrays(
            index=np.arange(n, dtype=np.int32), cf_ids=cf_ids, cf_mask=np.ones((n, p), np.int32), ids=ids,
            mask=np.ones((n, y, length), np.int32), target_ids=np.full((n, y, u), 3, np.int32),
            target_pos=np.broadcast_to(p - 1 + np.arange(u, dtype=np.int32), (n, y, u)).copy(),
            target_valid=np.ones((n, y, u), np.float32), sign=np.ones(n, np.float32), keep=np.zeros(n, np.float32),
            gate_mask=np.pad(np.ones((n, p), np.float32), ((0, 0), (0, u - 1))),
            noise_mask=np.zeros((n, p), np.float32))
        pairs = tuple(PromptPair("base", "counterfactual", tuple(f"target {k}" for k in range(y)),
                                 label=f"pair-{i}") for i in range(n))
        return EncodedTask(pairs, (), None, 0, arrays)


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """What XLA plans for one compiled program on one device: bytes of its arguments, outputs, outputs aliased to
    arguments, temporaries and generated code, and `total_bytes` = argument + output - alias + temp + code, what it
    holds while it runs; `flops` with every layer counted, `flops_scanned` XLA's own count (the layer scan's body
    once); `compile_s` the seconds of its compilations."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    total_bytes: int
    flops: float
    flops_scanned: float
    compile_s: float


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """The per-device memory and FLOPs of a run's training step and mask evaluation, and what they were planned for.

    `packed`: rows per data group of a training step and of an evaluation call, the row width, the prefix slots per
    row and the logit positions of a step; `weight_bytes`: the parameters one device holds; `cache_host_bytes`: the
    task's cache on the host (every pair's sources, prefix keys and values and ungated outputs, in the activation
    dtype; `cached` False: over the cache limit, every step recomputes them, as `build_objective` decides);
    `simulated`: the devices are CPU devices forced by `--xla_force_host_platform_device_count` (XLA:CPU's plan of
    the sharded program)."""

    model: str
    config: ModelConfig
    site: str
    metric: str
    attention: str
    batch_size: int
    runs: int
    masks: int
    pairs: int
    mesh: dict
    devices: int
    platform: str
    simulated: bool
    packed: dict
    weight_bytes: int
    cache_host_bytes: int
    cached: bool
    device_memory_bytes: int
    training: ProgramCost
    evaluation: ProgramCost

    @property
    def fits(self) -> dict[str, bool]:
        """Whether each program fits one device's memory."""
        return {name: getattr(self, name).total_bytes <= self.device_memory_bytes for name in ("training",
                                                                                               "evaluation")}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fits": self.fits}

    @classmethod
    def from_dict(cls, record: dict) -> PlanReport:
        record = {k: v for k, v in record.items() if k != "fits"}
        return cls(**{**record, "config": ModelConfig.from_dict(record["config"]),
                      "training": ProgramCost(**record["training"]),
                      "evaluation": ProgramCost(**record["evaluation"])})


def _abstract(tree, sharding=None, lead: tuple[int, ...] = ()):
    """Every array leaf of a pytree as a `jax.ShapeDtypeStruct` (with leading axes `lead`) of the given sharding."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((*lead, *np.shape(a)), a.dtype, sharding=sharding), tree)


def _groups(mesh: Mesh | None, group_axis: int):
    """The sharding `Batcher.put` gives a batch whose group axis is `group_axis`."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(*([None] * group_axis), "data"))


def _replicated(mesh: Mesh | None):
    return None if mesh is None else meshes.replicated(mesh)


def abstract_cache(objective: Objective) -> Cache:
    """The shapes of one batch's cache slice [G, B, ...] (as `Objective.inputs` takes it from the task's cache)."""
    batcher = objective.batcher
    cache = objective.cache if objective.cache is not None else abstract_task_cache(objective)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((batcher.groups, batcher.slots, *a.shape[1:]), a.dtype), cache)


def host_cache_bytes(objective: Objective, pairs: int) -> int:
    """The bytes on the host of the cache of `pairs` pairs like the objective's (`Objective.cache`: every pair's
    sources, prefix keys and values and ungated outputs, in the model's activation dtype), cached or not."""
    cache = objective.cache if objective.cache is not None else abstract_task_cache(objective)
    return pairs * sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in jax.tree.leaves(cache))


def training_shape(objective: Objective, search: SearchConfig) -> tuple[int, int]:
    """The packed shape `run_searches` gives every step of a run of `search` (every epoch's batches)."""
    batcher, key = objective.batcher, jax.random.key(search.seed)
    return batcher.shape([idx for epoch in range(search.epochs) for idx in batcher.epoch(key, epoch)])


def training_arguments(objective: Objective, search: SearchConfig, runs: int = 1, cached: bool = True) -> tuple:
    """Abstract (state, params, batch, cache, inputs) of the step of `runs` runs, as `run_searches` passes them."""
    batcher, mesh = objective.batcher, objective.batcher.mesh
    host = batcher.batch(batcher.in_order[0], training_shape(objective, search))
    _, init = loop.training_step(objective, search)
    z = jax.ShapeDtypeStruct((runs, *objective.shape), jnp.float32)
    state = _abstract(jax.eval_shape(jax.vmap(init), z), _replicated(mesh))
    batch = _abstract(host, _groups(mesh, 1), (runs,))
    cache = _abstract(abstract_cache(objective), _groups(mesh, 1), (runs,)) if cached else None
    per_run = jax.ShapeDtypeStruct((runs,), jnp.float32, sharding=_replicated(mesh))
    return (state, objective.params, batch, cache, RunInputs(per_run, per_run, per_run, per_run))


def evaluation_arguments(objective: Objective, masks: int, cached: bool = True) -> tuple:
    """Abstract (params, masks [M, L, C], batch, cache) of one call of the mask evaluation, as `mask_effects`
    passes them."""
    batcher, mesh = objective.batcher, objective.batcher.mesh
    host = batcher.batch(batcher.in_order[0], batcher.in_order_shape)
    z = jax.ShapeDtypeStruct((masks, *objective.shape), jnp.float32, sharding=_replicated(mesh))
    cache = _abstract(abstract_cache(objective), _groups(mesh, 0)) if cached else None
    return (objective.params, z, _abstract(host, _groups(mesh, 0)), cache)


def _flops(compiled) -> float:
    """XLA's FLOPs count of a compiled program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def layer_unroll(n_layers: int) -> int | None:
    """The smallest unroll d (1 < d < L, dividing L) that keeps the layer scan a loop of L / d >= 2 iterations;
    None when there is none (L prime, or below 4)."""
    return next((d for d in range(2, n_layers // 2 + 1) if n_layers % d == 0), None)


Program = tuple[Callable[[], Callable], tuple]  # (make: a fresh jitted program, traced anew each call; its arguments)


def analyse(program: Program, n_layers: int, layer_programs: Callable[[], tuple[Program | None, Program, int]]
            ) -> ProgramCost:
    """The per-device cost of a program on abstract arguments, for a model of `n_layers` layers.

    XLA counts the body of the layer scan once; `layer_programs()` gives (a program of the same layers, None for
    `program` itself; that program with its layer scan unrolled by d; d), so that the unrolled one adds
    (d - 1) x one layer's FLOPs (the program itself when L has a divisor that leaves a loop of >= 2 iterations, else
    a 4-layer variant). A fully unrolled stack would count less than the scan runs: XLA then merges the backward
    pass's rematerialised forward with the forward."""
    began = time.perf_counter()
    make, args = program
    compiled = make().lower(*args).compile()
    memory, scanned = compiled.memory_analysis(), _flops(compiled)
    del compiled
    total = scanned
    if n_layers > 1:
        base, (unrolled_make, unrolled_args), unroll = layer_programs()
        once = scanned if base is None else _flops(base[0]().lower(*base[1]).compile())
        unrolled = _flops(unrolled_make().lower(*unrolled_args).compile())
        total = scanned + (n_layers - 1) * (unrolled - once) / (unroll - 1)
    sizes = dict(argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                 alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                 code_bytes=memory.generated_code_size_in_bytes)
    held = sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"] \
        + sizes["code_bytes"]
    return ProgramCost(**sizes, total_bytes=held, flops=total, flops_scanned=scanned,
                       compile_s=time.perf_counter() - began)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of (abstract) arrays, by their shardings (whole where unsharded)."""
    def one(leaf) -> int:
        sharding = getattr(leaf, "sharding", None)
        shape = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
        return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return sum(one(leaf) for leaf in jax.tree.leaves(tree))


def plan_programs(config: ModelConfig, task: EncodedTask | TaskShape, objective: ObjectiveConfig = ObjectiveConfig(),
                  mesh: Mesh | None = None, search: SearchConfig | None = None, runs: int = 1,
                  masks: int | None = None, cache: bool | None = None, cache_limit_bytes: int = 4 << 30,
                  device_memory_bytes: int = 80 << 30, name: str = "", simulated: bool = False) -> PlanReport:
    """The plan of a run of PGB-CT (`search`, default `SearchConfig()`; `runs` runs optimised together) on `task`
    under `objective` (site, metric, batch size, memory budget, attention form: the run's own record) with a model of
    `config`, on this process's devices (`mesh`, None: one device), and of its mask evaluation, `masks` masks a call
    (default: as many as the memory budget admits, as `mask_effects` chooses). The objective is `build_objective`'s
    own, abstract; `cache`, `cache_limit_bytes` as there (whether the task's sources are cached or recomputed every
    step). A `TaskShape`'s pairs are all alike, so only one batch of them is made and packed, whatever its size:
    every batch of the task packs to that batch's shape."""
    if type(runs) is not int or runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")
    if masks is not None and (type(masks) is not int or masks < 1):
        raise ValueError(f"masks must be a positive integer, got {masks!r}")
    search = search or SearchConfig()
    pairs = task.pairs if isinstance(task, TaskShape) else len(task)
    if isinstance(task, TaskShape):
        task = dataclasses.replace(task, pairs=min(task.pairs, objective.batch_size)).encoded()

    def abstract(model_config: ModelConfig, cached: bool) -> Objective:
        return build_objective(model_config, task, objective, mesh=mesh, cache=cached,
                               cache_limit_bytes=cache_limit_bytes)

    cached = resolve_cache(abstract(config, False).spec, pairs, task.arrays.cf_ids.shape[1], cache,
                           cache_limit_bytes)  # decided for every pair of the task, as a run decides
    target = abstract(config, cached)
    spec, batcher = target.spec, target.batcher
    masks = masks or masks_per_chunk(target, 1 << 30)

    def program(variant: Objective, kind: str) -> Program:
        if kind == "training":  # a fresh program at every call: each lowering traces anew
            return (lambda: loop.training_step(variant.fresh(), search)[0],
                    training_arguments(variant, search, runs, cached))
        return lambda: variant.fresh().programs.mask_effects(), evaluation_arguments(variant, masks, cached)

    def cost(kind: str) -> ProgramCost:
        def layer_programs() -> tuple[Program, Program, int]:
            unroll = layer_unroll(config.n_layers)
            base = target if unroll is not None else abstract(config.replace(n_layers=4), cached)
            unroll = unroll or 2
            unrolled = base.replace(spec=dataclasses.replace(base.spec, unroll=unroll))
            return (None if base is target else program(base, kind)), program(unrolled, kind), unroll

        return analyse(program(target, kind), config.n_layers, layer_programs)

    training, evaluation = cost("training"), cost("evaluation")
    train_rows, n_logits = training_shape(target, search)
    return PlanReport(
        model=name, config=config, site=spec.site, metric=spec.metric.name, attention=str(spec.attention),
        batch_size=batcher.batch_size, runs=runs, masks=masks, pairs=pairs,
        mesh={"data": batcher.groups, "model": 1 if mesh is None else mesh.shape["model"]},
        devices=1 if mesh is None else mesh.devices.size,
        platform=(jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform, simulated=simulated,
        packed={"training_rows": train_rows, "evaluation_rows": batcher.in_order_shape[0],
                "row_width": batcher.packer.width, "prefix_slots": batcher.packer.memory_width, "logits": n_logits},
        weight_bytes=shard_bytes(target.params), cache_host_bytes=host_cache_bytes(target, pairs), cached=cached,
        device_memory_bytes=device_memory_bytes, training=training, evaluation=evaluation)
