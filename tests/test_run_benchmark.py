"""`benchmarks/run.py` counts every scanned layer's FLOPs of the training step (XLA counts a loop's body once)."""

import jax
import pytest

import jaxtrace
from conftest import SHARED, build_hf_model, load_benchmark
from jaxtrace.core.search import SearchState
from jaxtrace.engine import loop
from jaxtrace.engine.objective import build_objective
from jaxtrace.tasks import encode_pairs, load_pairs


@pytest.fixture(scope="module")
def run_benchmark():
    return load_benchmark("run.py")


def test_step_flops_count_every_layer(run_benchmark, tiny_gpt2, tmp_path):
    """Models of 4 and 6 layers: the 2 layers the deeper one adds cost what each of the 3 layers beyond the first
    costs in the shallower one, by the counts `step_flops` derives from programs unrolled by 2 (and 2 or 3)."""
    _, _, tokenizer = tiny_gpt2
    pairs = load_pairs("winobias", SHARED / "data", split="dev")[:8]
    config = jaxtrace.SearchConfig(epochs=1, scale="none")
    counts = {}
    for n_layers in (4, 6):
        folder = tmp_path / str(n_layers)
        build_hf_model("gpt2", n_layer=n_layers, vocab_size=tokenizer.vocab_size).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = jaxtrace.load_model(folder)[0]
        objective = build_objective(model, encode_pairs(pairs, tokenizer), "head_out", batch_size=8)
        order = objective.batcher.epoch(jax.random.key(config.seed), 0)
        batch = loop.stacked_inputs(objective, [order[0]], objective.batcher.shape(order))
        state = loop.initial_state(objective, [config])
        state = objective.batcher.replicate(SearchState(state.z, state.opt_state))
        inputs = objective.batcher.replicate(loop.run_inputs(objective, loop.resolve(objective, [config]), 0, [1.0]))
        counts[n_layers] = run_benchmark.step_flops(objective, config, (state, objective.params, *batch, inputs))
    (total4, scanned4), (total6, _) = counts[4], counts[6]
    assert scanned4 < total4
    assert (total6 - total4) / 2 == pytest.approx((total4 - scanned4) / 3, rel=0.02)

