"""jaxtrace: multi-component causal tracing (PGB-CT) of language models in JAX.

The public face: load a model and a task, build the objective, search it, read the circuit.

    model, tokenizer = jaxtrace.load_model("smollm2-135m")
    task = jaxtrace.build_task("winobias", "data/", tokenizer, split="dev")
    circuit = jaxtrace.trace(model, task, "attn_pattern", jaxtrace.SearchConfig(epochs=15), out="results/wb")
    report = jaxtrace.plan("llama-3.1-8b", jaxtrace.TaskShape(pairs=1000), devices=64, mesh="data=8,model=8")

Layers (each imports only those before it): `core` (pure JAX: sites, models, packing, objective, metrics, search),
`tasks` (loaders, tokenisation), `engine` (host side: batches, devices, mask evaluation, faithfulness, the search
loop), `io` (model loading, checkpoints, result folders, circuits, export, plots), `runs` (trace, baselines, curve,
stability, sweeps) and `cli`.
"""

from jaxtrace.core.metrics import METRICS, Metric
from jaxtrace.core.models import GatedLM, ModelConfig, init_model
from jaxtrace.core.search import SearchConfig
from jaxtrace.core.sites import SITES, full_gates, gate_shape
from jaxtrace.engine.loop import run_search, run_searches
from jaxtrace.engine.objective import Objective, build_objective
from jaxtrace.io.circuit import Circuit
from jaxtrace.io.loading import load_model
from jaxtrace.runs.common import Provenance
from jaxtrace.runs.plan import TaskShape, plan
from jaxtrace.runs.trace import trace
from jaxtrace.tasks import EncodedTask, TaskSpec, build_task
from jaxtrace.version import __version__

__all__ = ["Circuit", "EncodedTask", "GatedLM", "METRICS", "Metric", "ModelConfig", "Objective", "Provenance", "SITES",
           "SearchConfig", "TaskShape", "TaskSpec", "__version__", "build_objective", "build_task", "full_gates",
           "gate_shape", "init_model", "load_model", "plan", "run_search", "run_searches", "trace"]
