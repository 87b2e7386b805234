"""The cost of evaluating a mask by the layer its evaluation starts at (issue 24.1), SmolLM2-135M, WinoBias dev, heads
(attn_pattern), 32 pairs a batch; prints the figures MASKS.md records.

    python benchmarks/mask_cost.py ../shared/data [pairs=64]

1. One call's worth of one-head masks whose lowest gated layer is 0, 10, 20, 29 (all alike): seconds a mask.
2. 54 one-head masks, the lowest gated layer of mask i is i % 30: seconds, and the masks the calls evaluated over
   all batches (padding included). Each after a first call that compiles.
"""
import sys
import time

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
        def call(params, chunk, batch, cache):
            evaluated.append(len(chunk))
            return program(start)(params, chunk, batch, cache)
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


def main(data: str, n_pairs: int) -> None:
    model, tokenizer = jaxtrace.load_model("smollm2-135m")
    task = encode_pairs(load_pairs("winobias", data, split="dev")[:n_pairs], tokenizer)
    objective = jaxtrace.build_objective(model, task, "attn_pattern", batch_size=32)
    n_layers = objective.shape[0]
    chunk = engine.masks_per_chunk(objective, 10**6)
    print(f"SmolLM2-135M, {len(task)} WinoBias dev pairs, attn_pattern; {chunk} masks a call", flush=True)
    for layer in (0, 10, 20, n_layers - 1):
        masks = one_head_masks(objective, np.full(chunk, layer))
        seconds, _ = timed_evaluation(objective, masks)
        start = int(engine.start_layers(objective, masks)[0])
        print(f"lowest gated layer {layer:2d} (start {start:2d}): {seconds / len(masks):.3f} s a mask", flush=True)
    masks = one_head_masks(objective, np.arange(54) % n_layers)
    seconds, evaluated = timed_evaluation(objective, masks)
    print(f"54 one-head masks, layers i % {n_layers}: {seconds:.1f} s, {evaluated} masks evaluated over "
          f"{len(objective.batcher.in_order)} batches", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64)
