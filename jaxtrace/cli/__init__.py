"""The `jaxtrace` command line: a thin layer over `jaxtrace.runs`, its options derived from the config records."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import jax

from jaxtrace.cli.options import add_options, from_args, given
from jaxtrace.core.errors import one_line
from jaxtrace.core.search import SearchConfig
from jaxtrace.core.models.config import ModelConfig
from jaxtrace.core.sites import MODEL_SITES, component_labels, gate_shape, get_site
from jaxtrace.engine.budgets import parse_budgets
from jaxtrace.engine.mesh import MeshSpec, is_writer
from jaxtrace.engine.objective import ObjectiveConfig, build_objective, check_task_fits
from jaxtrace.io.cache import enable_compilation_cache
from jaxtrace.io.checkpoints import quiet_background_errors
from jaxtrace.io.circuit import Circuit
from jaxtrace.io.export import EXPORT_FORMATS
from jaxtrace.io.files import read_json
from jaxtrace.io.loading import CONFIG_PRESETS, ModelSpec, load_config, weights_digest
from jaxtrace.io.results import IDENTITY, check_out
from jaxtrace.runs.baselines import BaselineConfig, baseline, evaluate_selection
from jaxtrace.runs.common import SKIPPED, Provenance
from jaxtrace.runs.curve import CurveConfig, compare_run, methods_markdown, table_markdown
from jaxtrace.runs.info import model_summary, next_tokens, time_gated_step
from jaxtrace.runs.model_sweep import find_circuits, summary_table, sweep_models
from jaxtrace.runs.plan import PlanConfig, TaskShape, format_plan, plan
from jaxtrace.runs.stability import StabilityConfig, stability_run, summary
from jaxtrace.runs.trace import BudgetedTrace, trace, trace_budgets
from jaxtrace.tasks import TASK_LOADERS, TaskSpec
from jaxtrace.version import __version__

log = logging.getLogger("jaxtrace")
GROUP_TITLES = {ModelSpec: "model", TaskSpec: "task", ObjectiveConfig: "objective", SearchConfig: "search (PGB-CT)",
                MeshSpec: "devices and hosts", BaselineConfig: "baseline", CurveConfig: "curve",
                StabilityConfig: "stability", TaskShape: "task shape (without --task)", PlanConfig: "plan"}


def _mesh(args):
    mesh = from_args(MeshSpec, args).build()
    if mesh is not None:
        log.info(f"mesh       data={mesh.shape['data']} x model={mesh.shape['model']} over {jax.device_count()} "
                 f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)")
    return mesh


def _load(args, model: str | None = None, task: TaskSpec | None = None):
    """(model spec, model, task spec, encoded task) from the flags (or the given model name and task spec)."""
    model_spec = from_args(ModelSpec, args, **({"model": model} if model else {}))
    task_spec = task or from_args(TaskSpec, args)
    loaded, tokenizer = model_spec.load()
    encoded = task_spec.build(tokenizer)
    report_skipped(encoded, getattr(args, "out", None), getattr(args, "verbose", False))
    check_task_fits(encoded, loaded.config, model_spec.model)  # before anything is compiled
    return model_spec, loaded, task_spec, encoded


def report_skipped(task, out: str | Path | None = None, verbose: bool = False) -> None:
    """What the task left out (the data lines its loader dropped, the pairs that cannot be aligned): one line
    saying how many and where the list is (the result folder's skipped.csv, written with the results), or the
    whole list with `verbose` or without a result folder."""
    if not (task.dropped or task.skipped):
        return
    if out is not None and not verbose:
        counts = ([f"{len(task.dropped)} line pairs of the data (reference's rules)"] if task.dropped else []) + \
                 ([f"{len(task.skipped)} pairs (cannot align)"] if task.skipped else [])
        log.info(f"skipped    {' and '.join(counts)}: listed in {Path(out) / SKIPPED} with the results "
                 "(--verbose prints them)")
        return
    if task.dropped:
        log.info(f"skipped    {len(task.dropped)} line pairs of the data (the reference's rules):")
        for where, reason in task.dropped:
            log.info(f"           {where}: {reason}")
    if task.skipped:
        log.info(f"skipped    {len(task.skipped)} pairs that cannot be aligned:")
        for label, reason in task.skipped:
            log.info(f"           {label}: {reason}")


def _check_out(args) -> None:
    """A --out that cannot be a folder is refused before the model is loaded."""
    if getattr(args, "out", None) is not None:
        check_out(args.out)


def cmd_info(args) -> None:
    model_spec = from_args(ModelSpec, args)
    model, tokenizer = model_spec.load()
    log.info(model_summary(model, model_spec.model))
    if tokenizer is not None:
        log.info(next_tokens(model, tokenizer, args.prompt))
    if args.time:
        compile_s, step_s = time_gated_step(model, args.site, args.batch, args.length)
        log.info(f"gated fwd+bwd ({args.site}, batch {args.batch} x {args.length} tokens): "
                 f"compile {compile_s:.1f} s, step {step_s:.2f} s (median of 3)")


def cmd_trace(args) -> None:
    _check_out(args)
    search, objective = from_args(SearchConfig, args), from_args(ObjectiveConfig, args)
    mesh = _mesh(args)
    model_spec, model, task_spec, task = _load(args)
    log.info(model_summary(model, model_spec.model))
    log.info(f"task       {task_spec.task}: {len(task)} pairs; site {objective.site}; results in {args.out}")
    if args.budgets is not None:
        if args.target_size is not None:
            raise ValueError("--budgets and --target-size: give one of them")
        result = trace_budgets(build_objective(model, task, objective, mesh=mesh), search, args.budgets,
                               out=args.out, resume=args.resume, overwrite=args.overwrite,
                               progress=not args.no_progress, provenance=Provenance(model_spec.model, task_spec))
        log.info(budgets_summary(result, Path(args.out)))
        return
    circuit = trace(model, task, objective, search, mesh=mesh, out=args.out, resume=args.resume,
                    overwrite=args.overwrite, target_size=args.target_size, progress=not args.no_progress,
                    provenance=Provenance(model_spec.model, task_spec))
    log.info(circuit_summary(circuit, Path(args.out)))


def budgets_summary(result: BudgetedTrace, out: Path) -> str:
    """One line per budget: its circuit's size, effect and MIB faithfulness."""
    lines = [f"budgets    {','.join(map(str, result.budgets))} ({result.direction} direction), "
             f"all components {result.effect_all:+.4f}, {result.seconds:.0f} s"]
    for (k, circuit), effect, f in zip(result.circuits.items(), result.effect, result.faithfulness):
        lines.append(f"  budget {k}: {circuit.n_selected} of {circuit.n_components} components, effect {effect:+.4f}, "
                     f"faithfulness {f:+.3f}")
    lines.append(f"written    {out / 'budgets.json'}, circuits/, log.csv, ranking.png")
    return "\n".join(lines)


def cmd_demo(args) -> None:
    """A trace with the demo's defaults; a second call resumes (or just re-reports) the first."""
    args.resume = args.resume or (Path(args.out) / "checkpoints").is_dir()
    cmd_trace(args)


def cmd_baseline(args) -> None:
    _check_out(args)
    objective = from_args(ObjectiveConfig, args)
    mesh = _mesh(args)
    model_spec, model, task_spec, task = _load(args)
    circuit = baseline(model, task, objective, from_args(BaselineConfig, args), mesh=mesh, out=args.out, overwrite=args.overwrite, provenance=Provenance(model_spec.model, task_spec))
    log.info(circuit_summary(circuit, Path(args.out)))


def cmd_compare(args) -> None:
    _check_out(args)
    search, config = from_args(SearchConfig, args), from_args(ObjectiveConfig, args)
    curve = from_args(CurveConfig, args)
    mesh = _mesh(args)
    model_spec, model, task_spec, task = _load(args)
    objective = build_objective(model, task, config, mesh=mesh)
    result = compare_run(objective, search, curve, out=args.out, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.no_progress,
                         provenance=Provenance(model_spec.model, task_spec))
    log.info(table_markdown(result))
    log.info(methods_markdown(result))
    log.info(f"written    {Path(args.out) / 'report.md'}, curve.md, curve.json, curve.png, faithfulness.png"
             + (", mib/" if curve.mib else ""))


def cmd_stability(args) -> None:
    search, config = from_args(SearchConfig, args), from_args(ObjectiveConfig, args)
    mesh = _mesh(args)
    model_spec, model, task_spec, task = _load(args)
    objective = build_objective(model, task, config, mesh=mesh)
    result = stability_run(objective, search, from_args(StabilityConfig, args), out=args.out, resume=args.resume,
                           overwrite=args.overwrite, progress=not args.no_progress,
                           provenance=Provenance(model_spec.model, task_spec))
    log.info(summary(result))
    log.info(f"written    {Path(args.out) / 'stability.json'}, selection_frequency.png")


def parse_selection(text: str) -> list[list[int]]:
    """"3.7,10.2" -> [[3, 7], [10, 2]]."""
    try:
        selection = [[int(part) for part in item.split(".")] for item in text.split(",") if item.strip()]
    except ValueError:
        selection = []
    if not selection or any(len(item) != 2 for item in selection):
        raise ValueError(f"--select takes layer.index pairs separated by commas (e.g. 3.7,10.2), got {text!r}")
    return selection


def cmd_evaluate(args) -> None:
    """The effect of a circuit file's selection or of --select, on the circuit's own task and model unless told."""
    if (args.circuit is None) == (args.select is None):
        raise ValueError("give exactly one of --circuit and --select")
    selection = None if args.select is None else parse_selection(args.select)
    circuit = None if args.circuit is None else Circuit.read(args.circuit)
    if circuit is None and given(TaskSpec, args, "task") is None:
        raise ValueError("--select needs --task (and --data)")
    if given(TaskSpec, args, "task") is not None:
        task_spec = from_args(TaskSpec, args)
    elif circuit.task is None:
        raise ValueError(f"{args.circuit} records no task: give --task (and --data)")
    else:
        task_spec = TaskSpec.from_record(circuit.task, circuit.data, circuit.task_options)
    site = given(ObjectiveConfig, args, "site") or (circuit.site if circuit else None)
    if site is None:
        raise ValueError("--select needs --site")
    config = from_args(ObjectiveConfig, args, site=site, batch_size=(
        given(ObjectiveConfig, args, "batch_size") or (circuit.batch_size if circuit else None) or 32))
    config = dataclasses.replace(config, metric=config.metric or (circuit.metric if circuit else None))
    model = given(ModelSpec, args, "model") or (circuit.model if circuit else None) or ModelSpec().model
    if circuit is not None:
        check_circuit_model(Path(args.circuit), circuit, model, given(ModelSpec, args, "model") is not None)
    mesh = _mesh(args)
    _, loaded, _, task = _load(args, model=model, task=task_spec)
    if selection is not None:
        n_layers, width = gate_shape(loaded.config, site)
        outside = [f"{layer}.{index}" for layer, index in selection
                   if not (0 <= layer < n_layers and 0 <= index < width)]
        if outside:
            raise ValueError(f"--select {args.select}: {', '.join(outside)} outside the {n_layers} x {width} grid of "
                             f"{site} components (layer.index, from 0)")
    objective = build_objective(loaded, task, config, mesh=mesh)
    result = evaluate_selection(objective, circuit.selected if circuit else selection)
    log.info(f"{result.n_selected} of {result.n_components} {site} components on {result.n_pairs} pairs: "
             f"effect {result.effect:+.4f} (all {result.effect_all:+.4f}, none {result.effect_none:+.4f})")
    if args.json:
        log.info(json.dumps(result.to_dict()))


def check_circuit_model(path: Path, circuit: Circuit, model: str, named: bool) -> None:
    """Refuse to evaluate a circuit on a model other than the one it was traced on: a config of another shape
    (`model_config`, the dtype aside), or weights other than the ones its run recorded (`run.json` next to it,
    `identity.model.weights`, for a model loaded from a file). Neither reads the weights' tensors."""
    who = f"--model {model}" if named else f"its model {model}"
    config = json.loads(json.dumps(dataclasses.asdict(load_config(model))))
    for field, traced in circuit.model_config.items():
        if field != "dtype" and json.loads(json.dumps(traced)) != config.get(field):
            raise ValueError(f"{path} was traced on a model with {field} {traced}; {who} has {config.get(field)}")
    run_file = path.parent / IDENTITY
    if circuit.model is None or not run_file.is_file():
        return
    record = read_json(run_file, "run identity")
    recorded = record.get("identity", {}).get("model", {}).get("weights") if isinstance(record, dict) else None
    current = weights_digest(model) if isinstance(recorded, str) else None
    if current is not None and current != recorded:
        raise ValueError(f"{who}: its weights differ from the run's ({run_file} records sha256 {recorded[:16]}..., "
                         f"the files have {current[:16]}...)")


def cmd_plan(args) -> None:
    """Per-device memory and FLOPs of the training step and the mask evaluation, from XLA's compile-time analysis."""
    model, objective, config = from_args(ModelSpec, args), from_args(ObjectiveConfig, args), from_args(PlanConfig, args)
    shape = from_args(TaskShape, args)
    task = shape
    if given(TaskSpec, args, "task") is not None:
        if shape != TaskShape():
            raise ValueError("--pairs, --prompt-tokens, --target-tokens, --targets and --prefix-tokens describe a "
                             "task by its sizes: give them or --task, not both")
        task = from_args(TaskSpec, args)
    report = plan(model.model, task, objective, dtype=model.dtype, mesh=given(MeshSpec, args, "mesh"),
                  devices=config.devices, masks=config.masks, runs=config.runs,
                  device_memory_gb=config.device_memory_gb, tokenizer=model.tokenizer)
    log.info(json.dumps(report.to_dict()) if args.json else format_plan(report))


def cmd_export(args) -> None:
    EXPORT_FORMATS[args.format](Circuit.read(args.circuit), Path(args.out))
    log.info(f"wrote {args.out} ({args.format})")


def cmd_sweep(args) -> None:
    """Every (model, task) pair, finished pairs skipped and killed ones resumed; then the table and report."""
    _check_out(args)
    search, objective = from_args(SearchConfig, args), from_args(ObjectiveConfig, args)
    unknown = [name for name in args.tasks if name not in TASK_LOADERS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASK_LOADERS)}")
    tasks = [sweep_task(args, name) for name in args.tasks]
    model_spec = from_args(ModelSpec, args, model=args.models[0])
    mesh = _mesh(args)

    def load(spec: str):
        return dataclasses.replace(model_spec, model=spec).load()

    sweep_models(args.models, tasks, objective, args.out, search, progress=not args.no_progress, load=load,
                 mesh=mesh, overwrite=args.overwrite)
    log.info(summary_table(find_circuits(args.out)))
    log.info(f"report     {Path(args.out) / 'report.md'}")


def sweep_task(args, name: str) -> TaskSpec:
    """One task of a sweep, with the task options that apply to it (an option may apply to another task)."""
    return from_args(TaskSpec, args, task=name, **{
        f.name: f.default for f in dataclasses.fields(TaskSpec)
        if f.metadata["tasks"] is not None and name not in f.metadata["tasks"]})


def circuit_summary(circuit: Circuit, out: Path) -> str:
    if get_site(circuit.site).labels is None:
        selected = ", ".join(f"{layer}.{index}" for layer, index in circuit.selected[:40])
    else:  # components named by the site (edges "a0.h1->m1"), one row
        labels = component_labels(ModelConfig.from_dict(circuit.model_config), circuit.site)
        selected = ", ".join(labels[index] for _, index in circuit.selected[:40])
    more = " ..." if circuit.n_selected > 40 else ""
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in (
        "circuit.json", "checkpoints", "run.json"))
    scores = [] if circuit.score_correlation is None else [
        f"scores     {circuit.method}: rank correlation with the effects alone {circuit.score_correlation:+.3f}"]
    return "\n".join([
        f"circuit    {circuit.n_selected} of {circuit.n_components} {circuit.site} components: {selected}{more}",
        f"effect     circuit {circuit.effect:+.4f} | all components {circuit.effect_all:+.4f} | "
        f"none {circuit.effect_none:+.4f}   (mean indirect effect over {circuit.n_pairs} pairs)",
        *scores,
        f"status     {circuit.status}",
        f"time       {circuit.seconds:.0f} s" + (f" for {len(circuit.history)} epochs" if circuit.history else ""),
        f"written    {out / 'circuit.json'}, " + ", ".join(written),
    ])


def _budgets(text: str) -> str | list[int]:
    try:
        return parse_budgets(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


class UsageError(ValueError):
    """A command line argparse refuses (printed as one line, not as the usage)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


# The commands that load a task (and report what it leaves out).
LOADS_TASK = ("trace", "demo", "baseline", "compare", "stability", "evaluate")


def add_resume(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--resume", action="store_true", help="continue (or re-report) the run in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxtrace", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, groups=(ModelSpec, TaskSpec, ObjectiveConfig, MeshSpec),
                out: str | None = None, defaults: dict | None = None, exclude: dict | None = None
                ) -> argparse.ArgumentParser:
        """A subcommand with the flags of the config records `groups` (`defaults` and `exclude` per record)."""
        sub = commands.add_parser(name, help=help, description=help)
        for cls in groups:
            add_options(sub, cls, GROUP_TITLES[cls], (defaults or {}).get(cls), (exclude or {}).get(cls, ()))
        if out is not None:
            group = sub.add_argument_group("results")
            group.add_argument("--out", required=out == "required", default=None if out == "required" else out,
                               help="result folder" + ("" if out == "required" else f" (default: {out})"))
            group.add_argument("--overwrite", action="store_true", help="replace the run the folder holds")
            group.add_argument("--no-progress", action="store_true", help="no progress bar")
        sub.add_argument("--no-compile-cache", action="store_true",
                         help="compile every program anew (default: reuse them from the cache folder's compile/)")
        if name in LOADS_TASK:
            sub.add_argument("--verbose", action="store_true",
                             help="print every data line and pair the task leaves out (default: how many, and "
                                  "where the list is: skipped.csv in --out)")
        sub.set_defaults(run=run)
        return sub

    info = command("info", cmd_info, "model summary, a forward pass, optionally the gated step time",
                   groups=(ModelSpec,))
    info.add_argument("--prompt", default="The nurse said that")
    info.add_argument("--time", action="store_true", help="time a jitted gated forward+backward")
    info.add_argument("--site", default="attn_pattern", choices=list(MODEL_SITES))
    info.add_argument("--batch", type=int, default=32)
    info.add_argument("--length", type=int, default=16)

    searching = (ModelSpec, TaskSpec, ObjectiveConfig, SearchConfig, MeshSpec)
    no_init = {SearchConfig: ("init",)}
    for name, run, help_text, defaults, out in (
            ("trace", cmd_trace, "find a circuit with PGB-CT", None, "required"),
            ("demo", cmd_demo, "the main job: SmolLM2-135M, WinoBias dev, attention heads",
             {TaskSpec: {"task": "winobias"}}, "results/demo")):
        sub = command(name, run, help_text, searching, out, defaults, no_init)
        add_resume(sub)
        sub.add_argument("--target-size", type=int,
                         help="search λ (vmapped sweeps) for a circuit of about this many components")
        sub.add_argument("--budgets", type=_budgets, metavar="BUDGETS",
                         help="one circuit per budget k, each of at most k components, all budgets as the runs of "
                              "one vmapped program, and their merged ranking: comma-separated sizes such as 1,2,5,13, "
                              "or mib (MIB's fractions of the components)")

    base = command("baseline", cmd_baseline, "a baseline circuit on the same objective", out="required")
    add_options(base, BaselineConfig, "baseline")

    comp = command("compare", cmd_compare, "the evaluation report: effect against size, effect share and "
                   "faithfulness (MIB's CPR, CMD) of PGB-CT, greedy, top-k, random, single, AtP and IG", searching,
                   "required", exclude={SearchConfig: ("init", "direction", "sense")})  # --direction: the curve's
    add_options(comp, CurveConfig, "curve")
    add_resume(comp)

    stable = command("stability", cmd_stability, "PGB-CT over seeds x bootstrap resamples of the pairs (one vmapped "
                     "sweep): selection frequency, Jaccard similarity, effect interval", searching, "required",
                     exclude=no_init)
    add_options(stable, StabilityConfig, "stability")
    add_resume(stable)

    evaluate = command("evaluate", cmd_evaluate, "the effect of a given subset of components", defaults={
        ModelSpec: {"model": None}, TaskSpec: {"task": None},  # default: the circuit file's
        ObjectiveConfig: {"site": None, "batch_size": None}})
    evaluate.add_argument("--circuit", help="circuit.json (its model, task, site and metric unless given)")
    evaluate.add_argument("--select", help="components as layer.index, comma separated (e.g. 3.7,10.2)")
    evaluate.add_argument("--json", action="store_true", help="also print the result as JSON")

    sweep = command("sweep", cmd_sweep, "every model x task pair (resumable) and a cross-model report", searching,
                    "required", exclude={**no_init, ModelSpec: ("model",), TaskSpec: ("task",)})
    sweep.add_argument("--models", type=_comma_list, required=True,
                       help="comma-separated HF folders, .gguf files or registered names")
    sweep.add_argument("--tasks", type=_comma_list, required=True, help="comma-separated tasks")

    planning = command("plan", cmd_plan, "per-device memory and FLOPs of a run's training step and mask evaluation, "
                       "from XLA's compile-time analysis of abstract shapes (no weights are read; --model also takes "
                       "a config.json or a shape preset: " + ", ".join(CONFIG_PRESETS) + ")",
                       groups=(ModelSpec, TaskSpec, ObjectiveConfig, MeshSpec, TaskShape, PlanConfig),
                       defaults={TaskSpec: {"task": None}},
                       exclude={ModelSpec: ("allow_pickle",), MeshSpec: ("coordinator", "num_processes",
                                                                         "process_id", "coordinator_timeout")})
    planning.add_argument("--json", action="store_true", help="print the report as JSON")

    export = commands.add_parser("export", help="write a circuit in another tool's format")
    export.add_argument("--circuit", required=True)
    export.add_argument("--format", default="eap", choices=list(EXPORT_FORMATS))
    export.add_argument("--out", required=True)
    export.set_defaults(run=cmd_export)
    return parser


@contextlib.contextmanager
def _console():
    """Messages to stdout from process 0 only (other processes of a multi-host run stay quiet)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: is_writer())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    propagate, log.propagate = log.propagate, False  # not again through a root handler another library set up
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"jaxtrace: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    if not os.environ.get("JAXTRACE_DEBUG"):
        quiet_background_errors()
    with _console():
        if not getattr(args, "no_compile_cache", True):
            enable_compilation_cache()
        try:
            args.run(args)
        except KeyboardInterrupt:
            print("jaxtrace: interrupted" + ("; resume with --resume" if hasattr(args, "resume") else ""),
                  file=sys.stderr)
            return 130
        except Exception as error:  # every failure is one line; JAXTRACE_DEBUG=1 shows the traceback
            if os.environ.get("JAXTRACE_DEBUG"):
                raise
            print(f"jaxtrace: error: {one_line(error)}", file=sys.stderr)
            return 2
    return 0


