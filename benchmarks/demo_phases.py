"""Where the demo's wall time goes: `jaxtrace demo`'s trace (SmolLM2-135M, WinoBias dev, attn_pattern), phase by
phase, in one fresh process with empty caches, then again with the caches a first run leaves.

    python benchmarks/demo_phases.py [--data ../shared/data]

Phases: import, model load (GGUF dequantisation and tokenizer; from the converted-model cache the second time),
task encoding, the objective (cached-source precompute, with its compilation), the search (compilation and the
epochs, as the demo runs them), the circuit's effects (the search's last evaluation and its data scale's IE(all):
no evaluation since 2026-12-07) and the result files. Each pass runs in its
own subprocess, with the user cache folder pointed at one fresh folder (`JAXTRACE_CACHE`) so the first pass finds
nothing and the second finds the converted model and the compiled programs. Writes `benchmarks/DEMO.md` and
`demo.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def phases(data: str, out: str) -> dict:
    """Seconds of each phase of the demo's trace in this process."""
    seconds, started = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        seconds[name] = now - started
        started = now

    import jaxtrace
    from jaxtrace.io.cache import enable_compilation_cache
    from jaxtrace.runs.common import Provenance, patch_effects, publish_circuit, result_folder, summarize
    from jaxtrace.runs.trace import checkpointed_search

    enable_compilation_cache()
    lap("import")
    model, tokenizer = jaxtrace.load_model("smollm2-135m")
    lap("load model and tokenizer")
    spec = jaxtrace.TaskSpec("winobias", data)
    task = spec.build(tokenizer)
    lap("encode the task")
    objective = jaxtrace.build_objective(model, task, "attn_pattern")
    lap("objective: cached sources (precompute)")
    config = jaxtrace.SearchConfig()
    provenance = Provenance("smollm2-135m", spec)
    with result_folder(out, "trace", objective, provenance, {}, overwrite=True) as folder:
        result = checkpointed_search(objective, config, folder, False, False)
        lap(f"search: compile + {len(result.history)} epochs")
        effects, effect_all = patch_effects(objective, result.mask, result.effects, result.effect_all)
        circuit = summarize(objective, result.mask, result.z, provenance, "pgbct", {}, result.history,
                            result.seconds, float(effects.mean()), effect_all)
        lap("circuit: its effects (the search's last evaluation)")
        publish_circuit(folder, circuit, effects, objective, result.steps)
        lap("result files")
    return {"seconds": seconds, "selected": circuit.n_selected, "effect": circuit.effect,
            "epochs": len(result.history), "search_s": result.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--phases", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(phases(*args.phases)))
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="jaxtrace-demo-") as scratch:
        env = {**os.environ, "JAXTRACE_CACHE": str(Path(scratch, "cache"))}
        for name in ("first run (empty caches)", "second run (converted model and compiled programs cached)"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--phases", args.data, str(Path(scratch, "out"))],
                                  env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - started
            runs.append({"name": name, "wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(runs[-1], flush=True)
    names = list(runs[0]["seconds"])
    lines = ["# The demo's wall time, phase by phase", "",
             f"`python benchmarks/demo_phases.py` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}: "
             "SmolLM2-135M, WinoBias dev (160 pairs), attn_pattern (270 heads), float32, the demo's defaults "
             f"({runs[0]['epochs']} epochs), each pass a fresh process.", "",
             "| phase | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    lines += [f"| {n} | " + " | ".join(f"{r['seconds'][n]:.1f} s" for r in runs) + " |" for n in names]
    lines += ["| **process wall** | " + " | ".join(f"**{r['wall_s']:.1f} s**" for r in runs) + " |", "",
              "Circuits: " + "; ".join(f"{r['selected']} heads, effect {r['effect']:+.4f}" for r in runs) + "."]
    Path(args.out, "DEMO.md").write_text("\n".join(lines) + "\n")
    Path(args.out, "demo.json").write_text(json.dumps(runs, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
