"""The cost of evaluating a mask by the layer its evaluation starts at (issue 24.1), SmolLM2-135M, WinoBias dev, heads
(attn_pattern), 32 pairs a batch; prints the figures MASKS.md records.

    python benchmarks/mask_cost.py ../shared/data [pairs=64] [layers|mixed|profile|keep|greedy ...: the parts run,
                                                              default all]

1. One call's worth of one-head masks whose lowest gated layer is 0, 10, 20, 29 (all alike): seconds a mask.
2. 54 one-head masks, the lowest gated layer of mask i is i % 30: seconds, and the masks the calls evaluated over
   all batches (padding included). Each after a first call that compiles.
3. XLA's profile (`jax.profiler.trace`) of one call of one batch, starting at layer 0 and at layer 29: the seconds
   its operations took (summed over XLA's threads) by where they go, each operation attributed by the JAX scope it
   came from in the optimised HLO (`start_residual`, the gated layers' loop, `unembedding`: its matmul and the
   log-softmax's normaliser).
4. The keep direction (MIB's: every component patched but the circuit's): the complements of the 54 one-head masks
   of 2., each evaluated from the patched run's residual stream at its start layer, against every one from the
   embeddings (`start_layers` forced to 0, as before the patched start existed): seconds and the largest difference
   of the effects.
5. Greedy's first 8 rounds in the keep direction over 32 random candidate heads: each round's masks from the
   current circuit's run at the layer where they differ from it (`near`), against without `near`: seconds, whether
   the circuits agree and the largest difference of their effects.
"""
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jaxtrace
from jaxtrace.engine import objective as engine
from jaxtrace.tasks import encode_pairs, load_pairs


def one_head_masks(objective, layers: np.ndarray, seed: int = 0) -> np.ndarray:
    masks = np.zeros((len(layers), *objective.shape), np.float32)
    masks[np.arange(len(layers)), layers, np.random.default_rng(seed).integers(0, objective.shape[1], len(layers))] = 1
    return masks


def timed_evaluation(objective, masks) -> tuple[float, int]:
    """(seconds of the faster of two calls after the compiling one, masks its programs evaluated: Σ over batches)."""
    program, evaluated = objective.programs.mask_effects, []

    def counted(start=0):
        def call(params, chunk, batch, cache, *reference):
            evaluated.append(len(chunk))
            return program(start)(params, chunk, batch, cache, *reference)
        return call

    objective.programs.mask_effects = counted
    try:
        engine.mask_effects(objective, masks)
        seconds = []
        for _ in range(2):
            evaluated.clear()
            began = time.perf_counter()
            engine.mask_effects(objective, masks)
            seconds.append(time.perf_counter() - began)
    finally:
        objective.programs.mask_effects = program
    return min(seconds), sum(evaluated)


PARTS = ("start layer's residual (once a call)", "gated layers", "unembedding matmul", "log-softmax normaliser",
         "the rest (gathers, metric)")


def _part(op_name: str, inherited: str | None) -> str | None:
    if "start_residual" in op_name:
        return PARTS[0]
    if "unembedding" in op_name:
        return PARTS[2] if "dot_general" in op_name else PARTS[3]
    if "/while/" in op_name:
        return PARTS[1]
    return inherited or (PARTS[4] if op_name else None)


def hlo_parts(hlo: str) -> dict[str, str]:
    """{instruction name: the PARTS entry it belongs to} for an optimised HLO module's text. An instruction without
    metadata takes its enclosing instruction's part (a while loop's body, a fusion's computation)."""
    computation, instructions, calls = None, {}, {}  # name: (computation, op_name); callee: caller
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        found = re.match(r"^\s*(?:ROOT )?%(\S+) = ", line)
        if not found or computation is None:
            continue
        name = found.group(1)
        op_name = re.search(r'op_name="([^"]*)"', line)
        instructions[name] = (computation, op_name.group(1) if op_name else "")
        for callee in re.findall(r"(?:calls|body|condition|to_apply)=%([\w.-]+)", line):
            calls[callee] = name
    parts: dict[str, str | None] = {}

    def part(name: str) -> str | None:
        if name not in parts:
            computation, op_name = instructions[name]
            caller = calls.get(computation)
            parts[name] = _part(op_name, part(caller) if caller else None)
        return parts[name]

    return {name: part(name) or PARTS[4] for name in instructions}


def profile_call(objective, start: int, masks: np.ndarray) -> tuple[float, dict[str, float]]:
    """(wall seconds of one call of `mask_effects(start)` on the first batch, {part: seconds its operations took,
    summed over XLA's threads}) from `jax.profiler.trace`."""
    batcher = objective.batcher
    batch, cache = batcher.put(objective.inputs(batcher.in_order[0], batcher.in_order_shape))
    args = (objective.params, batcher.replicate(masks), batch, cache) + ((None,) if start else ())  # the clean run
    compiled = objective.programs.mask_effects(start).lower(*args).compile()
    parts = hlo_parts(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            began = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            wall = time.perf_counter() - began
        events = json.loads(gzip.open(next(Path(folder).rglob("*.trace.json.gz"))).read())["traceEvents"]
    seconds = collections.Counter()
    for event in events:  # leaf operations only: a while loop's own event would count its body twice
        if event.get("ph") == "X" and event["name"] in parts and not event["name"].startswith(("while", "call")):
            seconds[parts[event["name"]]] += event["dur"] / 1e6
    return wall, {part: seconds[part] for part in PARTS}


PARTS_RUN = ("layers", "mixed", "profile", "keep", "greedy")  # 1. to 5. above


def main(data: str, n_pairs: int, parts: list[str]) -> None:
    parts = parts or list(PARTS_RUN)
    model, tokenizer = jaxtrace.load_model("smollm2-135m")
    task = encode_pairs(load_pairs("winobias", data, split="dev")[:n_pairs], tokenizer)
    objective = jaxtrace.build_objective(model, task, "attn_pattern", batch_size=32)
    n_layers = objective.shape[0]
    chunk = engine.masks_per_chunk(objective, 10**6)
    print(f"SmolLM2-135M, {len(task)} WinoBias dev pairs, attn_pattern; {chunk} masks a call", flush=True)
    if "layers" in parts:
        for layer in (0, 10, 20, n_layers - 1):
            masks = one_head_masks(objective, np.full(chunk, layer))
            seconds, _ = timed_evaluation(objective, masks)
            start = int(engine.start_layers(objective, masks)[0][0])
            print(f"lowest gated layer {layer:2d} (start {start:2d}): {seconds / len(masks):.3f} s a mask", flush=True)
    if "mixed" in parts:
        masks = one_head_masks(objective, np.arange(54) % n_layers)
        seconds, evaluated = timed_evaluation(objective, masks)
        print(f"54 one-head masks, layers i % {n_layers}: {seconds:.1f} s, {evaluated} masks evaluated over "
              f"{len(objective.batcher.in_order)} batches", flush=True)
    if "profile" in parts:
        rows, n_logits = objective.batcher.in_order_shape
        unembedding = 2 * chunk * n_logits * model.config.d_model * model.config.vocab_size
        for layer in (0, n_layers - 1):
            masks = one_head_masks(objective, np.full(chunk, layer))
            start = int(engine.start_layers(objective, masks)[0][0])
            wall, by_part = profile_call(objective, start, masks)
            total = sum(by_part.values())
            print(f"profile, one call ({chunk} masks, {objective.batcher.batch_size} pairs, {rows} rows, {n_logits} "
                  f"logit positions), start layer {start}: {wall:.2f} s wall, operations {total:.2f} s over threads",
                  flush=True)
            for part, value in by_part.items():
                rate = f", {unembedding / value / 1e9:.0f} GFLOP/s" if part == PARTS[2] and value else ""
                print(f"  {part:38s} {value:6.2f} s {100 * value / total:5.1f} %{rate}", flush=True)
    if "keep" in parts:
        keep_direction(objective, n_layers)
    if "greedy" in parts:
        greedy_rounds(objective)


def keep_direction(objective, n_layers: int) -> None:
    masks = 1.0 - one_head_masks(objective, np.arange(54) % n_layers)
    patched_start, evaluated = timed_evaluation(objective, masks)
    with_start = engine.mask_effects(objective, masks)
    own = engine.start_layers
    engine.start_layers = lambda objective, masks, reference=None: (np.zeros(len(masks), np.int64),
                                                                  np.zeros(len(masks), bool))
    try:
        from_embeddings, _ = timed_evaluation(objective, masks)
        without = engine.mask_effects(objective, masks)
    finally:
        engine.start_layers = own
    print(f"keep direction, 54 one-head circuits (every other head patched): {patched_start:.1f} s from the patched "
          f"run's start layers ({evaluated} masks evaluated), {from_embeddings:.1f} s from the embeddings; effects "
          f"differ by at most {np.abs(with_start - without).max():.1e}", flush=True)


def greedy_rounds(objective, rounds: int = 8, n_candidates: int = 32) -> None:
    """Greedy's first rounds in the keep direction over 32 random candidate heads, each round's masks evaluated
    from the current circuit's run where they differ from it (`near`, as `greedy_path` does) and from the
    patched or clean run only (`near` ignored, as before it existed)."""
    from jaxtrace.engine.methods.greedy import greedy_path

    candidates = np.random.default_rng(1).choice(objective.n_components, n_candidates, replace=False)
    own = engine.circuit_effects
    seconds, paths = {}, {}
    for label, effects in (("near", own), ("without", lambda o, m, d="patch", near=None: own(o, m, d))):
        engine.circuit_effects = effects
        try:
            list(greedy_path(objective, 1, candidates, "keep"))  # compiles the round's programs
            began = time.perf_counter()
            paths[label] = list(greedy_path(objective, rounds, candidates, "keep"))
            seconds[label] = time.perf_counter() - began
        finally:
            engine.circuit_effects = own
    same = all(np.array_equal(a, b) for (a, _), (b, _) in zip(paths["near"], paths["without"]))
    gap = max(abs(a - b) for (_, a), (_, b) in zip(paths["near"], paths["without"]))
    masks = sum(n_candidates - i + 1 for i in range(rounds))
    print(f"greedy, keep direction, {rounds} rounds over {n_candidates} random candidate heads ({masks} masks): "
          f"{seconds['near']:.1f} s from the current circuit's run, {seconds['without']:.1f} s without; the same "
          f"circuits: {same}, effects differ by at most {gap:.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64, sys.argv[3:])
