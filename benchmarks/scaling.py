"""Step time of one PGB-CT search on several device meshes, each in a fresh process with N simulated CPU devices.

    python benchmarks/scaling.py [--model smollm2-135m] [--data ../shared/data] [--steps 5]

Each mesh runs the training step of `jaxtrace.engine.loop` (batch 32 WinoBias-dev pairs, attn_pattern) in its own
subprocess started with `--xla_force_host_platform_device_count=N`; the parent writes `benchmarks/SCALING.md` and
`benchmarks/scaling.json`. Simulated devices share the machine's cores: the differences show the cost of the
sharded program (partitioning, collectives, per-shard packing) and how well the per-device programs fill the cores,
not the speed-up real devices give.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MESHES = [(1, None), (2, "data=2"), (4, "data=4"), (8, "data=8"), (8, "data=4,model=2"), (8, "data=2,model=4")]


def measure(model_spec: str, data: str, mesh_spec: str | None, steps: int) -> dict:
    """Compile time and median step time of the vmapped PGB-CT step on this process's devices."""
    import jax
    import numpy as np

    import jaxtrace
    from jaxtrace.core.search import SearchState
    from jaxtrace.engine import loop
    from jaxtrace.engine.mesh import parse_mesh

    model, tokenizer = jaxtrace.load_model(model_spec)
    task = jaxtrace.build_task("winobias", data, tokenizer, split="dev")
    mesh = None if mesh_spec is None else parse_mesh(mesh_spec)
    objective = jaxtrace.build_objective(model, task, "attn_pattern", 32, mesh=mesh)
    config = jaxtrace.SearchConfig()
    step, _ = loop.training_step(objective.fresh(), config)
    state = loop.initial_state(objective, [config])
    state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
    resolved = loop.resolve(objective, [config])
    inputs = objective.batcher.replicate(loop.run_inputs(objective, resolved, 0, [1.0]))
    orders = [np.random.default_rng(i).permutation(len(task))[:32] for i in range(steps + 1)]
    rows, n_logits = objective.batcher.shape(orders)
    batches = [loop.stacked_inputs(objective, [idx], (rows, n_logits)) for idx in orders]
    start = time.perf_counter()
    compiled = step.lower(state, objective.params, *batches[0], inputs).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, objective.params, *batches[0], inputs))
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, objective.params, *batch, inputs))
        times.append(time.perf_counter() - start)
    return {"mesh": mesh_spec or "single device", "devices": jax.device_count(), "compile_s": compile_s,
            "step_s": float(np.median(times)), "rows_per_group": int(rows),
            "row_width": objective.batcher.packer.width}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--cell", nargs=2, metavar=("DEVICES", "MESH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(args.model, args.data, None if args.cell[1] == "-" else args.cell[1], args.steps)))
        return
    rows = []
    for devices, mesh in MESHES:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--data", args.data,
                               "--steps", str(args.steps), "--cell", str(devices), mesh or "-"],
                              env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]["step_s"]
    lines = [f"# Step time on simulated CPU devices ({args.model}, WinoBias dev, attn_pattern, 32 pairs a step)", "",
             f"{cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Every mesh shares the same "
             "cores: the differences are the cost of the sharded program and how well its per-device programs fill "
             "the cores, not the speed-up of real devices.", "",
             "| mesh | devices | rows per data shard | compile s | median step s | vs single device |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['mesh']} | {r['devices']} | {r['rows_per_group']} x {r['row_width']} | {r['compile_s']:.1f} | "
              f"{r['step_s']:.2f} | {r['step_s'] / base:.2f}x |" for r in rows]
    Path(args.out, "SCALING.md").write_text("\n".join(lines) + "\n")
    Path(args.out, "scaling.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
