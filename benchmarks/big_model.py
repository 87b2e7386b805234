"""A 1B-parameter trace on this machine: a random-weight model of Llama-3.2-1B's shape (16 layers, width 2048, 32
query / 8 KV heads, vocabulary 128,256) on WinoBias dev heads, float32 and bfloat16, attn_pattern and head_out.

    python benchmarks/big_model.py [--epochs 3] [--cells attn_pattern:float32 head_out:bfloat16 ...]

Each cell runs in a fresh process: the model is initialised (normal(0, 0.02) weights), the task encoded with
SmolLM2's tokenizer (its ids fit the vocabulary), the objective built (cached sources), then the training step is
timed (median of 3 after a warm-up) and `--epochs` epochs are run; the 15-epoch run is extrapolated from them (setup
+ compile + 15 x the mean epoch). Peak memory is the process's peak RSS. Writes `benchmarks/BIG.md`, `big.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELLS = ("attn_pattern:float32", "attn_pattern:bfloat16", "head_out:float32", "head_out:bfloat16")


def cell(site: str, dtype: str, data: str, epochs: int) -> dict:
    import jax
    import numpy as np

    import jaxtrace
    from jaxtrace.core.search import SearchState
    from jaxtrace.engine import loop
    from jaxtrace.io.loading import load_config, tokenizer_for

    started = time.perf_counter()
    config = load_config("llama-3.2-1b", dtype=dtype)
    model = jaxtrace.init_model(config)
    tokenizer = tokenizer_for("smollm2-135m")
    init_s = time.perf_counter() - started
    task = jaxtrace.build_task("winobias", data, tokenizer, split="dev")
    started = time.perf_counter()
    objective = jaxtrace.build_objective(model, task, site)
    setup_s = time.perf_counter() - started
    search = jaxtrace.SearchConfig(epochs=epochs, patience=0)
    step, _ = loop.training_step(objective.fresh(), search)
    state = loop.initial_state(objective, [search])
    state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
    resolved = loop.resolve(objective, [search])
    inputs = objective.batcher.replicate(loop.run_inputs(objective, resolved, 0, [1.0]))
    orders = objective.batcher.epoch(jax.random.key(search.seed), 0)
    shape = objective.batcher.shape(orders)
    batches = [loop.stacked_inputs(objective, [idx], shape) for idx in orders[:4]]
    started = time.perf_counter()
    compiled = step.lower(state, objective.params, *batches[0], inputs).compile()
    compile_s = time.perf_counter() - started
    times = []
    for batch in batches:
        started = time.perf_counter()
        jax.block_until_ready(compiled(state, objective.params, *batch, inputs))
        times.append(time.perf_counter() - started)
    del batches, compiled
    started = time.perf_counter()
    result = jaxtrace.run_search(objective, search)
    run_s = time.perf_counter() - started
    epoch_s = result.history[-1].seconds / len(result.history)
    return {"site": site, "dtype": dtype, "params_m": config.n_params / 1e6, "pairs": len(task),
            "init_s": init_s, "setup_s": setup_s, "compile_s": compile_s, "step_s": statistics.median(times[1:]),
            "epochs_run": len(result.history), "run_s": run_s, "epoch_s": epoch_s,
            "run_15_s": setup_s + (run_s - result.history[-1].seconds) + 15 * epoch_s,
            "selected": int(result.mask.sum()), "effect": result.history[-1].effect,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(*args.cell, args.data, args.epochs)))
        return
    rows = []
    for name in args.cells:
        site, dtype = name.split(":")
        done = subprocess.run([sys.executable, __file__, "--cell", site, dtype, "--data", args.data,
                               "--epochs", str(args.epochs)], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["# A 1B-parameter trace on this CPU (random weights of Llama-3.2-1B's shape, WinoBias dev heads)", "",
             f"`python benchmarks/big_model.py --epochs {args.epochs}` on {os.cpu_count()} CPU cores, "
             f"{time.strftime('%Y-%m-%d')}; 160 pairs, batches of 32 (5 steps an epoch), every epoch run (no early "
             f"stop); the 15-epoch run is setup + compile + 15 x the measured epochs' mean.", "",
             "| site | dtype | setup s | compile s | median step s | epochs run | 15-epoch run s | peak RSS GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['site']} | {r['dtype']} | {r['setup_s']:.1f} | {r['compile_s']:.1f} | {r['step_s']:.2f} | "
              f"{r['epochs_run']} | {r['run_15_s']:,.0f} | {r['peak_rss_gb']:.1f} |" for r in rows]
    Path(args.out, "BIG.md").write_text("\n".join(lines) + "\n")
    Path(args.out, "big.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
