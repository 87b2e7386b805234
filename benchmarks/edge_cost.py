"""What the `edges` site costs on SmolLM2-135M (issue 22): IOI prompts, batches of 8; prints the figures EDGES.md
records. Each timing after a first call that compiles.

    python benchmarks/edge_cost.py [prompts=32] [masks=3]

- the objective: model load and the counterfactual writers cached (seconds), the edges E as MIB counts them;
- EAP (`attribution_patching`: the gradient at the clean run, one forward and backward a batch): seconds;
- mask evaluation: `masks` random masks (5 % of the edges, keep direction) a call over every prompt: seconds a mask;
- the training step of one budgeted run (forward, backward, Adam; one batch): the median of 4 steps, and XLA's
  planned temporaries of its compiled program;
- the process's peak resident memory.
"""
import resource
import sys
import time

import jax
import numpy as np

import jaxtrace
from jaxtrace.core.search import SearchState
from jaxtrace.engine.attribution import attribution_patching
from jaxtrace.engine.loop import Runs, initial_state, run_inputs, stacked_inputs


def main(n_prompts: int = 32, n_masks: int = 3) -> None:
    began = time.perf_counter()
    model, tokenizer = jaxtrace.load_model("smollm2-135m")
    task = jaxtrace.build_task("ioi", None, tokenizer, ioi_prompts=n_prompts)
    objective = jaxtrace.build_objective(model, task, "edges", batch_size=8)
    print(f"SmolLM2-135M, IOI ({len(task)} prompts, batches of 8), {objective.n_components:,} edges; objective "
          f"{time.perf_counter() - began:.1f} s", flush=True)
    for label in ("first (compiles)", "second"):
        began = time.perf_counter()
        attribution_patching(objective)
        print(f"EAP, {label}: {time.perf_counter() - began:.1f} s", flush=True)
    masks = (np.random.default_rng(0).random((n_masks, *objective.shape)) >= 0.05).astype(np.float32)
    for label in ("first (compiles)", "second"):
        began = time.perf_counter()
        objective.mask_effects(masks)
        seconds = time.perf_counter() - began
        print(f"{n_masks} masks, {label}: {seconds:.1f} s, {seconds / n_masks:.2f} s a mask", flush=True)
    runs = Runs.of(objective, [jaxtrace.SearchConfig(budget=100)])
    program, _ = objective.programs.training_step(runs.config)
    state = initial_state(objective, runs)
    search_state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
    inputs = objective.batcher.replicate(run_inputs(objective, runs.configs, 0, np.ones(1, np.float32)))
    batch, cache = stacked_inputs(objective, [objective.batcher.in_order[0]], None)
    temp = program.lower(search_state, objective.params, batch, cache, inputs).compile().memory_analysis()
    seconds = []
    for _ in range(5):
        began = time.perf_counter()
        search_state, stats = program(search_state, objective.params, batch, cache, inputs)
        jax.block_until_ready(stats)
        seconds.append(time.perf_counter() - began)
    print(f"training step (one run, one batch): median {np.median(seconds[1:]):.2f} s; XLA temp "
          f"{temp.temp_size_in_bytes / 2**30:.2f} GiB", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB", flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
