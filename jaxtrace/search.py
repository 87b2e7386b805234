"""PGB-CT search: Adam on gates z in [0, 1] with scheduled L1 and binary penalties, then thresholding."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxtrace.checkpoint import EpochCheckpoints
from jaxtrace.metrics import TRANSFORMS, check_transform
from jaxtrace.objective import Objective

SCHEDULES: dict[str, Callable[[float, int], float]] = {
    "linear": lambda lam, epoch: lam * (epoch + 1),
    "exp": lambda lam, epoch: lam * 2.0**epoch,
    "poly": lambda lam, epoch: lam * epoch**2,
    "constant": lambda lam, epoch: lam,
}
PENALTIES = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Hyperparameters of one PGB-CT run (defaults follow the reference, except `penalty`).

    `penalty="mean"` divides the L1 and binary penalties by the number of components; `"sum"` is the reference's
    form, which on SmolLM2-135M drives every gate to zero within the first epoch.
    `lr=None` means 0.1 for head sites and 0.5 for MLP sites.
    """

    epochs: int = 15
    batch_size: int = 32
    lr: float | None = None
    lambda1: float = 0.05
    lambda2: float = 0.05
    schedule: str = "linear"
    penalty: str = "mean"
    transform: str = "inverse"
    threshold: float = 0.5
    max_components: int | None = None
    seed: int = 42
    init: float = 0.5

    def __post_init__(self):
        for name in ("lambda1", "lambda2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        check_transform(self.transform)
        if not 0.0 <= self.init <= 1.0 or not 0.0 < self.threshold <= 1.0:
            raise ValueError("init must be in [0, 1] and threshold in (0, 1]")

    def learning_rate(self, site: str) -> float:
        return self.lr if self.lr is not None else (0.5 if site in ("mlp_out", "mlp_hidden") else 0.1)

    def replace(self, **changes) -> SearchConfig:
        return dataclasses.replace(self, **changes)


def select(z: np.ndarray, threshold: float = 0.5, max_components: int | None = None) -> np.ndarray:
    """Binary mask [L, N]: z >= threshold, keeping only the `max_components` largest z when capped."""
    z = np.asarray(z)
    mask = z >= threshold
    if max_components is not None and mask.sum() > max_components:
        order = np.argsort(np.where(mask, -z, np.inf), axis=None, kind="stable")[:max_components]
        mask = np.zeros(z.size, bool)
        mask[order] = True
        mask = mask.reshape(z.shape)
    return mask


def penalty(z: jax.Array, lambda1, lambda2) -> jax.Array:
    """λ1·Σ|z| + λ2·Σ z(1 − z), with d|z|/dz = 0 at z = 0 as torch.abs (jnp.abs would give 1)."""
    l1 = jnp.sum(z * jax.lax.stop_gradient(jnp.sign(z)))
    return lambda1 * l1 + lambda2 * jnp.sum(z * (1.0 - z))


def make_update(objective: Objective, config: SearchConfig, optimizer: optax.GradientTransformation):
    """One run's optimiser step (z, opt_state, params, batch, λ1, λ2) -> (z, opt_state, stats) on the objective's
    trained metric (its surrogate, for accuracy). stats: loss, metric term, per-pair effects [B] and, after the
    step, the nonzero count, the binary violation Σz(1−z) and the number of selected components."""
    metric = objective.metric.trained
    transform = TRANSFORMS[check_transform(config.transform, objective.metric)]
    norm = objective.n_components if config.penalty == "mean" else 1.0
    cap = objective.n_components if config.max_components is None else config.max_components

    def loss_fn(z, params, batch, lambda1, lambda2):
        effects = objective.batch_effect(params, z, batch, metric)
        weight = batch["weight"].reshape(-1)
        data = (transform(effects) * weight).sum() / weight.sum()
        return data + penalty(z, lambda1, lambda2) / norm, (data, effects)

    def update(z, opt_state, params, batch, lambda1, lambda2):
        (loss, (data, effects)), grad = jax.value_and_grad(loss_fn, has_aux=True)(z, params, batch, lambda1, lambda2)
        updates, opt_state = optimizer.update(grad, opt_state, z)
        z = optax.projections.projection_box(optax.apply_updates(z, updates), 0.0, 1.0)
        stats = {"loss": loss, "metric": data, "effects": effects, "nonzero": jnp.sum(z != 0),
                 "violation": jnp.sum(z * (1 - z)), "selected": jnp.minimum(jnp.sum(z >= config.threshold), cap)}
        return z, opt_state, stats

    return update


def training_step(objective: Objective, config: SearchConfig) -> tuple[Callable, optax.GradientTransformation]:
    """(step, optimizer): the jitted optimiser step of R runs optimised together (vmapped `make_update`),
    (z [R, L, N], opt_state, params, batch with a leading run axis, λ1 [R], λ2 [R]) -> (z, opt_state, stats)."""
    optimizer = optax.adam(config.learning_rate(objective.site))
    update = make_update(objective, config, optimizer)
    return objective.jit(jax.vmap(update, in_axes=(0, 0, None, 0, 0, 0))), optimizer


def epoch_batches(objective: Objective, key: jax.Array, epoch: int) -> list[np.ndarray]:
    """The pair-index batches of one run's epoch: a permutation of the task seeded by (key, epoch), in chunks of
    `batch_size`."""
    order = jax.random.permutation(jax.random.fold_in(key, epoch), len(objective.task))
    return objective.batches(np.asarray(order))


@dataclasses.dataclass
class SearchResult:
    config: SearchConfig
    z: np.ndarray            # [L, N] final soft gates
    mask: np.ndarray         # [L, N] selected components
    history: list[dict]      # one row per epoch
    steps: list[dict]        # one row per optimiser step
    seconds: float           # wall time of the whole (swept) search


SWEEPABLE = ("lambda1", "lambda2", "seed")


def _check_sweep(configs: list[SearchConfig]) -> None:
    fixed = [{k: v for k, v in dataclasses.asdict(c).items() if k not in SWEEPABLE} for c in configs]
    if any(f != fixed[0] for f in fixed):
        raise ValueError(f"runs optimised together may differ only in {', '.join(SWEEPABLE)}")


def run_search(objective: Objective, config: SearchConfig, checkpoints: EpochCheckpoints | None = None,
               resume: bool = False, progress: bool = True) -> SearchResult:
    """Optimise z for `config.epochs` epochs; with `resume`, continue from the latest checkpoint."""
    return run_sweep(objective, [config], checkpoints, resume, progress)[0]


def run_sweep(objective: Objective, configs: list[SearchConfig], checkpoints: EpochCheckpoints | None = None,
              resume: bool = False, progress: bool = True) -> list[SearchResult]:
    """Several runs that differ only in λ1, λ2 and seed, optimised together: z [R, L, N], one vmapped step.

    Each run keeps its own Adam state, schedule and seeded pair order; one compilation serves them all.
    """
    _check_sweep(configs)
    config, n_runs = configs[0], len(configs)
    step, optimizer = training_step(objective, config)
    z = np.full((n_runs, objective.n_layers, objective.n_per_layer), config.init, np.float32)
    keys = np.stack([jax.random.key_data(jax.random.key(c.seed)) for c in configs])
    state = {"z": z, "opt_state": jax.tree.map(np.asarray, jax.vmap(optimizer.init)(z)), "keys": keys}  # on host
    histories, steps, start_epoch, seconds = [[] for _ in configs], [], 0, 0.0
    if resume:
        state, meta = checkpoints.restore(state)
        _check_resumable(meta["configs"], configs)
        histories, steps, start_epoch, seconds = meta["histories"], meta["steps"], meta["epochs_done"], meta["seconds"]
        if start_epoch > config.epochs:
            raise ValueError(f"the checkpoint has {start_epoch} epochs done; --epochs {config.epochs} is fewer")
    z, opt_state = objective.replicate((state["z"], state["opt_state"]))  # whole on every device of a mesh
    keys = jax.random.wrap_key_data(state["keys"])
    n_pairs = len(objective.task)
    epochs = range(start_epoch, config.epochs)
    orders = {epoch: [epoch_batches(objective, k, epoch) for k in keys] for epoch in epochs}
    # One packed shape for every step of the run: one compilation.
    every_batch = [idx for runs in orders.values() for order in runs for idx in order]
    rows, n_logits = objective.packed_shape(every_batch) if every_batch else (None, None)
    n_batches = len(objective.batches(np.arange(n_pairs)))
    bar = tqdm(total=len(epochs) * n_batches, disable=not progress, desc="PGB-CT", unit="step")
    evaluated: dict[int, tuple[bytes, float]] = {}  # run -> (binary mask, its effect), re-evaluated on change
    for epoch in epochs:
        start = time.perf_counter()
        lambda1, lambda2 = objective.replicate(tuple(
            np.array([SCHEDULES[c.schedule](getattr(c, name), epoch) for c in configs], np.float32)
            for name in ("lambda1", "lambda2")))
        gates_before, pending = [], []
        for i in range(n_batches):  # one step in flight while the host packs the next batch
            batch = objective.put(objective.stacked_batch([order[i] for order in orders[epoch]], rows, n_logits), 1)
            gates_before.append(z)
            z, opt_state, stats = step(z, opt_state, objective.params, batch, lambda1, lambda2)
            pending.append(stats)
            if i:
                _advance(bar, epoch, jax.device_get(pending[i - 1]))
        _advance(bar, epoch, jax.device_get(pending[-1]))
        stats = jax.device_get(pending)
        for i, row in enumerate(stats):
            for run, order in enumerate(orders[epoch]):
                objective.check_finite(row["effects"][run, : len(order[i])], order[i], gates_before[i][run])
            for run in range(n_runs):
                steps.append({"run": run, "epoch": epoch, "step": i,
                              **{k: v[run].item() for k, v in row.items() if k != "effects"}})
        masks = np.stack([select(zr, c.threshold, c.max_components) for zr, c in zip(np.asarray(z), configs)])
        changed = [run for run in range(n_runs) if evaluated.get(run, (None,))[0] != masks[run].tobytes()]
        if changed:
            for run, effect in zip(changed, objective.mask_effects(masks[changed].astype(np.float32)).mean(1)):
                evaluated[run] = (masks[run].tobytes(), float(effect))
        seconds += time.perf_counter() - start
        for run, history in enumerate(histories):
            history.append({"epoch": epoch + 1, "loss": float(np.mean([r["loss"][run] for r in stats])),
                            "metric": float(np.mean([r["metric"][run] for r in stats])),
                            "lambda1": float(lambda1[run]), "lambda2": float(lambda2[run]),
                            "selected": int(masks[run].sum()), "effect": evaluated[run][1], "seconds": seconds})
        if checkpoints is not None:
            checkpoints.save(epoch + 1, {"z": z, "opt_state": opt_state, "keys": state["keys"]},
                             {"configs": [dataclasses.asdict(c) for c in configs], "epochs_done": epoch + 1,
                              "histories": histories, "steps": steps, "seconds": seconds})
    bar.close()
    z_host = np.asarray(z)
    return [SearchResult(c, z_host[run], select(z_host[run], c.threshold, c.max_components), histories[run],
                         [{k: v for k, v in row.items() if k != "run"} for row in steps if row["run"] == run],
                         seconds) for run, c in enumerate(configs)]


def _advance(bar: tqdm, epoch: int, stats: dict) -> None:
    """Move the progress bar past a finished step, showing its mean loss and selection over the runs."""
    bar.update()
    bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(stats['loss']):.4f}", selected=int(np.mean(stats["selected"])))


def _check_resumable(saved: list[dict], configs: list[SearchConfig]) -> None:
    """A resumed run may only change the number of epochs."""
    if len(saved) != len(configs):
        raise ValueError(f"the checkpoint holds {len(saved)} runs, not {len(configs)}")
    for old, config in zip(saved, configs):
        current = dataclasses.asdict(config)
        changed = [k for k in current if k != "epochs" and old.get(k) != current[k]]
        if changed:
            raise ValueError("cannot resume with different hyperparameters: " +
                             ", ".join(f"{k} {old.get(k)!r} -> {current[k]!r}" for k in changed))


def find_target_size(objective: Objective, config: SearchConfig, target: int, n_lambdas: int = 6,
                     rounds: int = 2, progress: bool = True) -> tuple[SearchResult, list[SearchResult]]:
    """The run whose circuit size is closest to `target`, from λ sweeps run as one vmapped program each.

    Round 1 scales (λ1, λ2) by factors geomspace(1e-2, 1e2, n_lambdas); each later round sweeps n_lambdas factors
    between the two that bracket the target (circuits shrink as λ grows). The cost is `rounds` sweeps, i.e. about
    rounds x n_lambdas single runs of compute (vmapped: one compilation per round). Returns (best, every run).
    """
    if not 1 <= target <= objective.n_components:
        raise ValueError(f"--target-size must be between 1 and {objective.n_components}, got {target}")
    factors = np.geomspace(1e-2, 1e2, n_lambdas)
    runs: list[tuple[float, SearchResult]] = []
    for _ in range(rounds):
        configs = [config.replace(lambda1=config.lambda1 * f, lambda2=config.lambda2 * f) for f in factors]
        runs += zip(factors, run_sweep(objective, configs, progress=progress))
        sizes = {f: int(r.mask.sum()) for f, r in runs}
        if any(size == target for size in sizes.values()):
            break
        above = [f for f, size in sizes.items() if size > target]
        below = [f for f, size in sizes.items() if size < target]
        low = max(above) if above else min(sizes) / 100
        high = min(below) if below else max(sizes) * 100
        factors = np.geomspace(low, high, n_lambdas + 2)[1:-1]
    best = min(runs, key=lambda run: (abs(int(run[1].mask.sum()) - target), -run[0]))[1]
    return best, [result for _, result in runs]
