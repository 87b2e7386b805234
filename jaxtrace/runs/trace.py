"""`trace`: a model, a task and a site in; a circuit with its effect, plots and checkpoints out. `trace_budgets`
(`trace --budgets`): one circuit per budget, every budget a run of one vmapped program, and their merged ranking.

A budgeted trace's folder holds budgets.json (written last: the budgets, direction, each circuit's size, effect
IE(S), complement's effect IE(all \\ S) and MIB faithfulness f, and the merged ranking), circuits/budget_<k>.json
(each budget's circuit, a circuit.json that `evaluate --circuit` and `export` read), log.csv (every run's steps) and
ranking.png. It resumes as a trace does; its identity holds the budgets and the direction, so a resume into another
budget list or direction is refused naming the field."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from jaxtrace.core.metrics import Metric
from jaxtrace.core.models import GatedLM
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.budgets import BudgetedRuns, budget_configs, budget_list
from jaxtrace.engine.faithfulness import circuit_faithfulness
from jaxtrace.engine.loop import Runs, SearchResult, find_target_size, initial_state, run_searches
from jaxtrace.engine.objective import Objective, ObjectiveConfig, build_objective
from jaxtrace.io import plots
from jaxtrace.io.checkpoints import EpochCheckpoints
from jaxtrace.io.circuit import Circuit
from jaxtrace.io.files import write_csv, write_json
from jaxtrace.runs.common import (Provenance, field_defaults, patch_effects, progress_bar, publish_circuit,
                                   result_folder, summarize)
from jaxtrace.tasks import EncodedTask


def trace(model: GatedLM, task: EncodedTask, objective: ObjectiveConfig | str = "attn_pattern",
          config: SearchConfig = SearchConfig(), *, batch_size: int | None = None, metric: str | Metric | None = None,
          mesh: Mesh | None = None, attention: str | None = None, out: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, target_size: int | None = None, progress: bool = True,
          provenance: Provenance = Provenance()) -> Circuit:
    """Run PGB-CT on `task` under `objective` (an `ObjectiveConfig` or a site; `batch_size`, `metric` and
    `attention` override it, see `build_objective`) and return the circuit; with `out`, checkpoint every epoch and
    write the result folder there (see `trace_objective`). The metric defaults to the task's
    (`EncodedTask.default_metric`)."""
    objective = build_objective(model, task, objective, batch_size, metric=metric, attention=attention, mesh=mesh)
    return trace_objective(objective, config, out=out, resume=resume, overwrite=overwrite, target_size=target_size,
                           progress=progress, provenance=provenance)


def trace_objective(objective: Objective, config: SearchConfig = SearchConfig(), *, out: str | Path | None = None,
                    resume: bool = False, overwrite: bool = False, target_size: int | None = None,
                    progress: bool = True, provenance: Provenance = Provenance()) -> Circuit:
    """PGB-CT on a built objective.

    With `out`, the run holds that folder (`jaxtrace.io.results`), saves a checkpoint after every epoch and, at the
    end, writes circuit.json (last), examples.csv, log.csv, z/, z_map.png and effect_per_epoch.png. `resume`
    continues the run the folder holds (a killed run, or a finished one to more epochs; the same run only);
    `overwrite` replaces it. With `target_size`, λ is searched by vmapped sweeps (`find_target_size`; not
    checkpointed) and the run whose circuit size is closest is kept. On a mesh every process runs this call;
    checkpoints are written collectively and the other files by process 0. The config is resolved once, here
    (`Runs.of`), and passed down resolved.
    """
    runs = Runs.of(objective, config)
    settings = {k: v for k, v in dataclasses.asdict(runs.config).items() if k != "epochs"}
    if target_size is not None:
        settings["target_size"] = target_size
    with result_folder(out, "trace", objective, provenance, settings, resume, overwrite,
                       defaults=field_defaults(SearchConfig)) as folder:
        began = time.perf_counter()
        if target_size is None:
            # A folder holding only the run's identity (it ended before its first checkpoint) starts afresh.
            resume = resume and folder is not None and folder.has_checkpoints()
            result = checkpointed_search(objective, runs, folder, resume, progress)
            record, seconds = dataclasses.asdict(result.config), result.seconds
        else:
            with progress_bar(None, "PGB-CT λ search", progress) as on_step:
                result, swept = find_target_size(objective, runs, target_size, on_step=on_step)
            record = {**dataclasses.asdict(result.config), "target_size": target_size,
                      "sweep": [{"lambda1": r.config.lambda1, "lambda2": r.config.lambda2, "size": int(r.mask.sum())}
                                for r in swept]}
            seconds = time.perf_counter() - began
        effects, effect_all = patch_effects(objective, result.mask, result.effects, result.effect_all)
        circuit = summarize(objective, result.mask, result.z, provenance, "pgbct", record, result.history, seconds,
                            float(effects.mean()), effect_all)
        if folder is not None:
            publish_circuit(folder, circuit, effects, objective, result.steps)
    return circuit


@dataclasses.dataclass(frozen=True)
class BudgetedTrace:
    """A budgeted trace: the budgets [K] and direction, each budget's circuit (`circuits[k]`, its `Circuit`), their
    effects IE(S), complements' effects IE(all \\ S) and MIB faithfulness ([K] each), IE(all), the merged ranking
    [L, C] (larger first; `jaxtrace.engine.budgets.nested_ranking`) and the search's wall time."""

    budgets: list[int]
    direction: str
    circuits: dict[int, Circuit]
    effect: list[float]
    complement: list[float]
    faithfulness: list[float]
    effect_all: float
    ranking: np.ndarray
    seconds: float

    def to_dict(self) -> dict:
        """budgets.json's content (without the provenance)."""
        return {"budgets": self.budgets, "direction": self.direction, "effect_all": self.effect_all,
                "seconds": self.seconds,
                "circuits": [{"budget": k, "file": f"circuits/{budget_file(k)}", "n_selected": c.n_selected,
                              "selected": c.selected, "effect": e, "complement": m, "faithfulness": f}
                             for (k, c), e, m, f in zip(self.circuits.items(), self.effect, self.complement,
                                                        self.faithfulness)],
                "ranking": np.asarray(self.ranking, np.float32).tolist()}


def budget_file(k: int) -> str:
    """The file name of budget k's circuit under circuits/."""
    return f"budget_{k}.json"


def trace_budgets(objective: Objective, config: SearchConfig, budgets: str | list[int], *,
                  out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, provenance: Provenance = Provenance()) -> BudgetedTrace:
    """PGB-CT at every budget of `budgets` ("1,2,5,13", "mib" or a list; `budget_list`): one run of `config` per
    budget, all optimised together in one vmapped program (`jaxtrace.engine.budgets`), each circuit of at most its
    budget, and the merged ranking. With `out`, checkpointed every epoch and written as the module docstring says;
    `resume` and `overwrite` as `trace_objective`'s."""
    sizes = budget_list(budgets, objective.n_components)
    runs = Runs.of(objective, budget_configs(config, sizes))
    settings = {k: v for k, v in dataclasses.asdict(runs.configs[0]).items() if k not in ("epochs", "budget")}
    with result_folder(out, "trace", objective, provenance, {**settings, "budgets": sizes}, resume, overwrite,
                       finished="budgets.json", defaults=field_defaults(SearchConfig)) as folder:
        resume = resume and folder is not None and folder.has_checkpoints()
        searched = BudgetedRuns.of(sizes, folder_searches(objective, runs, folder, resume, progress))
        scored = circuit_faithfulness(objective, np.stack([searched.circuits[k] for k in sizes]).astype(np.float32))
        circuits = {k: summarize(objective, r.mask, r.z, provenance, "pgbct", dataclasses.asdict(r.config), r.history,
                                 r.seconds, effect, scored.effect_all)
                    for k, r, effect in zip(sizes, searched.results, scored.effect)}
        result = BudgetedTrace(sizes, runs.config.direction, circuits, scored.effect.tolist(),
                               scored.complement.tolist(), scored.faithfulness.tolist(), scored.effect_all,
                               searched.ranking, searched.results[0].seconds)
        if folder is not None:
            def write_circuits(path: Path) -> None:
                path.mkdir()
                for k, circuit in circuits.items():
                    circuit.write(path / budget_file(k))

            steps = [{"budget": k, **row.to_dict()} for k, r in zip(sizes, searched.results) for row in r.steps]
            folder.publish({
                "circuits": write_circuits,
                "log.csv": lambda path: write_csv(path, steps),
                "ranking.png": lambda path: plots.plot_single_effects(
                    searched.ranking, objective.site, path, "PGB-CT ranking merged from the budgets",
                    "score (n - rank)"),
                "budgets.json": lambda path: write_json(path, {**provenance.describe(), "site": objective.site,
                                                              "metric": objective.metric.name,
                                                              "search": settings, "epochs": runs.config.epochs,
                                                              **result.to_dict()}),
            })
    return result


def checkpointed_search(objective: Objective, config: SearchConfig | Runs, folder, resume: bool,
                        progress: bool) -> SearchResult:
    """One checkpointed run of `config` (or its resolved `Runs`; see `folder_searches`)."""
    return folder_searches(objective, config, folder, resume, progress)[0]


def folder_searches(objective: Objective, config: SearchConfig | Runs, folder, resume: bool,
                    progress: bool) -> list[SearchResult]:
    """The checkpointed runs of `config` (or its resolved `Runs`, optimised together), resumed from the folder's
    latest checkpoint if asked."""
    runs = Runs.of(objective, config)
    checkpoints = None if folder is None else EpochCheckpoints(folder.checkpoints)
    try:
        start = checkpoints.restore(initial_state(objective, runs)) if resume and checkpoints else None
        done = 0 if start is None else start[1].epochs_done
        total = max(runs.config.epochs - done, 0) * len(objective.batcher.in_order)
        on_epoch = None if checkpoints is None else checkpoints.save
        with progress_bar(total, "PGB-CT", progress) as on_step:
            results = run_searches(objective, runs, start=start, on_step=on_step, on_epoch=on_epoch)
    except BaseException:
        if checkpoints is not None:
            checkpoints.close(quiet=True)  # the error on its way says what went wrong
        raise
    if checkpoints is not None:
        checkpoints.close()
    return results
