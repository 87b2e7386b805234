"""Gradient attribution on PGB-CT's objective: the gradient of the task's mean effect with respect to the gates at
many gate points, and from it attribution patching (AtP) and integrated gradients (IG).

    scores = attribution_patching(objective)           # [L, C] d(mean effect)/dz at z = 0
    scores = integrated_gradients(objective, steps=32)  # [L, C], summing to about effect(all) - effect(none)

Both differentiate the metric's trained form (accuracy: its logit-difference surrogate), as PGB-CT does.

In the keep direction (`Objective.circuit_effects`: a kept set C scores IE(A) − IE(A \\ C)) the gates z keep
components clean and the patch weights are 1 − z. AtP there is the gradient of IE(A) − IE(1 − z) at z = 0, i.e. of
the mean effect at every component patched: the first-order estimate of keeping each component alone. Not on edges
(`Site.flat_when_patched`): with every edge patched each reader reads the counterfactual's writers at the gated
positions, so keeping one edge clean changes its reader's output and no later reader's input there: the gradient is
0 on every edge but the embeddings' (whose deltas do not vanish), and those reach the logits only through positions
without gates (SmolLM2-135M on IOI: every gradient below 2e-7). AtP on edges is EAP as MIB scores it, the gradient
at the clean run, in both directions. IG's path from no component kept to all is the patch direction's path
reversed, so its scores are the same in both directions.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxtrace.core.sites import get_site
from jaxtrace.engine.objective import MetricNaNError, Objective, check_finite, masks_per_chunk

BACKWARD_FACTOR = 3  # a backward pass keeps the forward's activations and about twice as much again in cotangents


def mask_gradients(objective: Objective, points) -> tuple[np.ndarray, np.ndarray]:
    """([A, L, C] gradient of the task's mean effect, [A, N] per-pair effects) at each of A gate points [A, L, C].

    Per data batch one forward and backward pass for all points of a chunk (the memory budget over `BACKWARD_FACTOR`
    times one mask's activation bytes, as `jaxtrace.engine.objective.mask_effects` sizes its chunks; the last chunk
    padded); the batches' gradients are summed and divided by the number of pairs.
    """
    batcher = objective.batcher
    points = np.asarray(points, np.float32)
    n_points = points.shape[0]
    chunk = masks_per_chunk(objective, n_points, 1 / BACKWARD_FACTOR)
    padded = batcher.replicate(np.concatenate([points, np.repeat(points[:1], -n_points % chunk, axis=0)]))
    program = objective.programs.gradients()
    grads = np.zeros(points.shape, np.float64)
    effects = np.empty((n_points, len(objective.task)), np.float32)
    for idx in batcher.in_order:
        batch, cache = batcher.put(objective.inputs(idx, batcher.in_order_shape))
        for start in range(0, n_points, chunk):
            stop = min(start + chunk, n_points)
            grad, values = jax.device_get(program(objective.params, padded[start: start + chunk], batch, cache))
            grads[start:stop] += grad[: stop - start]
            effects[start:stop, idx] = values[: stop - start, : len(idx)]
    for point, row in zip(points, effects):
        check_finite(objective, row, np.arange(len(objective.task)), point)
    if not np.isfinite(grads).all():
        raise MetricNaNError("the gradient of the mean effect is not finite")
    return (grads / len(objective.task)).astype(np.float32), effects


def attribution_patching(objective: Objective, direction: str = "patch") -> np.ndarray:
    """[L, C] AtP scores: the gradient of the task's mean effect with respect to the gates at no component patched
    (patch direction) or at every component patched (keep direction: the gradient of the kept effect at nothing
    kept), the first-order estimate of each component's effect alone in that direction; on edges at no edge
    patched in both directions (EAP; module docstring)."""
    at_patched = direction == "keep" and not get_site(objective.spec.site).flat_when_patched
    point = np.full((1, *objective.shape), 1.0 if at_patched else 0.0, np.float32)
    return mask_gradients(objective, point)[0][0]


def ig_alphas(steps: int) -> np.ndarray:
    """[steps] the midpoint rule's nodes (k + 1/2) / steps on [0, 1]."""
    if steps < 1:
        raise ValueError(f"integrated gradients need at least 1 step, got {steps}")
    return (np.arange(steps, dtype=np.float32) + 0.5) / steps


def integrated_gradients(objective: Objective, steps: int = 32) -> np.ndarray:
    """[L, C] IG scores along the straight path z = α·1 from no component (α = 0) to all (α = 1): (1 - 0) times the
    mean gradient of the task's mean effect at the midpoints α_k = (k + 1/2) / steps, all evaluated in one vmapped
    program per batch. Completeness: the scores sum to effect(all) - effect(none) (the latter 0) up to the midpoint
    rule's O(1 / steps²) error. The same scores in the keep direction (module docstring)."""
    points = ig_alphas(steps)[:, None, None] * np.ones((1, *objective.shape), np.float32)
    return mask_gradients(objective, points)[0].mean(0)


ATTRIBUTIONS = ("atp", "ig")


def attribution_scores(objective: Objective, method: str, ig_steps: int = 32,
                       direction: str = "patch") -> np.ndarray:
    """[L, C] the scores of an attribution `method` ("atp" or "ig" with `ig_steps` steps) in `direction`."""
    if method == "atp":
        return attribution_patching(objective, direction)
    if method == "ig":
        return integrated_gradients(objective, ig_steps)
    raise ValueError(f"unknown attribution {method!r}; known: {', '.join(ATTRIBUTIONS)}")
