"""The PGB-CT objective as pure functions of (spec, params, gates, batch, cache).

For pair i with targets (t0, t1), score(t) is the geometric-mean probability of t's tokens after the prompt and
odds = score(t1) / score(t0); with a single target t0, odds = 1 / score(t0). The log ratio
`log r_i = sign_i * (log odds_gated - log odds_base)` gives the indirect effect IE_i = r_i - 1 (reference §4-6; for
one target, IE = p_clean / p_gated - 1). Gates mix the counterfactual's activations into the base prompt at the
task's gate positions; target positions stay live. The counterfactual is another prompt, or the base prompt with
seeded Gaussian noise on its input embeddings, fixed per pair.

Batches are packed (`jaxtrace.core.packing`): each gated prompt is computed once for all its targets, pairs share
rows, and the prefix a pair's base and counterfactual prompts share is read from cached keys and values instead of
being recomputed, so a step costs the batch's z-dependent tokens rather than batch x targets x the longest row.

Everything that does not depend on z (the counterfactual's sources, the prefix keys and values, the ungated outputs)
is a `Cache`, computed once per task by `precompute` (see `jaxtrace.engine.objective`); `batch_effects` with
`cache=None` recomputes it inside the call (the reference's way; used to check the cache). Functions here take one
data group (arrays without the leading G axis) unless they say otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtrace.core import packing
from jaxtrace.core.intervention import Capture, Intervention
from jaxtrace.core.metrics import Metric
from jaxtrace.core.models import ModelConfig, PureLM
from jaxtrace.core.records import Batch, Cache, KeysValues, Memory, Outputs, PairArrays, PackedRows, Tokens
from jaxtrace.core.sites import AttentionForm, expand_gates, model_sites


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """What a compiled objective is specialised on (static under `jit`): the model's pure functions
    (`jaxtrace.core.models.pure`), the gate site, the metric, the counterfactual noise (std already measured, and
    seed; None: the counterfactual is a prompt), X, the longest shared prefix (0: none is cached), the attention
    form (explicit patterns, or fused: `jax.nn.dot_product_attention`, `attn_pattern` in its fused form), and how
    many layers each iteration of the layer scan runs (`unroll`; XLA's cost analysis counts a loop's body once, so
    `jaxtrace plan` compares programs at two unrolls)."""

    model: PureLM
    site: str
    metric: Metric
    noise_std: float | None = None
    noise_seed: int = 0
    prefix_length: int = 0
    attention: AttentionForm = AttentionForm.EXPLICIT
    unroll: int = 1

    def __post_init__(self):
        object.__setattr__(self, "attention", AttentionForm(self.attention))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def fused(self) -> bool:
        return self.attention is AttentionForm.FUSED

    @property
    def sites(self) -> tuple[str, ...]:
        """The model sites the gates mix."""
        return model_sites(self.site, self.attention)

    def intervention(self, gates=None, sources=None, positions=None, memory: Memory | None = None) -> Intervention:
        """An intervention in this objective's attention form."""
        return Intervention(gates or {}, sources or {}, positions, memory, self.attention)


def noise(spec: ObjectiveSpec, pairs: PairArrays) -> jax.Array:
    """[B, P, D] the embedding noise of each pair's counterfactual (zero outside its noise positions)."""
    shape = (pairs.cf_ids.shape[-1], spec.config.d_model)
    key = jax.random.key(spec.noise_seed)
    draws = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(pairs.index)
    return spec.noise_std * draws * pairs.noise_mask[..., None]


def counterfactual_sources(spec: ObjectiveSpec, params, pairs: PairArrays) -> dict[str, jax.Array]:
    """{model site: [L, B, P, ...]} the counterfactual prompts' activations."""
    input_noise = None if spec.noise_std is None else noise(spec, pairs)
    tokens = Tokens(pairs.cf_ids, pairs.cf_mask, noise=input_noise)
    return spec.model.capture(params, tokens, Capture(spec.sites), spec.intervention())[1]


def prefix_keys_values(spec: ObjectiveSpec, params, pairs: PairArrays) -> KeysValues | None:
    """The base prompts' keys and values [L, B, X, K, Dh] at their first X = `prefix_length` positions, which no
    gate changes (None when no pair shares a prefix). Attention is causal, so a forward over those X tokens alone
    gives them."""
    if not spec.prefix_length:
        return None
    prefix = slice(0, spec.prefix_length)
    tokens = Tokens(pairs.prompt_ids[:, prefix], pairs.cf_mask[:, prefix])
    _, acts = spec.model.capture(params, tokens, Capture(("attn_keys", "attn_values")), spec.intervention())
    return KeysValues(acts["attn_keys"], acts["attn_values"])


def _forward(spec: ObjectiveSpec, params, batch: Batch, prefix: KeysValues | None, gates=None, source=None,
             layer_range: tuple[int, int] | None = None, initial=None) -> jax.Array:
    """The residual stream [W, S, D] leaving the packed rows' layers (all, or `layer_range` from `initial`)."""
    rows = batch.rows
    packed_source = None
    if gates is not None:
        packed_source = {site: packing.pack_source(site, acts, rows) for site, acts in source.items()}
    memory = None if prefix is None else packing.pack_memory(prefix, rows)
    tokens = Tokens(rows.tokens, packing.visibility(rows), rows.positions)
    intervention = spec.intervention(gates, packed_source, rows.gate > 0, memory)
    hidden, _ = spec.model.hidden_states(params, tokens, intervention, layer_range=layer_range, initial=initial,
                                         unroll=spec.unroll)
    return hidden


def outputs(spec: ObjectiveSpec, params, batch: Batch, prefix: KeysValues | None, gates=None, source=None,
            start_layer: int = 0, initial=None) -> Outputs:
    """The target log-probabilities [B, Y] and next-token log-probabilities [B, V] of one group's packed rows,
    whose shared prefixes have keys and values `prefix`, optionally gated (model-site gates {site: [L, C]}) at the
    task's gate positions with per-pair sources {site: [L, B, P, ...]}; from layer `start_layer` on, given the
    residual stream `initial` [W, S, D] entering it (`residual_entering`), computed with the gates below it."""
    rows, pairs = batch.rows, batch.pairs
    layer_range = (start_layer, spec.config.n_layers) if start_layer else None
    hidden = _forward(spec, params, batch, prefix, gates, source, layer_range, initial)
    hidden = hidden.reshape(-1, hidden.shape[-1])[rows.logit_index]  # [Q, D]
    with jax.named_scope("unembedding"):  # a profile's name for the metric's cost at the Q logit positions
        norm = spec.model.log_normaliser(params, hidden)  # [Q], the [Q, V] logits never whole
        target_logits = spec.model.token_logits(params, hidden[rows.target_slot], pairs.target_ids)  # [B, Y, U]
        last = rows.last_slot
        last_logp = spec.model.unembed(params, hidden[last]) - norm[last, None]  # [B, V], if the metric reads it
    token_logp = target_logits - norm[rows.target_slot]
    valid = pairs.target_valid
    return Outputs((token_logp * valid).sum(-1) / valid.sum(-1), last_logp)


def residual_entering(spec: ObjectiveSpec, params, batch: Batch, cache: Cache, layer: int,
                      reference: jax.Array | None = None) -> jax.Array:
    """[W, S, D] the residual stream of one group's packed rows entering `layer`, of the clean run or of the run
    gated by `reference` [L, C] (e.g. every gate 1: every component patched): the layers below run once for every
    mask whose gates there are the reference's (all 0 without one)."""
    layer_major = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731
    prefix = None if cache.prefix is None else jax.tree.map(layer_major, cache.prefix)
    gates = sources = None
    if reference is not None:
        gates = expand_gates(spec.config, spec.site, reference, spec.attention)
        sources = {site: layer_major(a) for site, a in cache.sources.items()}
    with jax.named_scope("start_residual"):
        return _forward(spec, params, batch, prefix, gates, sources, layer_range=(0, layer))


def precompute(spec: ObjectiveSpec, params, batch: Batch) -> Cache:
    """One group's z-independent terms, pair-major: sources {site: [B, L, P, ...]}, prefix keys and values
    [B, L, X, K, Dh] and the ungated outputs (with next-token log-probabilities only if the metric reads them)."""
    prefix = prefix_keys_values(spec, params, batch.pairs)
    base = outputs(spec, params, batch, prefix)
    pair_major = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731
    return Cache({site: pair_major(a) for site, a in counterfactual_sources(spec, params, batch.pairs).items()},
                 None if prefix is None else jax.tree.map(pair_major, prefix),
                 Outputs(base.targets, base.last if spec.metric.uses_last else None))


def group_effects(spec: ObjectiveSpec, params, z: jax.Array, batch: Batch, cache: Cache | None,
                  metric: Metric | None = None, start_layer: int = 0, initial=None) -> jax.Array:
    """[B] per-pair effect of gates z [L, C] under `metric` (default: the spec's) on one group; `cache` is the
    group's pair-major cache, or None to compute it here (without gradient). With `start_layer`, z must equal the
    gates `initial` was computed with below it (`residual_entering(..., start_layer)`: 0, or a reference's)."""
    if cache is None:
        cache = jax.lax.stop_gradient(precompute(spec, params, batch))
    layer_major = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731
    sources = {site: layer_major(a) for site, a in cache.sources.items()}
    prefix = None if cache.prefix is None else jax.tree.map(layer_major, cache.prefix)
    gated = outputs(spec, params, batch, prefix, expand_gates(spec.config, spec.site, z, spec.attention), sources,
                    start_layer, initial)
    return (metric or spec.metric).effect(gated, cache.base, batch.pairs)


def batch_effects(spec: ObjectiveSpec, params, z: jax.Array, batch: Batch, cache: Cache | None,
                  metric: Metric | None = None) -> jax.Array:
    """[G * B] per-pair effects of gates z [L, C] on a batch with a leading group axis G (cache likewise)."""
    effects = jax.vmap(lambda b, c: group_effects(spec, params, z, b, c, metric))(batch, cache)
    return effects.reshape(-1)
