"""PGB-CT as an optax-style pair of pure functions: `init(z)` and `update(state, params, batch, cache, λ1, λ2)`, an
Adam step on gates z in [0, 1] with scheduled L1 and binary penalties, projected back to the box; and thresholding.
The loop that drives it over epochs is `jaxtrace.engine.loop`."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrace.core.metrics import TRANSFORMS, Metric, check_transform, default_transform
from jaxtrace.core.objective import ObjectiveSpec, batch_effects
from jaxtrace.core.options import option
from jaxtrace.core.records import Batch, Cache, record
from jaxtrace.core.sites import default_lr, gate_shape

SCHEDULES: dict[str, Callable[[float, int], float]] = {
    "linear": lambda lam, epoch: lam * (epoch + 1),
    "exp": lambda lam, epoch: lam * 2.0**epoch,
    "poly": lambda lam, epoch: lam * epoch**2,
    "constant": lambda lam, epoch: lam,
}
PENALTIES = ("mean", "sum")
WARM_STARTS = ("atp",)  # attribution scores a run's gates may start from
DIRECTIONS = ("patch", "keep")
SENSES = ("for", "against")
SCALES = ("none", "effect")
DEFAULT_LAMBDA = {"effect": 0.5, "none": 0.05}  # λ1 = λ2 by scale (benchmarks/LAMBDA.md: similar sizes on WinoBias)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Hyperparameters of one PGB-CT run (defaults follow the reference, except `penalty` and `scale`).

    `penalty="mean"` divides the L1 and binary penalties by the number of components; `"sum"` is the reference's
    form, which on SmolLM2-135M drives every gate to zero within the first epoch. `scale="effect"` divides the data
    term by the effect of patching everything, so one λ (0.5) gives circuits of similar relative size whatever the
    metric's units; `scale="none"` with λ 0.05 is the reference's. `lr`, `transform`, `lambda1` and `lambda2` left
    at None mean the site's, the metric's and the scale's defaults (λ1 0 with a budget: it bounds the size), filled
    in by `resolve`; so a budget given later (`replace(budget=k)`) still turns the default L1 penalty off.
    """

    epochs: int = option(15, "epochs (passes over the task's pairs)")
    lr: float | None = option(None, "Adam learning rate (default: the site's, 0.1 for heads, 0.5 for MLP units)")
    lambda1: float | None = option(None, "L1 penalty weight (default: 0.5 with --scale effect, the reference's 0.05 "
                                   "with --scale none, 0 with --budget or --budgets: the budget bounds the size)")
    lambda2: float | None = option(None, "binary z(1 - z) penalty weight (default: as --lambda1's)")
    schedule: str = option("linear", "penalty schedule over epochs e: linear λ(e+1), exp λ·2^e, poly λ·e², constant",
                           choices=SCHEDULES)
    penalty: str = option("mean", "penalties divided by the number of components (mean) or summed (sum, the "
                          "reference's)", choices=PENALTIES)
    transform: str | None = option(None, "effect -> loss: inverse 1/(1 + IE) (the reference's), neg -IE, neg_log "
                                   "-log(1 + IE) (default: inverse for ratio metrics, else neg)", choices=TRANSFORMS)
    threshold: float = option(0.5, "selection: z >= threshold")
    max_components: int | None = option(None, "selection: at most this many components, those of largest z")
    patience: int = option(2, "stop early once the selection has not changed for this many epochs and every gate "
                           "is within --tolerance of 0 or 1 (0: run every epoch, as the reference)")
    tolerance: float = option(0.01, "early stop: how close to 0 or 1 every gate must be")
    seed: int = option(42, "seed of the pairs' order")
    init: float = option(0.5, "initial z")
    warm_start: str | None = option(None, "start the gates from attribution scores: atp moves each gate from init "
                                    "toward 1 or 0 by its AtP score (default: every gate at init)",
                                    choices=WARM_STARTS)
    direction: str = option("patch", "patch: maximise the effect of patching the selected components (the "
                            "reference's); keep: keep the selected components clean and patch the rest, minimising "
                            "that effect (MIB's faithfulness; the patch weight of a component is 1 - z)",
                            choices=DIRECTIONS)
    scale: str = option("effect", "the data term divided by the transformed effect of patching every component, "
                        "measured once before the search (effect: one λ for every metric and task), or in the "
                        "metric's units (none, the reference's)", choices=SCALES)
    budget: int | None = option(None, "a circuit of this many components: every step projects z onto {0 <= z <= 1, "
                                "sum z <= budget} and the selection is the budget's largest nonzero z")
    sense: str = option("for", "for: the circuit that carries the behaviour; against: the components that work "
                        "against it (the data term's sign flipped: in the keep direction, the circuit whose clean "
                        "activations, everything else patched, lower the effect most)", choices=SENSES)

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        for name in ("lr", "lambda1", "lambda2", "threshold", "init", "tolerance"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        for name in ("lambda1", "lambda2"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.patience < 0:
            raise ValueError(f"--patience must be >= 0, got {self.patience}")
        if not 0 <= self.tolerance < 0.5:
            raise ValueError(f"--tolerance must be in [0, 0.5), got {self.tolerance}")
        for name in ("max_components", "budget"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if self.sense not in SENSES:
            raise ValueError(f"--sense must be one of {', '.join(SENSES)}, got {self.sense!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule: unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"--penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.transform is not None:
            check_transform(self.transform)
        if self.warm_start is not None and self.warm_start not in WARM_STARTS:
            raise ValueError(f"--warm-start: unknown warm start {self.warm_start!r}; known: {', '.join(WARM_STARTS)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.init <= 1.0:
            raise ValueError(f"init must be in [0, 1], got {self.init}")

    def resolve(self, site: str, metric: Metric) -> SearchConfig:
        """The config with the site's learning rate, the metric's transform (checked) and the scale's λ filled in."""
        transform = self.transform or default_transform(metric)
        check_transform(transform, metric)
        lambda1 = (0.0 if self.budget is not None else DEFAULT_LAMBDA[self.scale]) if self.lambda1 is None \
            else self.lambda1
        lambda2 = DEFAULT_LAMBDA[self.scale] if self.lambda2 is None else self.lambda2
        return self.replace(lr=self.lr or default_lr(site), transform=transform, lambda1=lambda1, lambda2=lambda2)

    def replace(self, **changes) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    @property
    def cap(self) -> int | None:
        """The most components the selection keeps: the smaller of `max_components` and `budget`."""
        caps = [c for c in (self.max_components, self.budget) if c is not None]
        return min(caps) if caps else None

    def select(self, z: np.ndarray) -> np.ndarray:
        """This config's binary selection of gates z [L, C]: z >= threshold, capped at `max_components` (`select`);
        with a budget, the budget's largest nonzero z (every budgeted run gives a circuit of its size)."""
        if self.budget is None or self.budget >= np.size(z):
            return select(z, self.threshold, self.cap)
        return select(z, np.finfo(np.float32).tiny, self.cap)

    def lambdas(self, epoch: int) -> tuple[float, float]:
        """(λ1, λ2) of a 0-based epoch under the schedule (of a resolved config)."""
        if self.lambda1 is None or self.lambda2 is None:
            raise ValueError("SearchConfig.lambdas: resolve the config first (its λ are the scale's defaults)")
        schedule = SCHEDULES[self.schedule]
        return schedule(self.lambda1, epoch), schedule(self.lambda2, epoch)


def warm_start_z(scores: np.ndarray, init: float = 0.5) -> np.ndarray:
    """[L, C] starting gates from attribution scores [L, C] (larger: more effect when patched): each gate moves from
    `init` toward 1 (positive score) or 0 (negative) by half the room there, times |score| / max |score|; so the
    gates keep the scores' order, components of positive score start above `init` and every gate stays in
    [init / 2, (1 + init) / 2]. All-zero scores give `init` everywhere."""
    scores = np.asarray(scores, np.float64)
    bound = np.abs(scores).max()
    u = scores / bound if bound > 0 else np.zeros_like(scores)
    return (init + 0.5 * np.where(u > 0, 1.0 - init, init) * u).astype(np.float32)


def select(z: np.ndarray, threshold: float = 0.5, max_components: int | None = None) -> np.ndarray:
    """Binary mask [L, C]: z >= threshold, keeping only the `max_components` largest z when capped."""
    z = np.asarray(z)
    mask = z >= threshold
    if max_components is not None and mask.sum() > max_components:
        order = np.argsort(np.where(mask, -z, np.inf), axis=None, kind="stable")[:max_components]
        mask = np.zeros(z.size, bool)
        mask[order] = True
        mask = mask.reshape(z.shape)
    return mask


def gates_of(z, direction: str):
    """The patch weights of gates z: z itself (patch direction), or 1 - z (keep: z = 1 keeps a component clean)."""
    return z if direction == "patch" else 1.0 - z


def projection_capped_simplex(z: jax.Array, k) -> jax.Array:
    """The Euclidean projection of z onto {0 <= p <= 1, sum p <= k}: p = clip(z - τ, 0, 1) with τ = 0 when that
    already holds (then p is `optax.projections.projection_box`'s), else the τ > 0 where sum p = k, found by
    bisection (64 halvings; the upper bound, which is always feasible, is taken)."""
    boxed = optax.projections.projection_box(z, 0.0, 1.0)

    def halve(_, bounds):
        low, high = bounds
        middle = 0.5 * (low + high)
        over = jnp.sum(jnp.clip(z - middle, 0.0, 1.0)) > k
        return jnp.where(over, middle, low), jnp.where(over, high, middle)

    _, tau = jax.lax.fori_loop(0, 64, halve, (jnp.zeros((), z.dtype), jnp.max(z).astype(z.dtype)))
    return jnp.where(jnp.sum(boxed) <= k, boxed, jnp.clip(z - tau, 0.0, 1.0))


@record
class RunInputs:
    """What may differ between runs optimised together, as arrays (scalars of one run, or [R]): the epoch's λ1 and
    λ2, the data term's scale (1: the metric's units) and the budget (sum z <= budget; the number of components when
    there is none)."""

    lambda1: jax.Array
    lambda2: jax.Array
    scale: jax.Array
    budget: jax.Array


def penalty(z: jax.Array, lambda1, lambda2) -> jax.Array:
    """λ1·Σ|z| + λ2·Σ z(1 − z), with d|z|/dz = 0 at z = 0 as torch.abs (jnp.abs would give 1)."""
    l1 = jnp.sum(z * jax.lax.stop_gradient(jnp.sign(z)))
    return lambda1 * l1 + lambda2 * jnp.sum(z * (1.0 - z))


class SearchState(NamedTuple):
    """One run's optimisation state: gates z [L, C] and the Adam state."""

    z: jax.Array
    opt_state: optax.OptState


@record
class StepStats:
    """What one PGB-CT step returns (`Search.update`), on the device or, fetched, on the host: scalars of one run, or
    [R] of R runs optimised together (a leading R on every field)."""

    loss: jax.Array       # the step's objective: data term + penalties
    metric: jax.Array     # its data term, the transformed effect averaged over the batch's real pairs
    effects: jax.Array    # [G * B] per-pair effects of the batch (padding slots included)
    nonzero: jax.Array    # int32, gates not at 0 after the step
    violation: jax.Array  # Σ z(1 − z) after the step
    selected: jax.Array   # int32, components selected after the step (capped at `max_components`)


class Search(NamedTuple):
    """A search as a pair of pure functions (optax style): `init(z) -> state` and
    `update(state, params, batch, cache, inputs: RunInputs) -> (state, StepStats)`."""

    init: Callable
    update: Callable


def pgbct(spec: ObjectiveSpec, config: SearchConfig) -> Search:
    """PGB-CT on the objective `spec` with a resolved `config` (`SearchConfig.resolve`), trained on the metric's
    trained form (its surrogate, for accuracy). `update` returns the new state and its `StepStats`.

    Patch direction: the data term is the transformed effect t(IE(z)) of patching with gates z (t decreasing, so
    minimising it maximises the effect). Keep direction: the patch weights are 1 - z and the data term is
    -t(IE(1 - z)): the search minimises the effect of patching everything it does not keep, while the penalties pull
    z to 0, so the kept circuit stays small. The data term is divided by `inputs.scale` (negative for a run against
    the behaviour, `SearchConfig.sense`); after the Adam step z is
    projected onto [0, 1] (and onto sum z <= budget, `projection_capped_simplex`)."""
    optimizer = optax.adam(config.lr)
    metric = spec.metric.trained
    transform = TRANSFORMS[config.transform]
    n_components = math.prod(gate_shape(spec.config, spec.site))
    norm = n_components if config.penalty == "mean" else 1.0
    cap = n_components if config.max_components is None else config.max_components
    sign = 1.0 if config.direction == "patch" else -1.0

    def loss_fn(z, params, batch: Batch, cache: Cache | None, inputs: RunInputs):
        effects = batch_effects(spec, params, gates_of(z, config.direction), batch, cache, metric)
        weight = batch.pairs.weight.reshape(-1)
        data = sign * (transform(effects) * weight).sum() / weight.sum() / inputs.scale
        return data + penalty(z, inputs.lambda1, inputs.lambda2) / norm, (data, effects)

    def init(z) -> SearchState:
        return SearchState(z, optimizer.init(z))

    def update(state: SearchState, params, batch: Batch, cache: Cache | None, inputs: RunInputs):
        (loss, (data, effects)), grad = jax.value_and_grad(loss_fn, has_aux=True)(
            state.z, params, batch, cache, inputs)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction raises a float to an int32 count
            updates, opt_state = optimizer.update(grad, state.opt_state, state.z)
        z = projection_capped_simplex(optax.apply_updates(state.z, updates), inputs.budget)
        budget = inputs.budget.astype(jnp.int32)
        selected = jnp.where(budget < n_components, jnp.minimum(jnp.sum(z > 0), jnp.minimum(budget, cap)),
                             jnp.minimum(jnp.sum(z >= config.threshold), cap))
        stats = StepStats(loss=loss, metric=data, effects=effects, nonzero=jnp.sum(z != 0),
                          violation=jnp.sum(z * (1 - z)), selected=selected)
        return SearchState(z, opt_state), stats

    return Search(init, update)
