"""attn_pattern's two forms on SmolLM2-135M at prompt lengths T: cached source bytes per pair and the training step.

    python benchmarks/pattern_forms.py [--lengths 32 256 1024] [--steps 3]

The explicit form caches each pair's counterfactual pattern (H·T² floats a layer); the fused form its post-RoPE
queries and keys ((H + K)·T·Dh) and runs two attention calls. The prompts are WinoBias dev sentences repeated to T
tokens with the counterfactual differing in the first word, so no prefix is shared and every token is computed;
pairs per batch shrink with T (32, 8, 2 at 32, 256, 1024 tokens; rows of at most 256 tokens pack several pairs, so
from T = 256 on a row holds one pair). Writes `benchmarks/PATTERN.md` and `pattern.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = {32: 32, 256: 8, 1024: 2}


def long_pairs(tokenizer, data: str, length: int, n: int):
    """n pairs whose prompts have `length` tokens: WinoBias base prompts, repeated, the counterfactual's first word
    swapped ("The" -> "A") so that base and counterfactual differ from the first token on."""
    from jaxtrace.tasks import PromptPair, load_pairs

    pairs = []
    for pair in load_pairs("winobias", data, split="dev")[:n]:
        text = pair.base
        while len(tokenizer(text)["input_ids"]) < length:
            text = f"{pair.base}. {text}"
        ids = tokenizer(text)["input_ids"][-length:]
        base = tokenizer.decode(ids)
        pairs.append(PromptPair(base, "A" + base[len(base.split(" ")[0]):], pair.targets, label=pair.label))
    return pairs


def measure(model, tokenizer, data: str, length: int, attention: str, steps: int) -> dict:
    import jax
    import numpy as np

    import jaxtrace
    from jaxtrace.core.search import SearchState
    from jaxtrace.core.sites import source_bytes_per_pair
    from jaxtrace.engine import loop
    from jaxtrace.tasks import encode_pairs

    n = PAIRS.get(length, 2)
    task = encode_pairs(long_pairs(tokenizer, data, length, n), tokenizer)
    started = time.perf_counter()
    objective = jaxtrace.build_objective(model, task, "attn_pattern", batch_size=n, attention=attention)
    setup_s = time.perf_counter() - started
    config = jaxtrace.SearchConfig()
    step, _ = loop.training_step(objective.fresh(), config)
    state = loop.initial_state(objective, [config])
    state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
    resolved = loop.resolve(objective, [config])
    inputs = objective.batcher.replicate(loop.run_inputs(objective, resolved, 0, [1.0]))
    batch = loop.stacked_inputs(objective, [np.arange(len(task))])
    started = time.perf_counter()
    compiled = step.lower(state, objective.params, *batch, inputs).compile()
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        jax.block_until_ready(compiled(state, objective.params, *batch, inputs))
        times.append(time.perf_counter() - started)
    prompt = int(task.arrays.cf_mask.sum(1).max())
    return {"length": length, "prompt_tokens": prompt, "attention": attention, "pairs": n,
            "source_bytes_per_pair": source_bytes_per_pair(model.config, "attn_pattern", prompt, 0, attention),
            "setup_s": setup_s, "compile_s": compile_s, "step_s": statistics.median(times[1:]),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--forms", nargs="+", default=["explicit", "fused"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    import jax

    import jaxtrace

    model, tokenizer = jaxtrace.load_model("smollm2-135m", dtype="float32")
    rows = []
    for length in args.lengths:
        for attention in args.forms:
            try:
                rows.append(measure(model, tokenizer, args.data, length, attention, args.steps))
            except jax.errors.JaxRuntimeError as error:  # out of memory: say so, and go on
                rows.append({"length": length, "prompt_tokens": length, "attention": attention,
                             "pairs": PAIRS.get(length, 2), "error": str(error).splitlines()[0][:120]})
            print(rows[-1], flush=True)
            jax.clear_caches()
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    lines = ["# attn_pattern: explicit patterns against the fused form (SmolLM2-135M, float32)", "",
             f"{device}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/pattern_forms.py`. One training step (forward, "
             "backward, Adam) on one batch, median of "
             f"{args.steps} after a warm-up; no shared prefix (every token computed).", "",
             "| prompt tokens | pairs | form | cached source per pair | step s | compile s | step temporaries |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['prompt_tokens']} | {r['pairs']} | {r['attention']} | – | {r['error']} | – | – |")
            continue
        lines.append(f"| {r['prompt_tokens']} | {r['pairs']} | {r['attention']} | "
                     f"{r['source_bytes_per_pair'] / 2**20:,.1f} MiB | {r['step_s']:.2f} | {r['compile_s']:.1f} | "
                     f"{r['temp_bytes'] / 2**20:,.0f} MiB |")
    Path(args.out, "PATTERN.md").write_text("\n".join(lines) + "\n")
    Path(args.out, "pattern.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
