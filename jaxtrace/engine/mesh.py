"""Device meshes: examples over `data`, parameters over `model` (tensor parallel), across one or many hosts.

A mesh is written `data=D,model=M` (`--mesh`); the default puts every device on `data`. Parameters carry logical
axis names (`layers, vocab, embed, heads, kv_heads, head_dim, mlp`); `LOGICAL_RULES` maps the tensor-parallel ones to
the `model` axis when the dimension divides evenly (otherwise that dimension stays replicated, e.g. 3 KV heads on
model=2). Batches carry a leading group axis that is split over `data`, each group a self-contained packed batch,
so every gather stays on its device. Gates, optimiser state and RNG keys are replicated.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize`, from its arguments or from the environment
that JAX reads itself (TPU pods, SLURM, Open MPI) or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`. Every process then builds the same host batches and `put` hands each device its own shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import threading
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrace.core.options import option

log = logging.getLogger("jaxtrace")
MESH_AXES = ("data", "model")
LOGICAL_RULES = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Devices and hosts of a run."""

    mesh: str | None = option(None, "device mesh data=D,model=M (default: every device on data): pairs are split "
                              "over data, parameters over model")
    coordinator: str | None = option(None, "multi-host: address host:port of process 0 (default: "
                                     "$JAX_COORDINATOR_ADDRESS, or detected on TPU pods, SLURM and Open MPI)")
    num_processes: int | None = option(None, "multi-host: number of processes ($JAX_NUM_PROCESSES)")
    process_id: int | None = option(None, "multi-host: this process's index ($JAX_PROCESS_ID)")
    coordinator_timeout: int = option(300, "multi-host: seconds to wait for every process to join, then exit with "
                                      "status 2")

    def build(self) -> Mesh | None:
        """Join a multi-host run if one is configured, then the mesh (None on a single device with no --mesh)."""
        initialize_distributed(self.coordinator, self.num_processes, self.process_id, self.coordinator_timeout)
        if self.mesh is None and jax.device_count() == 1:
            return None
        return parse_mesh(self.mesh)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout: int = 300) -> None:
    """Join a multi-process JAX run (no-op for a single process with nothing configured).

    Arguments override the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; with
    none of them set, `jax.distributed.initialize()` is left to detect a TPU pod, SLURM or Open MPI itself, and
    nothing is done on a plain machine. A process whose peers have not all joined within `timeout` seconds ends
    with one line and exit status 2 (`exit_unless_joined`).
    """
    if type(timeout) is not int or timeout < 1:
        raise ValueError(f"--coordinator-timeout must be a positive number of seconds, got {timeout!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    cluster = any(key in env for key in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if process_id is not None and process_id < 0:
        raise ValueError(f"--process-id must be >= 0, got {process_id}")
    if process_id is not None and num_processes is not None and process_id >= num_processes:
        raise ValueError(f"--process-id {process_id} is outside 0..{num_processes - 1} (--num-processes "
                         f"{num_processes})")
    if coordinator is None and not cluster:
        if (num_processes or 1) > 1 or (process_id or 0) > 0:
            raise ValueError(f"--num-processes {num_processes} --process-id {process_id} describe a multi-process "
                             "run, which needs --coordinator host:port (or $JAX_COORDINATOR_ADDRESS); a "
                             "single-process run takes neither")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP (tests, CI)
    # JAX's preemption service takes SIGTERM for a sync point jaxtrace never asks for: the process would ignore it.
    jax.config.update("jax_enable_preemption_service", False)
    who = "this process" if process_id is None else f"process {process_id}"
    where = "the detected cluster's coordinator" if coordinator is None else f"coordinator {coordinator}"
    awaited = "the processes" if num_processes is None else f"all {num_processes} processes"
    log.info(f"hosts      {who} waits at {where} for {awaited} to join (--coordinator-timeout {timeout} s)")
    with exit_unless_joined(f"{who} waited {timeout} s at {where} for {awaited} to join, and not all did "
                            f"(--coordinator-timeout {timeout}): start every process with the same --coordinator "
                            "and --num-processes", timeout):
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout + 60)  # never reached
    if jax.process_count() > 1 and jax.default_backend() == "cpu" and jax.config.jax_enable_compilation_cache:
        # Measured with jax 0.12.1 (gloo): a program one process loads from the persistent cache while its peer
        # compiles it, or loads it too, deadlocks in its first collective. CPU processes compile every program.
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("cache      compiled-program cache not used: CPU processes of a multi-process run compile anew")


@contextlib.contextmanager
def exit_unless_joined(message: str, timeout: int):
    """Exit the process with `jaxtrace: error: message` and status 2 unless the block ends within `timeout`
    seconds: `jax.distributed.initialize` waits in C++ and cannot be interrupted, and at its own deadline it
    aborts the process (a C++ stack, status 134)."""
    def give_up():
        sys.stdout.flush()
        print(f"jaxtrace: error: {message}", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def is_writer() -> bool:
    """Whether this process writes result files (process 0; every process joins collective checkpoints). Before
    `initialize_distributed` every process is one (asking JAX its index would start its backend too early)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def parse_mesh(spec: str | None = None, devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh from "data=D,model=M" (either may be omitted; the other fills the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes: dict[str, int] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh takes data=D,model=M with positive integers, got {spec!r}")
        sizes[name] = int(value)
    missing = [axis for axis in MESH_AXES if axis not in sizes]
    if len(missing) == 2:
        sizes = {"data": len(devices), "model": 1}
    elif missing:
        known = math.prod(sizes.values())
        if len(devices) % known:
            raise ValueError(f"--mesh {spec}: {len(devices)} devices are not a multiple of {known}")
        sizes[missing[0]] = len(devices) // known
    if sizes["data"] * sizes["model"] != len(devices):
        raise ValueError(f"--mesh {spec} needs {sizes['data'] * sizes['model']} devices; there are {len(devices)}")
    grid = np.array(devices).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, MESH_AXES)


def _mesh_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Logical axis names -> mesh axes, replicating any dimension the mesh axis does not divide."""
    axes = []
    for name, size in zip(logical, shape):
        axis = LOGICAL_RULES.get(name)
        axes.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*axes)


def _placed(params: nnx.State, mesh: Mesh, place) -> nnx.State:
    """The parameters with each leaf x replaced by place(x, its sharding on `mesh` from its logical axis names)."""
    values = nnx.to_pure_dict(params)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
    placed = jax.tree.map(lambda spec, x: place(x, NamedSharding(mesh, _mesh_spec(spec, x.shape, mesh))),
                          logical, values, is_leaf=lambda x: isinstance(x, PartitionSpec))
    out = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(out, placed)
    return out


def shard_params(params: nnx.State, mesh: Mesh) -> nnx.State:
    """The model's parameters placed on `mesh` by their logical axis names (tensor parallel over `model`)."""
    return _placed(params, mesh, lambda x, sharding: put(np.asarray(x), sharding))


def abstract_params(params: nnx.State, mesh: Mesh | None) -> nnx.State:
    """The parameters as `jax.ShapeDtypeStruct`s (of real or abstract ones, e.g. from `nnx.eval_shape`), with the
    shardings `shard_params` would give them on `mesh`: what lowering a program for them needs, without weights."""
    if mesh is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return _placed(params, mesh, lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))


def put(array: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full; each device gets its own shard."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_groups(tree: Any, mesh: Mesh, group_axis: int = 0) -> Any:
    """Every host array of a pytree (a batch, its cache), split over `data` along its group axis (other axes
    replicated)."""
    sharding = NamedSharding(mesh, PartitionSpec(*([None] * group_axis), "data"))
    return jax.tree.map(lambda array: put(array, sharding), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole by every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of a pytree replicated on the mesh."""
    return jax.tree.map(lambda x: put(np.asarray(x), replicated(mesh)), tree)


def jit(fn, mesh: Mesh | None = None, **kwargs):
    """`jax.jit(fn)`, with every output replicated on a mesh (so each process can read it)."""
    if mesh is None:
        return jax.jit(fn, **kwargs)
    return jax.jit(fn, out_shardings=replicated(mesh), **kwargs)
