"""Gated models against Hugging Face transformers: logits, captured activations and gate gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxtrace
from jaxtrace.core.intervention import Intervention
from jaxtrace.core.records import Tokens
from jaxtrace.core.sites import MODEL_SITES, REGISTRY, full_gates, gate_shape
from torch_reference import gated

SITES = [site for site in MODEL_SITES if not REGISTRY[site].internal]  # the sites torch hooks reproduce
BATCH, LENGTH = 3, 12


def _inputs(vocab: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (BATCH, LENGTH))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def loaded(hf_family):
    name, hf_model, folder = hf_family
    model, _ = jaxtrace.load_model(folder)
    return name, hf_model, model


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(loaded, padded):
    name, hf_model, model = loaded
    ids, mask = _inputs(model.config.vocab_size)
    mask = mask if padded else np.ones_like(mask)
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = model(Tokens(ids, mask))
    assert logits.dtype == jnp.float32 and logits.shape == expected.shape
    valid = mask.astype(bool)  # padded query rows are undefined in both
    diff = np.abs(np.asarray(logits) - expected)[valid].max()
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"


def test_capture_matches_transformers(loaded):
    name, hf_model, model = loaded
    ids, _ = _inputs(model.config.vocab_size)
    _, acts = model.capture(ids, tuple(SITES))
    with torch.no_grad(), gated(hf_model, capture=tuple(SITES)) as captured:
        hf_model(torch.tensor(ids))
    for site in SITES:
        expected = torch.stack(captured[site]).numpy()
        if site == "head_out":
            expected = expected.reshape(acts[site].shape)
        assert acts[site].shape == expected.shape, site
        # float32 sums in other orders: an element's error scales with the site's magnitude, not its own (jax 0.12
        # gave 2.1e-5 on a qwen2 mlp_out element of 0.44 in a site up to |25|, i.e. 1e-6 of the scale)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(acts[site]), expected, atol=4e-6 * scale, rtol=0,
                                   err_msg=f"{name} {site}")


@pytest.mark.parametrize("site", list(SITES))
def test_gate_gradients_match_torch_hooks(loaded, site):
    name, hf_model, model = loaded
    ids, _ = _inputs(model.config.vocab_size)
    source_ids, _ = _inputs(model.config.vocab_size, seed=1)
    _, source = model.capture(source_ids, (site,))
    rng = np.random.RandomState(2)
    z = rng.uniform(0, 1, gate_shape(model.config, site)).astype(np.float32)
    weights = rng.normal(size=(BATCH, LENGTH, model.config.vocab_size)).astype(np.float32)

    def loss(gates):
        return jnp.sum(model(ids, Intervention(gates, source)) * weights)

    value, grad = jax.value_and_grad(loss)({site: jnp.asarray(z)})

    with torch.no_grad(), gated(hf_model, capture=(site,)) as captured:
        hf_model(torch.tensor(source_ids))
    torch_source = {site: torch.stack(captured[site])}
    if site == "head_out":
        torch_source[site] = torch_source[site].reshape(source[site].shape)
    torch_z = torch.tensor(z, requires_grad=True)
    with gated(hf_model, gates={site: torch_z}, source=torch_source):
        torch_loss = (hf_model(torch.tensor(ids)).logits * torch.tensor(weights)).sum()
    torch_loss.backward()
    assert abs(float(value) - torch_loss.item()) <= 1e-3 * max(1.0, abs(torch_loss.item()))
    expected = torch_z.grad.numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(grad[site]), expected, atol=1e-4 * scale, err_msg=f"{name} {site}")


def test_zero_gates_and_self_source_are_exact(loaded):
    _, _, model = loaded
    ids, mask = _inputs(model.config.vocab_size)
    plain, acts = model.capture(Tokens(ids, mask), tuple(SITES))
    zeros = full_gates(model.config, SITES, 0.0)
    assert jnp.array_equal(model(Tokens(ids, mask), Intervention(zeros, acts)), plain)
    halves = full_gates(model.config, SITES, 0.5)
    assert jnp.array_equal(model(Tokens(ids, mask), Intervention(halves, acts)), plain)


def test_gate_positions_restrict_mixing(loaded):
    _, _, model = loaded
    ids, _ = _inputs(model.config.vocab_size)
    other, _ = _inputs(model.config.vocab_size, seed=3)
    _, source = model.capture(other, ("mlp_out",))
    ones = full_gates(model.config, ["mlp_out"], 1.0)
    plain = model(ids)
    nowhere = model(ids, Intervention(ones, source, positions=np.zeros(ids.shape, bool)))
    assert jnp.array_equal(nowhere, plain)
    late = np.zeros(ids.shape, bool)
    late[:, 6:] = True
    mixed = model(ids, Intervention(ones, source, positions=late))
    np.testing.assert_array_equal(np.asarray(mixed[:, :6]), np.asarray(plain[:, :6]))  # causal: earlier rows untouched
    assert not np.allclose(np.asarray(mixed[:, 6:]), np.asarray(plain[:, 6:]))


def test_packed_sequences_match_separate_forwards(loaded):
    """Three sequences in one row with a [T, T] visibility mask and restarting positions give each one's logits."""
    name, _, model = loaded
    rng = np.random.RandomState(4)
    lengths = (5, 7, 4)
    seqs = [rng.randint(0, model.config.vocab_size, n) for n in lengths]
    segment = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(2, -1)])
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(2, int)])
    ids = np.concatenate(seqs + [np.zeros(2, int)])
    visible = (segment[:, None] == segment[None, :]) & (positions[None, :] <= positions[:, None]) & (segment >= 0)
    packed = np.asarray(model(Tokens(ids[None], visible[None], positions[None])))[0]
    start = 0
    for seq in seqs:
        alone = np.asarray(model(seq[None]))[0]
        np.testing.assert_allclose(packed[start: start + len(seq)], alone, atol=2e-5, err_msg=name)
        start += len(seq)


def test_shorter_source_mixes_only_its_positions(loaded):
    _, _, model = loaded
    ids, _ = _inputs(model.config.vocab_size)
    _, source = model.capture(ids[:, :7], ("attn_pattern",))
    ones = full_gates(model.config, ["attn_pattern"], 1.0)
    # The prefix's own patterns fed back over its 7 positions leave the whole forward unchanged.
    np.testing.assert_allclose(np.asarray(model(ids, Intervention(ones, source))), np.asarray(model(ids)), atol=1e-5)


def test_log_normaliser_and_token_logits_match_transformers(loaded):
    """The metric's pieces without the whole logits: the logsumexp of every position's logits and the logits of
    given tokens, against transformers' logits (float64 logsumexp)."""
    name, hf_model, model = loaded
    ids, _ = _inputs(model.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids)).logits.double().numpy()
    hidden = model.hidden_states(Tokens(ids))[0]  # [B, T, D]
    high = expected.max(-1)
    normaliser = high + np.log(np.exp(expected - high[..., None]).sum(-1))
    got = np.asarray(model.log_normaliser(hidden.reshape(-1, hidden.shape[-1]))).reshape(normaliser.shape)
    assert np.abs(got - normaliser).max() <= 1e-4, name
    targets = np.roll(ids, -1, axis=1)
    chosen = np.take_along_axis(expected, targets[..., None], -1)[..., 0]
    assert np.abs(np.asarray(model.token_logits(hidden, targets)) - chosen).max() <= 1e-4, name


@pytest.mark.parametrize("chunk", [7, 25, 100])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_log_normaliser_by_chunks_is_logsumexp_and_differentiates(chunk, cap):
    """`layers.log_normaliser` over head chunks that do and do not divide the vocabulary (the last overlaps the one
    before), with a final softcap, under vmap; its gradient, against plain float64 numpy."""
    from jaxtrace.core.models import layers

    rng = np.random.RandomState(0)
    x, head = rng.randn(2, 5, 8).astype(np.float32), rng.randn(100, 8).astype(np.float32)
    logits = x.astype(np.float64) @ head.T.astype(np.float64)
    capped = logits if cap is None else cap * np.tanh(logits / cap)
    expected = np.log(np.exp(capped).sum(-1))
    got = jax.vmap(lambda rows: layers.log_normaliser(rows, jnp.asarray(head), cap, chunk))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5)
    softmax = np.exp(capped - expected[..., None])
    slope = softmax if cap is None else softmax * (1 - np.tanh(logits / cap) ** 2)
    gradient = jax.grad(lambda x: layers.log_normaliser(x, jnp.asarray(head), cap, chunk).sum())(jnp.asarray(x[0]))
    np.testing.assert_allclose(np.asarray(gradient), slope[0] @ head.astype(np.float64), rtol=0, atol=2e-5)


def test_bfloat16_runs_close_to_float32(hf_family):
    _, hf_model, folder = hf_family
    model32, _ = jaxtrace.load_model(folder)
    model16, _ = jaxtrace.load_model(folder, dtype="bfloat16")
    assert model16.blocks.q[...].dtype == jnp.bfloat16
    ids, _ = _inputs(model32.config.vocab_size)
    logits16 = model16(ids)
    assert logits16.dtype == jnp.float32
    scale = float(jnp.abs(model32(ids)).max())
    assert float(jnp.abs(logits16 - model32(ids)).max()) < 0.1 * scale
