"""The driver of PGB-CT runs: epochs of batches through the jitted update, the per-epoch evaluation of each run's
binary mask, and callbacks where the run layer checkpoints, logs and shows progress (this module writes and prints
nothing).

Several runs that differ only in λ1, λ2 and seed are optimised together: z [R, L, C], one vmapped step, one
compilation; each run keeps its own Adam state, schedule and seeded pair order, optionally over its own
resample of the pairs (`pairs`: bootstrap runs of `jaxtrace stability`).

The layers pass typed values: `Runs` (configs resolved once per run), the compiled step's `StepStats`, one `StepRow`
per step and run, one `EpochRow` per epoch and run, and between epochs `RunState` (arrays) and `RunProgress` (what
a checkpoint's metadata holds). Dicts appear only at the file boundary (`to_dict` / `from_dict`: checkpoints,
circuit.json, log.csv).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxtrace.core.records import record
from jaxtrace.core.metrics import TRANSFORMS
from jaxtrace.core.search import RunInputs, SearchConfig, SearchState, StepStats, gates_of, select, warm_start_z
from jaxtrace.engine.attribution import attribution_scores
from jaxtrace.engine.objective import Objective, check_finite, mask_effects

SWEEPABLE = ("lambda1", "lambda2", "seed", "budget", "sense")  # what runs optimised together may differ in
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))


@record
class StepRow:
    """One optimiser step of one run, as log.csv and a checkpoint's "steps" hold it (the run's `StepStats`, its
    per-pair effects left out, as Python numbers)."""

    run: int
    epoch: int       # 0-based
    step: int        # the batch's index in the epoch
    loss: float
    metric: float
    nonzero: int
    selected: int
    violation: float

    @classmethod
    def of(cls, stats: StepStats, run: int, epoch: int, step: int) -> StepRow:
        """Run `run`'s row of the host stats of R runs' step."""
        return cls(run=run, epoch=epoch, step=step, loss=stats.loss[run].item(), metric=stats.metric[run].item(),
                   nonzero=stats.nonzero[run].item(), selected=stats.selected[run].item(),
                   violation=stats.violation[run].item())

    def to_dict(self, run: bool = True) -> dict[str, Any]:
        """The row's fields in file order (without "run": a log.csv row)."""
        row = dataclasses.asdict(self)
        if not run:
            del row["run"]
        return row


@record
class EpochRow:
    """One epoch of one run: circuit.json's "history" rows, a checkpoint's "histories"."""

    epoch: int        # epochs done (1-based)
    loss: float       # mean over the epoch's steps
    metric: float     # mean over the epoch's steps
    lambda1: float    # the epoch's scheduled λ1
    lambda2: float
    selected: int     # components of the binary mask after the epoch
    effect: float     # that mask's mean effect on the whole task
    seconds: float    # wall time of the search so far

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@record
class RunState:
    """The state of R runs optimised together between epochs: gates z [R, L, C], the Adam states (a leading R on
    every leaf) and each run's key data [R, 2] (seeding its pair order). Host arrays before the first epoch and
    after a restore, device arrays in `on_epoch`. A checkpoint stores it as the dict {"z", "opt_state", "keys"}."""

    z: Any
    opt_state: Any
    keys: Any

    def to_dict(self) -> dict[str, Any]:
        return {"z": self.z, "opt_state": self.opt_state, "keys": self.keys}

    @classmethod
    def from_dict(cls, state: dict) -> RunState:
        return cls(z=state["z"], opt_state=state["opt_state"], keys=state["keys"])


@dataclasses.dataclass(frozen=True)
class RunProgress:
    """How far R runs are after their last finished epoch: what a checkpoint's metadata holds (with the
    `RunState`) and `run_searches` resumes from. A checkpoint stores it as JSON (`to_dict`)."""

    configs: Sequence[SearchConfig]      # the runs' resolved configs
    epochs_done: int
    histories: Sequence[Sequence[EpochRow]]  # one per run
    steps: Sequence[StepRow]             # every run's steps, in the order taken
    seconds: float                       # wall time of the search so far
    unchanged: Sequence[int]             # epochs each run's binary mask has not changed
    settled: bool                        # whether the runs stopped early

    @classmethod
    def fresh(cls, configs: Sequence[SearchConfig]) -> RunProgress:
        """Before the first epoch."""
        return cls(tuple(configs), 0, tuple(() for _ in configs), (), 0.0, (0,) * len(configs), False)

    def to_dict(self) -> dict[str, Any]:
        return {"configs": [dataclasses.asdict(c) for c in self.configs], "epochs_done": self.epochs_done,
                "histories": [[row.to_dict() for row in history] for history in self.histories],
                "steps": [row.to_dict() for row in self.steps], "seconds": self.seconds,
                "unchanged": list(self.unchanged), "settled": self.settled}

    @classmethod
    def from_dict(cls, meta: Any) -> RunProgress:
        """The progress of a checkpoint's metadata (checkpoints of older versions may lack "unchanged" and
        "settled": no epoch unchanged, not stopped); a ValueError naming what is wrong otherwise."""
        try:
            histories = tuple(tuple(EpochRow(**row) for row in history) for history in meta["histories"])
            return cls(configs=tuple(SearchConfig(**{k: v for k, v in c.items() if k in CONFIG_FIELDS})
                                     for c in meta["configs"]),
                       epochs_done=meta["epochs_done"], histories=histories,
                       steps=tuple(StepRow(**row) for row in meta["steps"]), seconds=meta["seconds"],
                       unchanged=tuple(meta.get("unchanged", [0] * len(histories))),
                       settled=meta.get("settled", False))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"not the metadata of a search checkpoint ({type(error).__name__}: {error})") from None


@dataclasses.dataclass
class SearchResult:
    config: SearchConfig     # resolved (learning rate and transform filled in)
    z: np.ndarray            # [L, C] final soft gates
    mask: np.ndarray         # [L, C] selected components
    history: list[EpochRow]  # one row per epoch
    steps: list[StepRow]     # one row per optimiser step
    seconds: float           # wall time of the whole (swept) search
    effects: np.ndarray | None = None  # [N] per-pair effects of patching `mask`, where the last epoch measured them
    effect_all: float | None = None    # IE(all) under the objective's metric, where the data scale measured it


def resolve(objective: Objective, configs: list[SearchConfig]) -> list[SearchConfig]:
    """The configs with the site's and metric's defaults filled in, checked to be runnable together."""
    configs = [c.resolve(objective.site, objective.metric) for c in configs]
    fixed = [{k: v for k, v in dataclasses.asdict(c).items() if k not in SWEEPABLE} for c in configs]
    if any(f != fixed[0] for f in fixed):
        raise ValueError(f"runs optimised together may differ only in {', '.join(SWEEPABLE)}")
    return configs


@dataclasses.dataclass(frozen=True)
class Runs:
    """R runs optimised together: their configs resolved on one objective (`resolve`) and checked to differ only
    in the `SWEEPABLE` fields. Resolved once per run (`Runs.of`) and passed down: every function here that takes
    configs takes `Runs` as they are."""

    configs: tuple[SearchConfig, ...]

    @classmethod
    def of(cls, objective: Objective, configs: Runs | SearchConfig | Sequence[SearchConfig]) -> Runs:
        """`configs` (one, several, or `Runs`, returned as they are) resolved on `objective`."""
        if isinstance(configs, Runs):
            return configs
        if isinstance(configs, SearchConfig):
            configs = [configs]
        return cls(tuple(resolve(objective, list(configs))))

    @property
    def config(self) -> SearchConfig:
        """The first run's config (what every run's program, epochs and early stop follow)."""
        return self.configs[0]

    def sweep(self, changes: Sequence[dict]) -> Runs:
        """Runs of the first config with each of `changes` applied, sweepable fields only (still resolved)."""
        for change in changes:
            if not set(change) <= set(SWEEPABLE):
                raise ValueError(f"runs optimised together may differ only in {', '.join(SWEEPABLE)}")
        return Runs(tuple(self.config.replace(**change) for change in changes))

    def __len__(self) -> int:
        return len(self.configs)


def training_step(objective: Objective, config: SearchConfig | Runs):
    """(step, init) of runs of `config` on `objective`, as `run_searches` compiles them
    (`Objective.programs.training_step` of the resolved config)."""
    return objective.programs.training_step(Runs.of(objective, config).config)


def stacked_inputs(objective: Objective, batches: list[np.ndarray], shape=None):
    """The device batch and cache of R runs' batches of pair indices, stacked on a leading run axis."""
    inputs = [objective.inputs(idx, shape) for idx in batches]
    return objective.batcher.put(jax.tree.map(lambda *xs: np.stack(xs), *inputs), 1)


def starting_gates(objective: Objective, runs: SearchConfig | Runs) -> np.ndarray:
    """[L, C] the gates runs start from: every one at `init`, or with a `warm_start` the attribution scores in the
    runs' direction mapped by `warm_start_z` ([R, L, C] when the runs differ in sense: negated scores against)."""
    configs = (runs,) if isinstance(runs, SearchConfig) else runs.configs
    config = configs[0]
    if config.warm_start is None:
        return np.full(objective.shape, config.init, np.float32)
    scores = attribution_scores(objective, config.warm_start, direction=config.direction)
    z = {sense: warm_start_z(-scores if sense == "against" else scores, config.init)
         for sense in {c.sense for c in configs}}
    return z[config.sense] if len(z) == 1 else np.stack([z[c.sense] for c in configs])


def data_scale(objective: Objective, config: SearchConfig) -> tuple[float, float | None]:
    """(what the data term is divided by, IE(all) under the objective's metric where it was measured, else None).

    The scale is 1 (`scale="none"`), or |t(IE(all)) - t(0)|, the transformed effect of patching every component
    against patching none (`scale="effect"`), measured once on the whole task with the metric the search trains
    (accuracy's surrogate, the logit difference, for accuracy: then IE(all) is not the objective metric's)."""
    if config.scale == "none":
        return 1.0, None
    trained = objective.metric.trained is objective.metric
    if not trained:
        objective = objective.replace(spec=dataclasses.replace(objective.spec, metric=objective.metric.trained))
    transform = TRANSFORMS[config.transform]
    effect_all = float(objective.evaluate_masks(np.ones((1, *objective.shape), np.float32))[0])
    scale = abs(float(transform(np.float32(effect_all))) - float(transform(np.float32(0.0))))
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"--scale effect: the effect of patching every component is {effect_all:+.4g}, nothing to "
                         "scale the data term by (use --scale none)")
    return scale, effect_all if trained else None


def run_inputs(objective: Objective, configs: Sequence[SearchConfig], epoch: int, scales: np.ndarray) -> RunInputs:
    """The epoch's `RunInputs` of R runs ([R] each, on the host): scheduled λ, data scales (negated for a run against
    the behaviour), budgets (the number of components for a run without one), of resolved configs (`Runs.of`)."""
    lambdas = np.array([c.lambdas(epoch) for c in configs], np.float32)
    budgets = np.array([objective.n_components if c.budget is None else c.budget for c in configs], np.float32)
    signs = np.array([-1.0 if c.sense == "against" else 1.0 for c in configs], np.float32)
    return RunInputs(lambdas[:, 0], lambdas[:, 1], signs * np.asarray(scales, np.float32), budgets)


def initial_state(objective: Objective, configs: Sequence[SearchConfig] | Runs,
                  z0: np.ndarray | None = None) -> RunState:
    """The host state of R runs before their first epoch, the gates starting at z0 ([L, C] for every run, or
    [R, L, C]; default: every gate at `init`); also the structure a checkpoint restores into."""
    runs = Runs.of(objective, configs)
    _, init = objective.programs.training_step(runs.config)
    shape = (len(runs), *objective.shape)
    z = np.full(shape, runs.config.init, np.float32) if z0 is None else np.broadcast_to(z0, shape).astype(np.float32)
    keys = np.stack([jax.random.key_data(jax.random.key(c.seed)) for c in runs.configs])
    return RunState(z=z, opt_state=jax.tree.map(np.asarray, jax.vmap(init)(z).opt_state), keys=keys)


def run_searches(objective: Objective, configs: Sequence[SearchConfig] | Runs,
                 start: tuple[RunState, RunProgress] | None = None,
                 on_step: Callable[[int, StepStats], None] | None = None,
                 on_epoch: Callable[[int, RunState, RunProgress], None] | None = None,
                 z0: np.ndarray | None = None, pairs: list[np.ndarray] | None = None) -> list[SearchResult]:
    """Optimise R runs together for `configs[0].epochs` epochs and return each run's result.

    `configs`: the runs' configs, resolved here, or `Runs` (already resolved).
    `start`: (state, progress) of a checkpoint to continue from (see `initial_state` and `on_epoch`); else the
    gates start at z0 ([L, C] or [R, L, C]; default: `starting_gates`, which computes a warm start's scores).
    `pairs`: each run's own N pair indices to train on (e.g. a bootstrap resample, with repetitions; `Batcher.epoch`
    permutes them), so every run takes the same number of steps; default: every pair once. The per-epoch effect
    is always measured on the whole task.
    `on_step(epoch, stats)` is called after every step with its host `StepStats` ([R] each);
    `on_epoch(epochs done, state, progress)` after every epoch with what resumes the runs.

    Early stop: the runs end once every run's binary mask has been the same for `patience` epochs and each of its
    gates is within `tolerance` of 0 or 1 (`patience=0`: every epoch runs). A resumed run that had stopped stays
    stopped.
    """
    runs = Runs.of(objective, configs)
    configs, config, n_runs, batcher = runs.configs, runs.config, len(runs), objective.batcher
    program, _ = objective.programs.training_step(config)
    if start is None:
        state = initial_state(objective, runs, starting_gates(objective, runs) if z0 is None else z0)
        progress = RunProgress.fresh(configs)
    else:
        state, progress = start
        if progress.epochs_done > config.epochs:
            raise ValueError(f"the checkpoint has {progress.epochs_done} epochs done; --epochs {config.epochs} is "
                             "fewer")
    histories, steps = [list(history) for history in progress.histories], list(progress.steps)
    start_epoch, seconds = progress.epochs_done, progress.seconds
    unchanged, settled = list(progress.unchanged), progress.settled  # epochs each mask has not changed; stopped
    search_state = batcher.replicate(SearchState(state.z, state.opt_state))  # whole on every device
    keys = jax.random.wrap_key_data(state.keys)
    epochs = range(start_epoch, start_epoch if settled else config.epochs)
    previous = [c.select(zr) for zr, c in zip(state.z, configs)]
    # run -> (binary mask, its effect), re-evaluated on change; a resumed run's from its last epoch, so that it
    # evaluates the masks an uninterrupted run does, in the same groups (bit-identical effects)
    # (and, measured in this call, the per-pair effects)
    evaluated = {run: (mask.tobytes(), history[-1].effect, None)
                 for run, (mask, history) in enumerate(zip(previous, histories)) if history}
    # one scale for every run: --scale and the transform are not sweepable
    scale, effect_all = data_scale(objective, config) if epochs else (None, None)
    scales = np.full(n_runs, scale, np.float32) if epochs else None
    run_pairs = [None] * n_runs if pairs is None else check_pairs(objective, pairs, n_runs)
    orders = {epoch: [batcher.epoch(k, epoch, p) for k, p in zip(keys, run_pairs)] for epoch in epochs}
    # One packed shape for every step of the run: one compilation.
    every_batch = [idx for runs_orders in orders.values() for order in runs_orders for idx in order]
    shape = batcher.shape(every_batch) if every_batch else None
    n_batches = len(batcher.in_order)
    for epoch in epochs:
        began = time.perf_counter()
        inputs = run_inputs(objective, configs, epoch, scales)
        device_inputs = batcher.replicate(inputs)
        gates_before, pending = [], []
        for i in range(n_batches):  # one step in flight while the host packs the next batch
            batch, cache = stacked_inputs(objective, [order[i] for order in orders[epoch]], shape)
            gates_before.append(search_state.z)
            search_state, stats = program(search_state, objective.params, batch, cache, device_inputs)
            pending.append(stats)
            if i and on_step is not None:
                on_step(epoch, jax.device_get(pending[i - 1]))
        if on_step is not None:
            on_step(epoch, jax.device_get(pending[-1]))
        stats: list[StepStats] = jax.device_get(pending)
        for i, row in enumerate(stats):
            for run, order in enumerate(orders[epoch]):
                check_finite(objective, row.effects[run, : len(order[i])], order[i],
                             gates_of(np.asarray(gates_before[i][run]), config.direction))
            steps += [StepRow.of(row, run, epoch, i) for run in range(n_runs)]
        z = np.asarray(search_state.z)
        masks = np.stack([c.select(zr) for zr, c in zip(z, configs)])
        changed = [run for run in range(n_runs) if evaluated.get(run, (None,))[0] != masks[run].tobytes()]
        if changed:  # the effect of the patch the circuit stands for (keep: every component outside it)
            patches = gates_of(masks[changed].astype(np.float32), config.direction)
            for run, effects in zip(changed, mask_effects(objective, patches)):
                evaluated[run] = (masks[run].tobytes(), float(effects.mean()), effects)
        unchanged = [n + 1 if np.array_equal(mask, old) else 0 for n, mask, old in zip(unchanged, masks, previous)]
        previous = masks
        settled = config.patience > 0 and all(
            n >= config.patience and np.minimum(zr, 1 - zr).max() <= config.tolerance for n, zr in zip(unchanged, z))
        seconds += time.perf_counter() - began
        for run, history in enumerate(histories):
            history.append(EpochRow(epoch=epoch + 1, loss=float(np.mean([r.loss[run] for r in stats])),
                                    metric=float(np.mean([r.metric[run] for r in stats])),
                                    lambda1=float(inputs.lambda1[run]), lambda2=float(inputs.lambda2[run]),
                                    selected=int(masks[run].sum()), effect=evaluated[run][1], seconds=seconds))
        if on_epoch is not None:
            on_epoch(epoch + 1, RunState(z=search_state.z, opt_state=search_state.opt_state, keys=state.keys),
                     RunProgress(configs=configs, epochs_done=epoch + 1, histories=tuple(map(tuple, histories)),
                                 steps=tuple(steps), seconds=seconds, unchanged=tuple(unchanged), settled=settled))
        if settled:
            break
    z = np.asarray(search_state.z)
    patch = config.direction == "patch"  # else the runs measured their circuits' complements
    return [SearchResult(c, z[run], c.select(z[run]), histories[run], [row for row in steps if row.run == run],
                         seconds, evaluated[run][2] if patch and run in evaluated else None, effect_all)
            for run, c in enumerate(configs)]


def check_pairs(objective: Objective, pairs: list[np.ndarray], n_runs: int) -> list[np.ndarray]:
    """Each run's pair indices ([N] ints in [0, N)), checked."""
    n = len(objective.task)
    pairs = [np.asarray(p) for p in pairs]
    if len(pairs) != n_runs or any(p.shape != (n,) or p.dtype.kind not in "iu" for p in pairs):
        raise ValueError(f"pairs must give each of the {n_runs} runs {n} integer pair indices")
    if any(p.min() < 0 or p.max() >= n for p in pairs):
        raise ValueError(f"pair indices must be in [0, {n})")
    return pairs


def run_search(objective: Objective, config: SearchConfig | Runs, **kwargs) -> SearchResult:
    """One run (see `run_searches`; `config` may be its resolved `Runs`)."""
    return run_searches(objective, Runs.of(objective, config), **kwargs)[0]


def find_target_size(objective: Objective, config: SearchConfig | Runs, target: int, n_lambdas: int = 6,
                     rounds: int = 2, on_step=None) -> tuple[SearchResult, list[SearchResult]]:
    """The run whose circuit size is closest to `target`, from λ sweeps run as one vmapped program each.

    Round 1 scales (λ1, λ2) by factors geomspace(1e-2, 1e2, n_lambdas); each later round sweeps n_lambdas factors
    between the two that bracket the target (circuits shrink as λ grows). The cost is `rounds` sweeps, i.e. about
    rounds x n_lambdas single runs of compute (vmapped: one compilation per round). Returns (best, every run).
    `config` is resolved once (or given as its resolved `Runs`); every round sweeps it.
    """
    if not 1 <= target <= objective.n_components:
        raise ValueError(f"--target-size must be between 1 and {objective.n_components}, got {target}")
    base = Runs.of(objective, config)
    config = base.config
    factors = np.geomspace(1e-2, 1e2, n_lambdas)
    z0 = starting_gates(objective, config)  # once for every round
    runs: list[tuple[float, SearchResult]] = []
    for _ in range(rounds):
        swept = base.sweep([{"lambda1": config.lambda1 * f, "lambda2": config.lambda2 * f} for f in factors])
        runs += zip(factors, run_searches(objective, swept, on_step=on_step, z0=z0))
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
