"""`jaxtrace plan`: its memory numbers are the compiled real programs' own, simulated meshes work, bad inputs are
one-line errors."""

import json

import jax
import numpy as np
import pytest

from jaxtrace.cli import main
from jaxtrace.core import edges
from jaxtrace.core.models import ModelConfig, init_model
from jaxtrace.core.search import SearchConfig, SearchState
from jaxtrace.engine import loop
from jaxtrace.engine.objective import ObjectiveConfig, build_objective, masks_per_chunk
from jaxtrace.engine.plan import PlanReport, TaskShape, layer_unroll, training_shape
from jaxtrace.io.loading import CONFIG_PRESETS, load_config, load_model
from jaxtrace.runs.plan import plan
from conftest import TINY_CONFIGS

HF = {**TINY_CONFIGS["llama"], "num_hidden_layers": 4}  # 4 layers: one more compilation counts a layer's FLOPs
SHAPE = TaskShape(pairs=20, prompt_tokens=8, target_tokens=2, prefix_tokens=5)
FLAGS = ["--pairs", "20", "--prompt-tokens", "8", "--target-tokens", "2", "--prefix-tokens", "5", "--site",
         "head_out", "--batch-size", "8", "--masks", "3"]


def test_plan_equals_the_compiled_programs(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(HF))  # the CLI's JSON plan of a tiny Llama's config.json
    assert main(["plan", "--model", str(tmp_path / "config.json"), *FLAGS, "--json"]) == 0
    report = PlanReport.from_dict(json.loads(capsys.readouterr().out.splitlines()[-1]))
    config = ModelConfig.from_hf(HF)
    assert report.config == config and report.devices == 1 and not report.simulated and report.masks == 3

    # The run's own programs, compiled on real arrays.
    objective = build_objective(init_model(config), SHAPE.encoded(), "head_out", 8)
    search = SearchConfig()
    step, _ = loop.training_step(objective.fresh(), search)
    state = loop.initial_state(objective, [search])
    state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
    batch, cache = loop.stacked_inputs(objective, [objective.batcher.in_order[0]], training_shape(objective, search))
    resolved = loop.resolve(objective, [search])
    inputs = objective.batcher.replicate(loop.run_inputs(objective, resolved, 0, [1.0]))
    compiled = step.lower(state, objective.params, batch, cache, inputs).compile()
    masks = np.zeros((3, *objective.shape), np.float32)
    evaluation = objective.fresh().programs.mask_effects().lower(
        objective.params, masks, *objective.batcher.put(objective.inputs(objective.batcher.in_order[0],
                                                                         objective.batcher.in_order_shape))).compile()
    for cost, real in ((report.training, compiled), (report.evaluation, evaluation)):
        memory = real.memory_analysis()
        assert (cost.argument_bytes, cost.output_bytes, cost.alias_bytes, cost.temp_bytes, cost.code_bytes) == (
            memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
            memory.temp_size_in_bytes, memory.generated_code_size_in_bytes)
        assert cost.total_bytes == (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                    - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                                    + memory.generated_code_size_in_bytes)
        assert cost.flops_scanned == real.cost_analysis()["flops"]
        assert cost.flops_scanned < cost.flops < config.n_layers * cost.flops_scanned  # the scan body counted once
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(objective.params))
    assert report.weight_bytes == weights and report.training.argument_bytes > weights
    assert report.cache_host_bytes == sum(a.nbytes for a in jax.tree.leaves(objective.cache))
    assert report.packed["training_rows"] == batch.rows.tokens.shape[2] and report.packed["prefix_slots"] > 0


@pytest.mark.slow
def test_simulated_mesh_in_a_subprocess():
    config = ModelConfig.from_hf(HF)
    report = plan(config, SHAPE, ObjectiveConfig("head_out", batch_size=8), devices=8, mesh="data=2,model=4",
                  masks=3)
    assert report.devices == 8 and report.simulated and report.platform == "cpu"
    assert report.mesh == {"data": 2, "model": 4} and report.config == config
    # Heads, KV heads, MLP units and vocabulary split over model=4 (the tiny model's 2 KV heads stay whole).
    c, dtype_bytes = config, 4
    per_layer = (c.d_model * c.n_heads * c.head_dim * 2 // 4 + c.d_model * c.n_kv_heads * c.head_dim * 2
                 + 3 * c.d_model * c.d_ff // 4 + 2 * c.d_model)
    expected = c.n_layers * per_layer + 2 * c.vocab_size * c.d_model // 4 + c.d_model
    assert report.weight_bytes == dtype_bytes * expected
    assert 0 < report.training.temp_bytes and report.training.flops > report.training.flops_scanned > 0


def test_configs_without_weights():
    smol = load_config("smollm2-135m")
    assert (smol.n_layers, smol.d_model, smol.n_heads, smol.n_kv_heads, smol.d_ff, smol.vocab_size) == (
        30, 576, 9, 3, 1536, 49152)
    sizes = {name: round(load_config(name).n_params / 1e9, 2) for name in CONFIG_PRESETS}
    assert sizes == {"llama-3.2-1b": 1.24, "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.55}
    assert load_config("llama-3.2-1b", "bfloat16").dtype == "bfloat16"
    assert [layer_unroll(n) for n in (1, 2, 3, 4, 7, 9, 30)] == [None, None, None, 2, None, 3, 2]
    with pytest.raises(FileNotFoundError, match="shape preset without weights"):
        load_model("llama-3.1-8b")


@pytest.mark.parametrize("flags, message", [
    (["--model", "no-such-model"], "not found"),
    (["--pairs", "0"], "--pairs must be a positive integer"),
    (["--prompt-tokens", "4", "--prefix-tokens", "4"], "--prefix-tokens must be between 0 and"),
    (["--task", "ioi", "--pairs", "10"], "give them or --task, not both"),
    (["--model", "llama-3.2-1b", "--task", "ioi"], "no tokenizer"),
    (["--devices", "0"], "--devices must be a positive integer"),
    (["--mesh", "data=3"], "--mesh"),
    pytest.param(["--devices", "2", "--mesh", "data=3"], "--mesh data=3",  # raised in the simulating subprocess
                 marks=pytest.mark.slow),
    (["--model", "CONFIG", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "NOT_JSON"], "not valid JSON model config"),
    (["--device-memory-gb", "-1"], "--device-memory-gb must be a positive number"),
    (["--device-memory-gb", "nan"], "--device-memory-gb must be a positive number, got nan"),
    (["--devices", "3", "--mesh", "data=2,model=2"], "--mesh data=2,model=2 needs 4 devices; there are 3"),
])
def test_bad_inputs_are_one_line_errors(flags, message, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(HF))
    (tmp_path / "notes.txt").write_text("not a config")
    paths = {"CONFIG": str(tmp_path / "config.json"), "NOT_JSON": str(tmp_path / "notes.txt")}
    assert main(["plan", *[paths.get(flag, flag) for flag in flags]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxtrace: error: ") and message in err, err


def test_edge_mask_evaluation_fits_its_memory_budget():
    """Through edges a mask carries every writer's delta: the masks one call evaluates (`masks_per_chunk`) must
    count them, or a call meant to fit the budget takes many times it (SmolLM2: 88 GiB for a 1 GiB budget)."""
    objective = build_objective(init_model(ModelConfig.from_hf(HF)), SHAPE.encoded(), "edges", 8,
                                memory_budget=64 << 20)
    masks = masks_per_chunk(objective, 4096)
    evaluation = objective.fresh().programs.mask_effects().lower(
        objective.params, np.zeros((masks, *objective.shape), np.float32),
        *objective.batcher.put(objective.inputs(objective.batcher.in_order[0],
                                                objective.batcher.in_order_shape))).compile()
    temp = evaluation.memory_analysis().temp_size_in_bytes
    print(f"{masks} masks a call: {temp / 2**20:.1f} MiB of XLA temp for a 64 MiB budget")
    assert 8 <= masks < 4096 and temp <= objective.memory_budget


def test_edge_training_step_keeps_the_deltas_once(tmp_path, capsys):
    """The edge step's memory grows with the writers' deltas, not with a float32 copy of them for every read
    (`jaxtrace.core.edges._mix`'s gradient rule): on a 16-layer model (81 writers, 32 reads) XLA's temp was 29 times
    the deltas' bytes with the einsum's own gradient, 15 with the rule."""
    config = {**HF, "num_hidden_layers": 16, "hidden_size": 128, "intermediate_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--pairs", "64", "--prompt-tokens", "20",
                 "--site", "edges", "--dtype", "float32", "--batch-size", "8", "--masks", "1", "--json"]) == 0
    report = PlanReport.from_dict(json.loads(capsys.readouterr().out.splitlines()[-1]))
    tokens = report.packed["training_rows"] * report.packed["row_width"]
    deltas = tokens * edges.n_writers(report.config) * report.config.d_model * 4
    print(f"training step temp {report.training.temp_bytes / deltas:.1f} x the deltas' {deltas / 2**20:.1f} MiB")
    assert report.training.temp_bytes < 20 * deltas
