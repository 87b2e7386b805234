"""Metrics: per-example effects of the gates, computed from target log-probabilities; and the transformations
that turn an effect into the term PGB-CT minimises.

A metric's `effect(gated, base, pairs) -> [B]` (larger = stronger effect) receives, for the gated and the ungated
forward of the base prompts, `Outputs` records (`jaxtrace.core.records`) with
  .targets: [B, Y] mean log-probability of each target's tokens after the prompt (Y = 1 or 2 targets),
  .last:    [B, V] log-softmax of the next token at the last prompt position (ungated: only if `uses_last`),
and the batch's `PairArrays` (`pairs.sign` [B] ±1, `pairs.keep` [B] 1 for invariance pairs, `pairs.target_ids`
[B, Y, U]). Write your own the same way:

    my_metric = Metric("logprob_gain", lambda gated, base, pairs: gated.targets[:, 1] - base.targets[:, 1])
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Metric:
    """`ratio`: effects are r - 1 with r > 0 (every transformation applies). `uses_last`: needs "last".
    `surrogate`: the differentiable metric trained in its place (for accuracy)."""

    name: str
    effect: Callable[[dict, dict, dict], jax.Array]
    ratio: bool = False
    uses_last: bool = False
    surrogate: Metric | None = None

    @property
    def trained(self) -> Metric:
        return self.surrogate or self


def log_odds(scores: jax.Array) -> jax.Array:
    """[B] log score(t1) - log score(t0) for two targets, -log score(t0) for one."""
    return -scores[:, 0] if scores.shape[1] == 1 else scores[:, 1] - scores[:, 0]


def _log_ratio(gated, base, pairs):
    return pairs.sign * (log_odds(gated.targets) - log_odds(base.targets))


def _logit_difference(gated, base, pairs):
    """The change of the log-odds; for invariance pairs (`keep`) minus its square, so no change is best."""
    change = _log_ratio(gated, base, pairs)
    return jnp.where(pairs.keep > 0, -jnp.square(change), change)


def _accuracy(gated, base, pairs):
    """1 where the gated top next token is the first token of the wanted target: the one the effect favours
    (t1 for sign +1), or the base answer t0 for invariance pairs."""
    switch = (pairs.sign > 0) & (pairs.keep == 0)
    wanted = jnp.where(switch, pairs.target_ids[:, -1, 0], pairs.target_ids[:, 0, 0])
    return (jnp.argmax(gated.last, axis=-1) == wanted).astype(jnp.float32)


PROBABILITY_RATIO = Metric("probability_ratio", lambda g, b, pairs: jnp.expm1(_log_ratio(g, b, pairs)), ratio=True)
LOGIT_DIFFERENCE = Metric("logit_difference", _logit_difference)
KL_DIVERGENCE = Metric("kl_divergence", lambda g, b, pairs: jnp.sum(jnp.exp(b.last) * (b.last - g.last), -1),
                       uses_last=True)
ACCURACY = Metric("accuracy", _accuracy, uses_last=True, surrogate=LOGIT_DIFFERENCE)

METRICS: dict[str, Metric] = {m.name: m for m in (PROBABILITY_RATIO, LOGIT_DIFFERENCE, KL_DIVERGENCE, ACCURACY)}

# Transformations: effect e -> the per-example term to minimise. `inverse` and `neg_log` need ratio effects.
TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "inverse": lambda e: 1.0 / (1.0 + e),  # 1 / (1 + IE), the reference's
    "neg": lambda e: -e,  # -IE
    "neg_log": lambda e: -jnp.log1p(e),  # -log(1 + IE)
}


def get_metric(metric: str | Metric) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric]


def check_transform(name: str, metric: Metric | None = None) -> str:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    if metric is not None and not metric.trained.ratio and name != "neg":
        raise ValueError(f"transform {name!r} needs a ratio metric; {metric.trained.name} trains with 'neg'")
    return name


def default_transform(metric: Metric) -> str:
    """The reference's 1/(1 + IE) for ratio metrics, -effect otherwise."""
    return "inverse" if metric.trained.ratio else "neg"
