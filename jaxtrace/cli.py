"""The `jaxtrace` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxtrace
from jaxtrace import parallel
from jaxtrace.checkpoint import CheckpointError
from jaxtrace.export import EXPORT_FORMATS
from jaxtrace.models import SITES, full_gates, functional, gate_shape
from jaxtrace.metrics import METRICS, TRANSFORMS
from jaxtrace.objective import Objective
from jaxtrace.search import PENALTIES, SCHEDULES, SearchConfig
from jaxtrace.tasks import TASK_LOADERS
from jaxtrace.tasks.encode import POSITIONS
from jaxtrace.baselines import METHODS
from jaxtrace.compare import compare, table_markdown, write_curve_plot
from jaxtrace.tracing import baseline, build_task, evaluate_selection, trace, write_json
from jaxtrace.families import find_circuits, run_family_sweep, summary_table



def _summary(model, spec: str) -> str:
    c = model.config
    lines = [
        f"model      {spec}: {c.model_type} ({c.family} family), {c.n_params / 1e6:.1f}M parameters, {c.dtype}",
        f"shape      {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} query / {c.n_kv_heads} KV heads of "
        f"{c.head_dim}, d_ff {c.d_ff}, vocab {c.vocab_size}",
        "gate sites " + ", ".join(f"{s} {list(gate_shape(c, s))}" for s in SITES),
    ]
    return "\n".join(lines)


def time_gated_step(model, site: str = "attn_pattern", batch: int = 32, length: int = 16, steps: int = 3):
    """(compile seconds, median step seconds) of a jitted gated forward+backward w.r.t. one site's gates."""
    apply, params = functional(model)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, length)))
    source_ids = jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, length)))
    _, source = jax.jit(lambda p, x: apply(p, x, method="capture", sites=(site,)))(params, source_ids)

    @jax.jit
    def step(gates, params, ids, source):
        def loss(gates):
            logits = apply(params, ids, gates=gates, source=source)
            return jax.nn.log_softmax(logits[:, -1]).mean()
        return jax.value_and_grad(loss)(gates)

    gates = full_gates(model.config, [site], 0.5)
    start = time.perf_counter()
    compiled = step.lower(gates, params, ids, source).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(gates, params, ids, source))
        times.append(time.perf_counter() - start)
    return compile_s, float(np.median(times))


def cmd_info(args) -> None:
    start = time.perf_counter()
    model, tokenizer = jaxtrace.load_model(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                           tokenizer=args.tokenizer)
    print(_summary(model, args.model))
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    if tokenizer is not None:
        ids = tokenizer(args.prompt, return_tensors="np")["input_ids"]
        logits = np.asarray(model(ids))[0, -1]
        top = np.argsort(logits)[::-1][:5]
        print(f"prompt     {args.prompt!r} -> next tokens " +
              ", ".join(f"{tokenizer.decode([int(t)])!r} {logits[t]:.2f}" for t in top))
        he, she = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" he", " she"))
        print(f"           logit(' he') - logit(' she') = {logits[he] - logits[she]:+.3f}")
    if args.time:
        compile_s, step_s = time_gated_step(model, args.site, args.batch, args.length)
        print(f"gated fwd+bwd ({args.site}, batch {args.batch} x {args.length} tokens): "
              f"compile {compile_s:.1f} s, step {step_s:.2f} s (median of 3)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or registered name")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickled pytorch_model.bin weights")


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=list(TASK_LOADERS))
    parser.add_argument("--data", help="data folder (or the JSONL file for --task custom); binding needs none")
    parser.add_argument("--split", default="dev", choices=["dev", "test"], help="winobias split")
    parser.add_argument("--stats", default="bergsma", choices=["bergsma", "bls"], help="winogender statistics")
    parser.add_argument("--reference-pronouns", action="store_true",
                        help="use she/he even in possessive examples, as the reference does (default: her/his)")
    parser.add_argument("--metric", default="probability_ratio", choices=list(METRICS),
                        help="the effect measured (accuracy trains on the logit difference)")
    parser.add_argument("--limit", type=int, help="counterfact: the first N records")
    parser.add_argument("--positions", default="prompt", choices=list(POSITIONS),
                        help="where gates apply: every prompt token, the last, or the subject's tokens")
    parser.add_argument("--noise-on", default="prompt", choices=["prompt", "subject"],
                        help="counterfact: noise on every prompt token (reference) or the subject's (ROME)")
    parser.add_argument("--noise-std", type=float, help="counterfact: absolute noise std")
    parser.add_argument("--noise-scale", type=float, default=3.0,
                        help="counterfact: noise std as a multiple of the token embeddings' std (default 3)")
    parser.add_argument("--operands", type=_int_range, default=(10, 99),
                        help="binding: operand range LOW-HIGH (default 10-99, the reference's; small models: 1-9)")
    parser.add_argument("--per-digit", type=int, default=5, help="binding: pairs per answer first digit")
    parser.add_argument("--desiderata", default="value,task", help="binding: value and/or task switch pairs")
    parser.add_argument("--task-seed", type=int, default=1234, help="binding: prompt generation seed")


def _add_batch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="result folder")
    parser.add_argument("--site", default="attn_pattern", choices=list(SITES))
    parser.add_argument("--samples", type=int, default=100, help="random subsets drawn per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per batch")
    parser.add_argument("--memory-gb", type=float, default=2.0,
                        help="memory budget of one batched mask evaluation (sets how many masks run at once)")


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devices and hosts (see jaxtrace.parallel)")
    group.add_argument("--mesh", help="device mesh data=D,model=M (default: every device on data); pairs are split "
                       "over data, parameters over model")
    group.add_argument("--coordinator", help="multi-host: address host:port of process 0 (default: "
                       "$JAX_COORDINATOR_ADDRESS, or detected on TPU pods, SLURM and Open MPI)")
    group.add_argument("--num-processes", type=int, help="multi-host: number of processes ($JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="multi-host: this process's index ($JAX_PROCESS_ID)")


def _device_mesh(args):
    """Join a multi-host run if one is configured, then the mesh of `--mesh` (None on a single device)."""
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if not parallel.is_writer():  # one report and one progress bar, from process 0
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    if args.mesh is None and jax.device_count() == 1:
        return None
    mesh = parallel.parse_mesh(args.mesh)
    print(f"mesh       data={mesh.shape['data']} x model={mesh.shape['model']} over {jax.device_count()} "
          f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)")
    return mesh


def _task_options(args) -> dict:
    return {"winobias": {"split": args.split, "fix_possessive": not args.reference_pronouns},
            "winogender": {"stats": args.stats, "fix_possessive": not args.reference_pronouns},
            "counterfact": {"limit": args.limit},
            "binding": {"operands": args.operands, "per_digit": args.per_digit, "seed": args.task_seed,
                        "desiderata": tuple(args.desiderata.split(","))}}.get(args.task, {})


def _int_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range LOW-HIGH such as 10-99, got {text!r}") from None


def _load(args):
    model, tokenizer = jaxtrace.load_model(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                           tokenizer=args.tokenizer)
    options = _task_options(args)
    task = build_task(args.task, args.data, tokenizer, positions=args.positions, noise_positions=args.noise_on,
                      noise_std=args.noise_std, noise_scale=args.noise_scale, **options)
    options = {**options, "positions": args.positions}
    if task.corruption == "noise":
        options.update(noise_on=args.noise_on, noise_std=args.noise_std, noise_scale=args.noise_scale)
    if task.skipped:
        print(f"skipped {len(task.skipped)} misaligned pairs, e.g. {task.skipped[0][0]}: {task.skipped[0][1]}")
    return model, task, options


def cmd_trace(args) -> None:
    transform = args.transform or ("inverse" if METRICS[args.metric].trained.ratio else "neg")
    config = SearchConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda1=args.lambda1,
                          lambda2=args.lambda2, schedule=args.schedule, penalty=args.penalty, transform=transform,
                          threshold=args.threshold, max_components=args.max_components, seed=args.seed)
    mesh = _device_mesh(args)
    model, task, options = _load(args)
    print(_summary(model, args.model))
    print(f"task       {args.task}: {len(task)} pairs; site {args.site}; results in {args.out}")
    metadata = {"model": args.model, "task": args.task, "task_options": options, "data": str(args.data)}
    circuit = trace(model, task, args.site, config, out=args.out, resume=args.resume,
                    progress=not args.no_progress, metadata=metadata, target_size=args.target_size,
                    metric=args.metric, mesh=mesh)
    print(_circuit_summary(circuit, Path(args.out)))


def cmd_baseline(args) -> None:
    mesh = _device_mesh(args)
    model, task, options = _load(args)
    metadata = {"model": args.model, "task": args.task, "task_options": options, "data": str(args.data)}
    circuit = baseline(model, task, args.site, args.method, args.k, n_samples=args.samples, seed=args.seed,
                       batch_size=args.batch_size, memory_budget=int(args.memory_gb * 2**30), out=args.out,
                       metadata=metadata, metric=args.metric, mesh=mesh)
    print(_circuit_summary(circuit, Path(args.out)))


def cmd_compare(args) -> None:
    mesh = _device_mesh(args)
    model, task, options = _load(args)
    config = SearchConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda1=args.lambda1,
                          lambda2=args.lambda2, seed=args.seed,
                          transform="inverse" if METRICS[args.metric].trained.ratio else "neg")
    objective = Objective(model, task, args.site, args.batch_size, metric=args.metric, mesh=mesh)
    factors = np.geomspace(args.lambda_range[0], args.lambda_range[1], args.n_lambdas)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def report(result: dict) -> None:
        if not parallel.is_writer():
            return
        write_json(out / "curve.json", {"model": args.model, "task": args.task, "task_options": options, **result})
        (out / "curve.md").write_text(table_markdown(result) + "\n")
        write_curve_plot(result, out / "curve.png")

    result = compare(objective, config, args.sizes, factors, greedy_max=args.greedy_max,
                     greedy_candidates=args.greedy_candidates, n_random=args.samples, seed=args.seed,
                     memory_budget=int(args.memory_gb * 2**30), progress=not args.no_progress, report=report)
    print(table_markdown(result))
    print(f"written    {out / 'curve.json'}, curve.md, curve.png")


def _circuit_summary(circuit: dict, out: Path) -> str:
    selected = ", ".join(f"{l}.{i}" for l, i in circuit["selected"][:40])
    more = " ..." if circuit["n_selected"] > 40 else ""
    rows = [
        f"circuit    {circuit['n_selected']} of {circuit['n_components']} {circuit['site']} components: "
        f"{selected}{more}",
        f"effect     circuit {circuit['effect']:+.4f} | all components {circuit['effect_all']:+.4f} | "
        f"none {circuit['effect_none']:+.4f}   (mean indirect effect over {circuit['n_pairs']} pairs)",
        f"status     {circuit['status']}",
        f"time       {circuit['seconds']:.0f} s"
        + (f" for {len(circuit['history'])} epochs" if circuit["history"] else ""),
        f"written    {out / 'circuit.json'}, " + ", ".join(sorted(p.name for p in out.iterdir() if p.name not in (
            "circuit.json", "checkpoints"))),
    ]
    return "\n".join(rows)


def _parse_selection(text: str) -> list[list[int]]:
    try:
        return [[int(part) for part in item.split(".")] for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--select takes layer.index pairs separated by commas (e.g. 3.7,10.2), got {text!r}")


def cmd_evaluate(args) -> None:
    if (args.circuit is None) == (args.select is None):
        raise ValueError("give exactly one of --circuit and --select")
    if args.circuit is not None:
        circuit = json.loads(Path(args.circuit).read_text())
        selected, site = circuit["selected"], args.site or circuit["site"]
    else:
        if args.site is None:
            raise ValueError("--select needs --site")
        selected, site = _parse_selection(args.select), args.site
    mesh = _device_mesh(args)
    model, task, _ = _load(args)
    result = evaluate_selection(model, task, site, selected, metric=args.metric, mesh=mesh)
    print(f"{result['n_selected']} of {result['n_components']} {site} components on {result['n_pairs']} pairs: "
          f"effect {result['effect']:+.4f} (all {result['effect_all']:+.4f}, none {result['effect_none']:+.4f})")
    if args.json:
        print(json.dumps(result))


def cmd_export(args) -> None:
    circuit = json.loads(Path(args.circuit).read_text())
    EXPORT_FORMATS[args.format](circuit, Path(args.out))
    print(f"wrote {args.out} ({args.format})")


def cmd_demo(args) -> None:
    """A trace with the demo's defaults; a second call resumes (or just re-reports) the first."""
    args.resume = Path(args.out, "checkpoints").is_dir()
    cmd_trace(args)


def cmd_sweep(args) -> None:
    """Every (model, task) pair, finished pairs skipped and killed ones resumed; then the table and report."""
    config = SearchConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda1=args.lambda1,
                          lambda2=args.lambda2, schedule=args.schedule, penalty=args.penalty, seed=args.seed,
                          transform="inverse" if METRICS[args.metric].trained.ratio else "neg")
    task_options = {}
    for task in args.tasks:
        options = {**_task_options(argparse.Namespace(**{**vars(args), "task": task})), "positions": args.positions}
        if task == "counterfact":
            options.update(noise_positions=args.noise_on, noise_std=args.noise_std, noise_scale=args.noise_scale)
        task_options[task] = options

    mesh = _device_mesh(args)

    def load(spec: str):
        return jaxtrace.load_model(spec, dtype=args.dtype, allow_pickle=args.allow_pickle, tokenizer=args.tokenizer)

    run_family_sweep(args.models, args.tasks, args.site, args.out, args.data, config, task_options,
                     metric=args.metric, progress=not args.no_progress, load=load, mesh=mesh)
    print(summary_table(find_circuits(args.out)))
    print(f"report     {Path(args.out) / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrace", description=__doc__)
    parser.add_argument("--version", action="version", version=jaxtrace.__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="model summary, a forward pass, optionally the gated step time")
    _add_model_args(info)
    info.add_argument("--prompt", default="The nurse said that")
    info.add_argument("--time", action="store_true", help="time a jitted gated forward+backward")
    info.add_argument("--site", default="attn_pattern", choices=list(SITES))
    info.add_argument("--batch", type=int, default=32)
    info.add_argument("--length", type=int, default=16)
    info.set_defaults(run=cmd_info)

    trace_cmd = commands.add_parser("trace", help="find a circuit with PGB-CT")
    _add_model_args(trace_cmd)
    _add_task_args(trace_cmd)
    trace_cmd.add_argument("--site", default="attn_pattern", choices=list(SITES))
    trace_cmd.add_argument("--out", required=True, help="result folder")
    _add_parallel_args(trace_cmd)
    trace_cmd.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    trace_cmd.add_argument("--no-progress", action="store_true")
    defaults = SearchConfig()
    for field in dataclasses.fields(SearchConfig):
        if field.name == "init":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = {"lr": float, "max_components": int}.get(field.name, type(field.default))
        default = None if field.name == "transform" else getattr(defaults, field.name)
        choices = {"schedule": list(SCHEDULES), "penalty": list(PENALTIES),
                   "transform": list(TRANSFORMS)}.get(field.name)
        trace_cmd.add_argument(flag, type=kind, default=default, choices=choices)
    trace_cmd.add_argument("--target-size", type=int,
                           help="search λ (vmapped sweeps) for a circuit of about this many components")
    trace_cmd.set_defaults(run=cmd_trace)

    demo = commands.add_parser("demo", parents=[trace_cmd], add_help=False, conflict_handler="resolve",
                               help="the main job: SmolLM2-135M, WinoBias dev, attention heads")
    demo.add_argument("--task", default="winobias", choices=list(TASK_LOADERS))
    demo.add_argument("--out", default="results/demo")
    demo.set_defaults(run=cmd_demo)

    base = commands.add_parser("baseline", help="a baseline circuit on the same objective")
    _add_model_args(base)
    _add_task_args(base)
    base.add_argument("--method", required=True, choices=list(METHODS))
    base.add_argument("--k", type=int, required=True, help="circuit size (single: the heat map, top-k selected)")
    _add_batch_args(base)
    _add_parallel_args(base)
    base.set_defaults(run=cmd_baseline)

    comp = commands.add_parser("compare", help="effect against size for PGB-CT, greedy, top-k and random")
    _add_model_args(comp)
    _add_task_args(comp)
    comp.add_argument("--sizes", type=lambda text: [int(x) for x in text.split(",")], default=[1, 2, 4, 8, 16, 32],
                      help="comma-separated circuit sizes for the baselines (PGB-CT's own sizes are added)")
    comp.add_argument("--n-lambdas", type=int, default=6, help="PGB-CT runs in the vmapped λ sweep")
    comp.add_argument("--lambda-range", type=float, nargs=2, default=[0.1, 10.0],
                      help="smallest and largest factor applied to --lambda1/--lambda2")
    comp.add_argument("--greedy-max", type=int, help="largest greedy size (default: the largest size)")
    comp.add_argument("--greedy-candidates", type=int,
                      help="greedy only over this many best components by single effect (default: all)")
    comp.add_argument("--epochs", type=int, default=defaults.epochs)
    comp.add_argument("--lr", type=float)
    comp.add_argument("--lambda1", type=float, default=defaults.lambda1)
    comp.add_argument("--lambda2", type=float, default=defaults.lambda2)
    comp.add_argument("--no-progress", action="store_true")
    _add_batch_args(comp)
    _add_parallel_args(comp)
    comp.set_defaults(run=cmd_compare)

    evaluate = commands.add_parser("evaluate", help="the effect of a given subset of components")
    _add_model_args(evaluate)
    _add_task_args(evaluate)
    evaluate.add_argument("--circuit", help="circuit.json")
    evaluate.add_argument("--select", help="components as layer.index, comma separated (e.g. 3.7,10.2)")
    evaluate.add_argument("--site", choices=list(SITES), help="default: the circuit's")
    evaluate.add_argument("--json", action="store_true", help="also print the result as JSON")
    _add_parallel_args(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    sweep = commands.add_parser("sweep", conflict_handler="resolve",
                                help="every model x task pair (resumable) and a cross-model report")
    _add_model_args(sweep)
    _add_task_args(sweep)
    comma_list = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    sweep.add_argument("--models", "--model", type=comma_list, required=True,
                       help="comma-separated HF folders, .gguf files or registered names")
    sweep.add_argument("--tasks", "--task", type=comma_list, required=True,
                       help=f"comma-separated tasks among {', '.join(TASK_LOADERS)}")
    sweep.add_argument("--site", default="attn_pattern", choices=list(SITES))
    sweep.add_argument("--out", required=True, help="sweep folder (a rerun skips finished pairs)")
    sweep.add_argument("--epochs", type=int, default=defaults.epochs)
    sweep.add_argument("--batch-size", type=int, default=defaults.batch_size)
    sweep.add_argument("--lr", type=float)
    sweep.add_argument("--lambda1", type=float, default=defaults.lambda1)
    sweep.add_argument("--lambda2", type=float, default=defaults.lambda2)
    sweep.add_argument("--schedule", default=defaults.schedule, choices=list(SCHEDULES))
    sweep.add_argument("--penalty", default=defaults.penalty, choices=list(PENALTIES))
    sweep.add_argument("--seed", type=int, default=defaults.seed)
    sweep.add_argument("--no-progress", action="store_true")
    _add_parallel_args(sweep)
    sweep.set_defaults(run=cmd_sweep)

    export = commands.add_parser("export", help="write a circuit in another tool's format")
    export.add_argument("--circuit", required=True)
    export.add_argument("--format", default="eap", choices=list(EXPORT_FORMATS))
    export.add_argument("--out", required=True)
    export.set_defaults(run=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError, FloatingPointError) as error:
        print(f"jaxtrace: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
