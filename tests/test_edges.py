"""The `edges` site: MIB's graph, and the gated edge forward's exactness on tiny models of each family."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrace
from jaxtrace.core import edges
from jaxtrace.core.intervention import Capture, Intervention
from jaxtrace.core.models import ModelConfig, pure
from jaxtrace.core.models.base import as_tokens
from jaxtrace.core.records import Memory, Tokens
from jaxtrace.core.sites import full_gates
from jaxtrace.io.export import _eap_edges
from conftest import build_hf_model

FAMILIES = ["gpt2", "llama", "gemma2"]  # learned positions; RoPE with GQA; post-norms, soft-capping, sliding window
EXACTNESS_ONLY = ["qwen2", "gemma3"]  # q/k/v biases per KV head; multi-query with q/k norms
BATCH, LENGTH = 2, 9


@pytest.fixture(scope="module", params=FAMILIES + EXACTNESS_ONLY)
def family(request):
    hf_model = build_hf_model(request.param)
    folder = tempfile.mkdtemp(prefix=f"edges-{request.param}-")
    hf_model.save_pretrained(folder)
    model, _ = jaxtrace.load_model(folder)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, model.config.vocab_size, (BATCH, LENGTH))
    cf = rng.randint(0, model.config.vocab_size, (BATCH, LENGTH))
    return request.param, Jitted(model), ids, cf


class Jitted:
    """A model's forward and capture, compiled (eager forwards dispatch op by op: slow on a busy CPU)."""

    def __init__(self, model):
        self.config, self.lm, self.params = model.config, *pure(model)
        self.hidden_states = model.hidden_states
        self._logits = jax.jit(self.lm.logits)
        self._capture = jax.jit(self.lm.capture, static_argnums=2)

    def __call__(self, tokens, intervention=Intervention()):
        return self._logits(self.params, as_tokens(tokens), intervention)

    def capture(self, tokens, sites):
        return self._capture(self.params, as_tokens(tokens), Capture(sites))


def _skip_unless_main(name):
    if name in EXACTNESS_ONLY:
        pytest.skip("exactness only: the families' own code paths are covered by the first three")


def _close(a, b, scale_of, tol=2e-5):
    scale = float(jnp.abs(scale_of).max())
    diff = float(jnp.abs(a - b).max())
    assert diff <= tol * scale, f"max difference {diff} against scale {scale}"


def _head_edges(config: ModelConfig, layer: int, head: int) -> edges.EdgeGates:
    """Every outgoing edge of head (layer, head) at 1, the others 0."""
    w = edges.layer_writers(config, layer) + head
    z = edges.full_edges(config)
    return edges.EdgeGates(z.qkv.at[..., w].set(1.0), z.mlp.at[:, w].set(1.0), z.logits.at[w].set(1.0))


def test_graph_is_mibs():
    config = ModelConfig("gpt2", 50257, 768, 12, 12, 12, 64, 3072, 1024, 1e-5, True)  # GPT-2 small's shape
    assert edges.n_edges(config) == 32491
    assert list(edges.edge_names(config)) == [name for name, _, _ in _eap_edges(12, 12)]
    small = ModelConfig("llama", 96, 32, 3, 4, 2, 8, 48, 64, 1e-5, False)  # GQA: MIB's ungrouped names
    assert list(edges.edge_names(small)) == [name for name, _, _ in _eap_edges(3, 4)]
    flat = jnp.arange(1, edges.n_edges(small) + 1, dtype=jnp.float32)
    dense = edges.from_flat(small, flat)
    assert jnp.array_equal(edges.to_flat(small, dense), flat)
    assert sum(int((leaf > 0).sum()) for leaf in jax.tree.leaves(dense)) == edges.n_edges(small)
    assert float(dense.qkv[1, :, :, edges.layer_writers(small, 1):].sum()) == 0  # no edge from a later writer


def test_all_zero_is_clean_and_all_one_is_counterfactual(family):
    name, model, ids, cf = family
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    clean, counterfactual = model(Tokens(ids, mask)), model(Tokens(cf, mask))  # the plain forward, not through edges
    _, source = model.capture(Tokens(cf, mask), ("edges",))
    assert source["edges"].shape == (model.config.n_layers, BATCH, LENGTH, model.config.n_heads + 1,
                                     model.config.d_model)
    valid = mask.astype(bool)
    for value, expected in ((0.0, clean), (1.0, counterfactual)):
        gated = model(Tokens(ids, mask), Intervention({"edges": edges.full_edges(model.config, value)}, source))
        _close(gated[valid], expected[valid], clean - counterfactual)


@pytest.mark.parametrize("positions", [None, "late"])
def test_outgoing_edges_of_a_head_are_its_head_out_patch(family, positions):
    name, model, ids, cf = family
    if name.startswith("gemma"):
        pytest.skip("Gemma norms the summed heads: a head's share is not its head_out patch (jaxtrace.core.edges)")
    where = None if positions is None else np.arange(LENGTH)[None].repeat(BATCH, 0) >= 4
    config = model.config
    _, source = model.capture(cf, ("edges", "head_out"))
    for layer, head in ((0, 1), (config.n_layers - 1, 2)):
        z = full_gates(config, ["head_out"])["head_out"].at[layer, head].set(1.0)
        patched = model(ids, Intervention({"head_out": z}, {"head_out": source["head_out"]}, where))
        gated = model(ids, Intervention({"edges": _head_edges(config, layer, head)}, source, where))
        _close(gated, patched, patched - model(ids))


def test_gradient_is_finite_and_vmaps_over_masks(family):
    name, model, ids, cf = family
    _skip_unless_main(name)
    config = model.config
    lm, params = model.lm, model.params
    _, source = model.capture(cf, ("edges",))

    def effect(flat):
        logits = lm.logits(params, Tokens(ids), Intervention({"edges": edges.from_flat(config, flat)}, source))
        return logits[:, -1, 1].sum()  # token 0 is Gemma's padding: its logit is 0

    flat = jnp.full(edges.n_edges(config), 0.5)
    grad, effect = jax.jit(jax.grad(effect))(flat), jax.jit(effect)
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0
    step = 1e-2
    for e in (0, edges.n_edges(config) - 1):  # input -> a0.h0<q> and the last MLP -> logits
        bump = jnp.zeros_like(flat).at[e].set(step)
        difference = (effect(flat + bump) - effect(flat - bump)) / (2 * step)
        assert abs(float(difference) - float(grad[e])) <= 1e-2 * max(1.0, abs(float(grad[e])))
    masks = jnp.stack([flat, jnp.zeros_like(flat)])
    _close(jax.jit(jax.vmap(effect))(masks), jnp.stack([effect(flat), effect(masks[1])]), grad, tol=1e-5)


def test_packed_rows_and_shared_prefix_match_separate_forwards(family):
    """Edge-gated forwards of two sequences packed in one row ([T, T] visibility, restarting positions), and of a
    suffix reading its shared prefix's keys and values as memory, equal the sequences' own forwards."""
    name, model, ids, cf = family
    _skip_unless_main(name)
    config = model.config
    rng = np.random.RandomState(5)
    z = edges.from_flat(config, jnp.asarray(rng.uniform(size=edges.n_edges(config)), jnp.float32))
    _, source = model.capture(cf, ("edges",))
    alone = model(ids, Intervention({"edges": z}, source))

    lengths = (LENGTH, 5)
    segment = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    visible = (segment[:, None] == segment[None, :]) & (positions[None, :] <= positions[:, None])
    row = np.concatenate([ids[0], ids[1, :5]])[None]
    packed_source = {site: jnp.concatenate([a[:, :1], a[:, 1:, :5]], axis=2) for site, a in source.items()}
    packed = model(Tokens(row, visible[None], positions[None]), Intervention({"edges": z}, packed_source))
    _close(packed[0, :LENGTH], alone[0], alone)
    _close(packed[0, LENGTH:], alone[1, :5], alone)

    prefix = 3  # the counterfactual shares the prompt's first tokens; no gate applies there
    cf_shared = np.concatenate([ids[:, :prefix], cf[:, prefix:]], axis=1)
    _, shared = model.capture(cf_shared, ("edges",))
    gate_here = np.arange(LENGTH)[None].repeat(BATCH, 0) >= prefix
    full = model(ids, Intervention({"edges": z}, shared, gate_here))
    _, kv = model.capture(ids[:, :prefix], ("attn_keys", "attn_values"))
    suffix = LENGTH - prefix
    memory = Memory(kv["attn_keys"], kv["attn_values"], np.arange(prefix)[None].repeat(BATCH, 0))
    sees = np.concatenate([np.ones((suffix, prefix), bool), np.tril(np.ones((suffix, suffix), bool))], axis=1)
    tail = {site: a[:, :, prefix:] for site, a in shared.items()}
    tokens = Tokens(ids[:, prefix:], np.broadcast_to(sees, (BATCH, suffix, LENGTH)),
                    np.arange(prefix, LENGTH)[None].repeat(BATCH, 0))
    from_memory = model(tokens, Intervention({"edges": z}, tail, memory=memory))
    _close(from_memory, full[:, prefix:], full)


def test_refusals(family):
    name, model, ids, cf = family
    _skip_unless_main(name)
    config = model.config
    _, source = model.capture(cf, ("edges", "head_out"))
    zeros = edges.full_edges(config)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(ids, Intervention({"edges": zeros, **full_gates(config, ["head_out"])}, source))
    with pytest.raises(ValueError, match="expected"):
        model(ids, Intervention({"edges": edges.EdgeGates(zeros.qkv[:, :2], zeros.mlp, zeros.logits)}, source))
    with pytest.raises(ValueError, match="edges_input"):
        model(ids, Intervention({"edges": zeros}, {"edges": source["edges"]}))
    with pytest.raises(ValueError, match="layer_range"):
        model.hidden_states(ids, Intervention({"edges": zeros}, source), layer_range=(1, config.n_layers),
                            initial=jnp.zeros((BATCH, LENGTH, config.d_model)))


def test_gated_forward_matches_pytorch(family):
    """The edge-gated logits and their gradient in the gates, against an independent PyTorch implementation on the
    HF model's modules (tests/torch_edges.py), at random gates in [0, 1]."""
    import torch

    from torch_edges import edge_forward

    name, model, ids, cf = family
    _skip_unless_main(name)
    config = model.config
    hf_model = build_hf_model(name)  # the fixture's weights: the same seed
    with torch.no_grad():
        plain, _ = edge_forward(hf_model, torch.tensor(ids))
        hf_logits = hf_model(torch.tensor(ids)).logits
    _close(jnp.asarray(plain.numpy()), jnp.asarray(hf_logits.numpy()), hf_logits.numpy())  # the reference is HF's

    flat = jnp.asarray(np.random.RandomState(1).uniform(size=edges.n_edges(config)), jnp.float32)
    _, source = model.capture(cf, ("edges",))

    def target(flat):
        logits = model.lm.logits(model.params, as_tokens(ids), Intervention({"edges": edges.from_flat(config, flat)},
                                                                            source))
        return logits, logits[:, -1, 1].sum()

    (logits, _), grad = jax.jit(target)(flat), jax.jit(jax.grad(lambda f: target(f)[1]))(flat)
    with torch.no_grad():
        _, cf_writers = edge_forward(hf_model, torch.tensor(cf))
    dense = [torch.tensor(np.asarray(leaf), requires_grad=True) for leaf in jax.tree.leaves(edges.from_flat(config, flat))]
    expected, _ = edge_forward(hf_model, torch.tensor(ids), *dense, cf=cf_writers)
    expected[:, -1, 1].sum().backward()
    _close(logits, jnp.asarray(expected.detach().numpy()), expected.detach().numpy() - plain.numpy())
    torch_grad = edges.to_flat(config, edges.EdgeGates(*(jnp.asarray(t.grad.numpy()) for t in dense)))
    _close(grad, torch_grad, torch_grad, tol=1e-4)
