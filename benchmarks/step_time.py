"""Median wall time of the PGB-CT training step: SmolLM2-135M, WinoBias dev, attn_pattern, batches of 32 pairs (8
steps after a warm-up, batches packed to a 15-epoch run's shape), as `run_search` compiles it.

    python benchmarks/step_time.py ../shared/data

Runs on this tree and on trees before the `RunInputs` step signature (9893a67), so a before/after comparison is
two alternating runs of this script on one machine (PYTHONPATH=<other tree>).
"""
import statistics, sys, time, json
import jax, numpy as np
import jaxtrace
from jaxtrace.core.search import SearchState
from jaxtrace.engine import loop
from jaxtrace.tasks import build_task

model, tok = jaxtrace.load_model("smollm2-135m")
task = build_task("winobias", sys.argv[1], tok, split="dev")
objective = jaxtrace.build_objective(model, task, "attn_pattern", batch_size=32)
config = jaxtrace.SearchConfig(epochs=15)
step, _ = loop.training_step(objective, config)
key = jax.random.key(config.seed)
orders = [objective.batcher.epoch(key, e) for e in range(15)]
shape = objective.batcher.shape([i for o in orders for i in o])
full = [i for o in orders for i in o if len(i) == 32][:9]
batches = [loop.stacked_inputs(objective, [i], shape) for i in full]
state = loop.initial_state(objective, [config])
z, opt = (state.z, state.opt_state) if hasattr(state, "z") else (state["z"], state["opt_state"])
state = objective.batcher.replicate(SearchState(z, opt))
if hasattr(loop, "run_inputs"):
    resolved = loop.resolve(objective, [config])
    extra = (objective.batcher.replicate(loop.run_inputs(objective, resolved, 0, [1.0])),)
else:
    extra = objective.batcher.replicate(tuple(np.array([l], np.float32) for l in config.lambdas(0)))
times = []
for b, c in batches:
    t = time.perf_counter()
    state, _ = step(state, objective.params, b, c, *extra)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
print(json.dumps({"median_step_s": statistics.median(times[1:]), "steps": times[1:]}))
