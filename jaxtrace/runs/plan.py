"""`plan`: the per-device memory and FLOPs of a run before it runs, for any model config and task, on this
process's devices or on N simulated ones.

    report = plan("llama-3.1-8b", TaskShape(pairs=1000, prompt_tokens=16), dtype="bfloat16", devices=64,
                  mesh="data=8,model=8")
    print(format_plan(report))

The model is a shape preset, a registered name, an HF folder, a `config.json`, a `.gguf` file (its metadata only), an
HF config dict or a `ModelConfig`; the task a `TaskShape` (sizes), a `TaskSpec` (built with the model's tokenizer,
which needs no weights) or an `EncodedTask`. The analysis is `jaxtrace.engine.plan.plan_programs`. With `devices=N`
it runs in a subprocess started with `XLA_FLAGS=--xla_force_host_platform_device_count=N` on the CPU platform: the
numbers are what XLA:CPU plans per device for the sharded program (GPU and TPU compilers plan their own buffers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxtrace.core.errors import first_line, typed_line
from jaxtrace.core.models import ModelConfig
from jaxtrace.core.options import option
from jaxtrace.core.records import TaskArrays
from jaxtrace.core.search import SearchConfig
from jaxtrace.core.sites import gate_shape
from jaxtrace.engine.mesh import parse_mesh
from jaxtrace.engine.objective import ObjectiveConfig
from jaxtrace.engine.plan import PlanReport, ProgramCost, TaskShape, plan_programs
from jaxtrace.io.loading import load_config, tokenizer_for
from jaxtrace.tasks import EncodedTask, Noise, PromptPair, TaskSpec

DEVICE_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What `plan` is asked beyond the model, task, objective and mesh."""

    devices: int | None = option(None, "simulate N CPU devices, in a subprocess (default: this process's devices)")
    masks: int | None = option(None, "masks per evaluation call (default: as many as --memory-gb admits)")
    runs: int = option(1, "runs optimised together (a λ sweep)")
    device_memory_gb: float = option(80.0, "memory of one device, for the fits column")

    def __post_init__(self):
        for name in ("devices", "masks", "runs"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.device_memory_gb) and self.device_memory_gb > 0):
            raise ValueError(f"--device-memory-gb must be a positive number, got {self.device_memory_gb}")


def plan(model: str | Path | dict | ModelConfig = "smollm2-135m",
         task: TaskShape | TaskSpec | EncodedTask | None = None, objective: ObjectiveConfig | str | None = None, *,
         dtype: str | None = None, mesh: str | None = None, devices: int | None = None, masks: int | None = None,
         runs: int = 1, device_memory_gb: float = 80.0, tokenizer: str | Path | None = None,
         search: SearchConfig | None = None) -> PlanReport:
    """The plan of a PGB-CT run (`search`, default `SearchConfig()`; `runs` runs vmapped) of `model` on `task`
    (default: `TaskShape()`) under `objective` (the run's `ObjectiveConfig`, or a site: site, metric (default the
    task's), batch size, memory budget and attention form, resolved as the run resolves them on these devices),
    on `mesh` ("data=D,model=M"; default: every device on data) over this process's devices or `devices` simulated
    CPU devices; and of its mask evaluation, `masks` a call (default: as many as the memory budget admits).
    `dtype`: the model's (default: float32, or a `ModelConfig`'s own)."""
    PlanConfig(devices, masks, runs, device_memory_gb)
    objective = ObjectiveConfig() if objective is None else \
        ObjectiveConfig(site=objective) if isinstance(objective, str) else objective
    request = {"model": dataclasses.asdict(model) if isinstance(model, ModelConfig) else
               model if isinstance(model, dict) else str(model),
               "model_is_config": isinstance(model, ModelConfig), "dtype": dtype,
               "objective": dataclasses.asdict(objective), "mesh": mesh, "masks": masks, "runs": runs,
               "device_memory_gb": device_memory_gb, "tokenizer": None if tokenizer is None else str(tokenizer),
               "search": dataclasses.asdict(search or SearchConfig())}
    if devices is None or devices == jax.device_count():
        simulated = jax.devices()[0].platform == "cpu" and jax.device_count() > 1  # host devices are forced
        return _plan(request, _as_task(task), simulated)
    with tempfile.TemporaryDirectory(prefix="jaxtrace-plan-") as scratch:
        request["task"] = _task_record(task, Path(scratch))
        return _simulated(request, devices, Path(scratch))


def _as_task(task):
    return TaskShape() if task is None else task


def _plan(request: dict, task, simulated: bool) -> PlanReport:
    """The plan of a request (see `plan`) on this process's devices."""
    model = request["model"]
    if request["model_is_config"]:
        config = ModelConfig.from_dict(model)
        config = config if request["dtype"] is None else config.replace(dtype=request["dtype"])
        name = f"{config.model_type} config"
    else:
        config = load_config(model, request["dtype"] or "float32")
        name = "config dict" if isinstance(model, dict) else model
    if isinstance(task, TaskSpec):
        named = not (request["model_is_config"] or isinstance(model, dict))  # a name, folder or file
        tokenizer = (tokenizer_for(model, request["tokenizer"]) if named else
                     tokenizer_for(None, request["tokenizer"]) if request["tokenizer"] else None)
        task = task.build(tokenizer)
    mesh = request["mesh"]
    mesh = parse_mesh(mesh) if mesh is not None or jax.device_count() > 1 else None
    return plan_programs(config, task, ObjectiveConfig(**request["objective"]), mesh,
                         SearchConfig(**request["search"]), request["runs"], request["masks"],
                         device_memory_bytes=int(request["device_memory_gb"] * 2**30), name=name,
                         simulated=simulated)


def _task_record(task, scratch: Path) -> dict:
    """A task as JSON for the subprocess (an encoded task's arrays in an .npz file in `scratch`)."""
    task = _as_task(task)
    if isinstance(task, TaskShape):
        return {"shape": dataclasses.asdict(task)}
    if isinstance(task, TaskSpec):
        return {"spec": {"task": task.task, "data": task.data, "options": task.options()}}
    path = scratch / "task.npz"
    np.savez(path, **dataclasses.asdict(task.arrays))
    return {"arrays": str(path), "pad_id": task.pad_id, "n_targets": task.arrays.ids.shape[1],
            "noise": None if task.noise is None else dataclasses.asdict(task.noise)}


def _task_from_record(record: dict):
    if "shape" in record:
        return TaskShape(**record["shape"])
    if "spec" in record:
        spec = record["spec"]
        return TaskSpec.from_record(spec["task"], spec["data"], spec["options"])
    with np.load(record["arrays"]) as data:
        arrays = TaskArrays(**{f.name: data[f.name] for f in dataclasses.fields(TaskArrays)})
    targets = tuple(f"target {k}" for k in range(record["n_targets"]))
    pairs = tuple(PromptPair("base", "counterfactual", targets) for _ in range(len(arrays.index)))
    noise = None if record["noise"] is None else Noise(**record["noise"])
    return EncodedTask(pairs, (), noise, record["pad_id"], arrays)


def _simulated(request: dict, devices: int, scratch: Path) -> PlanReport:
    """The plan computed in a subprocess that sees `devices` CPU devices."""
    request_path, out_path = scratch / "request.json", scratch / "plan.json"
    request_path.write_text(json.dumps(request))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env = {**os.environ, "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"]), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "jaxtrace.runs.plan", str(request_path), str(out_path)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1].removeprefix("plan: error: ") if lines else
                           f"the plan subprocess failed with exit status {done.returncode}")
    return PlanReport.from_dict(json.loads(out_path.read_text()))


def _scaled(n: float, units) -> str:
    """n in the largest of `units` ((name, scale), largest first; the last scale 1) it reaches, 3 digits."""
    unit, scale = next(((u, s) for u, s in units if abs(n) >= s), units[-1])
    value = n / scale
    return f"{value:.3g} {unit}" if abs(value) < 999.5 else f"{value:.0f} {unit}"


def size(n: float) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB."""
    return _scaled(n, (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)))


def flop(n: float) -> str:
    return _scaled(n, (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("FLOP", 1)))


def format_plan(report: PlanReport) -> str:
    """A small table: the run's shapes, then per program the per-device memory and FLOPs."""
    c, packed = report.config, report.packed
    prefix = f" (+{packed['prefix_slots']} prefix slots)" if packed["prefix_slots"] else ""
    where = (f"{report.devices} simulated CPU devices: XLA:CPU's plan of the sharded program (GPU and TPU compilers "
             "plan their own buffers)" if report.simulated else
             f"{report.devices} {report.platform.upper()} device{'s' * (report.devices > 1)}")
    n_params = _scaled(c.n_params, (("B", 1e9), ("M", 1e6), ("", 1))).replace(" ", "")
    lines = [
        f"model      {report.model}: {c.model_type}, {n_params} parameters, {c.dtype}; {report.site} gates "
        f"{list(gate_shape(c, report.site))}; {report.metric}; {report.attention} attention",
        f"task       {report.pairs} pairs, batches of {report.batch_size}; per data group a step packs "
        f"{packed['training_rows']} rows, an evaluation {packed['evaluation_rows']}, of {packed['row_width']} "
        f"tokens{prefix}; {report.runs} run{'s' * (report.runs > 1)} a step",
        f"devices    {where}; mesh data={report.mesh['data']} x model={report.mesh['model']}",
        f"cache      {size(report.cache_host_bytes)} of sources on the host"
        + ("" if report.cached else " (over the cache limit: every step recomputes them)"),
        "",
        f"{'per device':<24}{'weights':>11}{'arguments':>11}{'outputs':>11}{'temp':>11}{'total':>11}"
        f"{'compute':>13}  fits {report.device_memory_bytes / 2**30:g} GiB",
    ]
    if report.platform == "cpu" and c.dtype == "bfloat16":
        lines[4:4] = ["note       XLA:CPU computes bfloat16 matmuls in float32: its temp holds float32 copies of the "
                      "weights (GPU and TPU compilers do not)"]
    rows = (("training step", report.training, "training"),
            (f"mask evaluation (M={report.masks})", report.evaluation, "evaluation"))
    for label, cost, key in rows:
        lines.append(f"{label:<24}{size(report.weight_bytes):>11}{size(cost.argument_bytes):>11}"
                     f"{size(cost.output_bytes - cost.alias_bytes):>11}{size(cost.temp_bytes):>11}"
                     f"{size(cost.total_bytes):>11}{flop(cost.flops):>13}  {'yes' if report.fits[key] else 'NO'}")
    return "\n".join(lines)


def _error_line(error: BaseException) -> str:
    first = first_line(error)
    if isinstance(error, (ValueError, FileNotFoundError, MemoryError, RuntimeError)) and first:
        return first
    return typed_line(error, 300)


def main(request_path: str, out_path: str) -> int:
    """The subprocess: plan a request (JSON) on this process's (simulated) devices, write the report (JSON)."""
    try:
        request = json.loads(Path(request_path).read_text())
        report = _plan(request, _task_from_record(request.pop("task")), simulated=True)
    except Exception as error:  # one line for the parent
        if os.environ.get("JAXTRACE_DEBUG"):
            raise
        print(f"plan: error: {_error_line(error)}", file=sys.stderr)
        return 2
    Path(out_path).write_text(json.dumps(report.to_dict()))
    return 0


__all__ = ["PlanConfig", "PlanReport", "ProgramCost", "TaskShape", "format_plan", "plan"]

if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
