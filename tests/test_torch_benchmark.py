"""The PyTorch PGB-CT benchmark (benchmarks/torch_pgbct.py) computes jaxtrace's objective and optimiser step.

Both torch forms (ReferenceStyle: the paper's per-batch procedure; Optimised: cached, vectorised) on a tiny GPT-2
and a tiny GQA Llama, at attn_pattern (WinoBias dev) and mlp_out (Professions): per-pair effects of a random soft z
against `Objective.effects`, and z after Adam steps against `jaxtrace.core.search.pgbct` (optax.adam inside).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxtrace
from jaxtrace.engine.objective import build_objective
from jaxtrace.core.search import RunInputs, SearchConfig, pgbct
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_pgbct import Optimised, ReferenceStyle  # noqa: E402

DATA = SHARED / "data"
FORMS = {"reference": ReferenceStyle, "optimised": Optimised}
BATCH = 8
# float32 forwards of different libraries: log-probs agree to ~1e-6 relative; effects reach ~10 on these random
# models, so their largest differences are ~2e-5.
EFFECT_ATOL = 1e-4
Z_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads) over GPT-2's vocabulary: (HF model, jaxtrace model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(1)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # untrained norms are all ones: perturb them
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(folder)
    model, _ = jaxtrace.load_model(folder)
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager"), model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, tiny_gpt2, tiny_llama):
    """(HF model, jaxtrace model, tokenizer): the GPT-2 tokenizer for both."""
    from transformers import GPT2LMHeadModel

    folder, gpt2, tokenizer = tiny_gpt2
    if request.param == "gpt2":
        return GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager"), gpt2, tokenizer
    return (*tiny_llama, tokenizer)


def site_task(site: str, tokenizer):
    """20 WinoBias dev pairs (attn_pattern), or 30 Professions pairs of both signs (mlp_out); `encode_pairs` of
    a slice is what `build_task` does for the whole task."""
    if site == "attn_pattern":
        return encode_pairs(load_pairs("winobias", DATA, split="dev")[:20], tokenizer)
    return encode_pairs(load_pairs("professions", DATA)[::90][:30], tokenizer)


@pytest.fixture(scope="module", params=["attn_pattern", "mlp_out"])
def setup(request, family):
    """(site, HF model, task, jaxtrace Objective)."""
    hf, model, tokenizer = family
    task = site_task(request.param, tokenizer)
    assert len(task) >= 20 and set(task.arrays.sign) == ({1.0} if request.param == "attn_pattern" else {-1.0, 1.0})
    return request.param, hf, task, build_objective(model, task, request.param, batch_size=BATCH)


@pytest.mark.parametrize("form", FORMS)
def test_effects_equal_jaxtrace(setup, form):
    site, hf, task, objective = setup
    z = np.random.RandomState(0).uniform(size=objective.shape).astype(np.float32)
    expected = objective.effects(z)
    assert np.abs(expected).max() > 0.1  # the gates do something
    torch_form = FORMS[form](hf, task, site, batch_size=BATCH)
    assert torch_form.z.shape == objective.shape
    effects = torch_form.effects(z)
    print(f"{form} {site} {hf.config.model_type}: max |effect - jaxtrace| = {np.abs(effects - expected).max():.2e}")
    np.testing.assert_allclose(effects, expected, rtol=0, atol=EFFECT_ATOL)
    np.testing.assert_allclose(torch_form.effects(0 * z), 0.0, rtol=0, atol=1e-6)


LR, LAMBDA1, LAMBDA2 = 0.3, 0.05, 0.05
STEP_BATCHES = (np.arange(BATCH), np.arange(BATCH, 2 * BATCH)[::-1])  # epochs 0 and 1


@pytest.fixture(scope="module")
def jaxtrace_steps(setup):
    """[(loss, z)] after each of two jaxtrace steps from z = 0.5 (`pgbct`'s update: Adam, then the projection)."""
    _, _, _, objective = setup
    config = SearchConfig(lr=LR, lambda1=LAMBDA1, lambda2=LAMBDA2, scale="none").resolve(objective.site, objective.metric)
    search = pgbct(objective.spec, config)
    update = jax.jit(search.update)
    state, out = search.init(jnp.full(objective.shape, 0.5, jnp.float32)), []
    for epoch, idx in enumerate(STEP_BATCHES):
        inputs = RunInputs(*map(np.float32, config.lambdas(epoch)), np.float32(1), np.float32(objective.n_components))
        state, stats = update(state, objective.params, *objective.inputs(idx), inputs)
        out.append((float(stats.loss), np.asarray(state.z)))
    return out


@pytest.mark.parametrize("form", FORMS)
def test_steps_equal_jaxtrace(setup, jaxtrace_steps, form):
    """Two Adam steps from z = 0.5 (epochs 0 and 1 of the linear schedule); lr 0.3 makes the second step clamp.

    Adam's first step is lr * g / (|g| + eps): z moves by almost exactly ±lr, except where |g| is within a few
    orders of eps, which is where the ~2e-6 differences come from."""
    site, hf, task, _ = setup
    torch_form = FORMS[form](hf, task, site, batch_size=BATCH, lr=LR, lambda1=LAMBDA1, lambda2=LAMBDA2)
    for epoch, (idx, (loss, z)) in enumerate(zip(STEP_BATCHES, jaxtrace_steps)):
        torch_loss = torch_form.step(idx, epoch)
        z_torch = torch_form.z.detach().numpy()
        print(f"{form} {site} {hf.config.model_type} step {epoch + 1}: max |z - jaxtrace| = "
              f"{np.abs(z_torch - z).max():.2e}, loss {torch_loss:.6f} vs {loss:.6f}")
        np.testing.assert_allclose(torch_loss, loss, rtol=1e-5)
        np.testing.assert_allclose(z_torch, z, rtol=0, atol=Z_ATOL)
    assert (z_torch == 1.0).any() or (z_torch == 0.0).any()  # the projection was exercised


def test_run_trains_and_evaluates(tiny_gpt2):
    """A short full run: seeded epochs, binary mask evaluated after each; same seed, same result."""
    from transformers import GPT2LMHeadModel

    folder, _, tokenizer = tiny_gpt2
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager")
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:12], tokenizer)
    runs = [Optimised(hf, task, "attn_pattern", batch_size=BATCH).run(epochs=2, seed=3) for _ in range(2)]
    history = runs[0]["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    np.testing.assert_array_equal(runs[0]["z"], runs[1]["z"])
    assert history[-1]["selected"] == runs[0]["mask"].sum()
    mask_effect = Optimised(hf, task, "attn_pattern").evaluate(runs[0]["mask"])
    assert history[-1]["effect"] == pytest.approx(mask_effect, abs=1e-6)


def test_compiled_forward_equals_eager(tiny_gpt2):
    """torch.compile'd Optimised (fixed shapes; aot_eager keeps the test fast, inductor is the benchmark's) gives
    the eager effects and steps, for two different z (the gates are inputs, not baked into the graph)."""
    from transformers import GPT2LMHeadModel

    folder, _, tokenizer = tiny_gpt2
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager")
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:12], tokenizer)
    eager = Optimised(hf, task, "attn_pattern", batch_size=BATCH)
    compiled = Optimised(hf, task, "attn_pattern", batch_size=BATCH, compile=True, compile_backend="aot_eager")
    assert compiled.compile_status == "compiled" and compiled.fixed_shapes
    for seed in range(2):
        z = np.random.RandomState(seed).uniform(size=(2, 4)).astype(np.float32)
        np.testing.assert_allclose(compiled.effects(z), eager.effects(z), rtol=0, atol=1e-5)
    for idx in (np.arange(BATCH), np.arange(4, 12)):
        assert compiled.step(idx) == pytest.approx(eager.step(idx), rel=1e-5)
        np.testing.assert_allclose(compiled.z.detach(), eager.z.detach(), rtol=0, atol=1e-6)


def test_bfloat16_form_runs_in_bfloat16(setup):
    """The optimised form on the model in bfloat16 (benchmarks/run.py's torch-optimised-bf16): its forwards and
    cached sources in bfloat16, z and its gradient float32, effects within bfloat16's rounding of jaxtrace's
    float32 ones, and the gradient in z within bfloat16's rounding of the float32 model's."""
    import copy

    site, hf, task, objective = setup
    half = copy.deepcopy(hf).to(torch.bfloat16)
    form = Optimised(half, task, site, batch_size=BATCH)
    assert form.source.dtype == torch.bfloat16 and form.z.dtype == torch.float32
    z = np.random.RandomState(0).uniform(size=objective.shape).astype(np.float32)
    expected = objective.effects(z)
    effects = form.effects(z)
    # bfloat16 keeps 8 significant bits: log-odds of ~10 are off by up to ~0.05, and effects are expm1 of them
    np.testing.assert_allclose(effects, expected, rtol=0.1, atol=0.1 * np.abs(expected).max())
    gradients = []
    for model in (hf, half):
        form = Optimised(model, task, site, batch_size=BATCH)
        form.loss(np.arange(BATCH))[0].backward()
        gradients.append(form.z.grad.numpy())
    assert gradients[1].dtype == np.float32
    np.testing.assert_allclose(gradients[1], gradients[0], rtol=0, atol=0.05 * np.abs(gradients[0]).max())
