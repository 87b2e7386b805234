"""Gate sites: where a gated forward mixes live and source activations, and everything else the library needs to
know about each one. Every module asks this registry; adding a site is one `Site` entry (its gate width, source
shape and mixing weight) plus its call point in each family's block (`mixer("site", value)`).

At a model site the forward computes `live + w * (source - live)` (= `(1 - w) * live + w * source`, written so that
w = 0, or a source equal to the live activation, gives the live value bit for bit), where w is the site's `weight`
of the layer's gates z [C] and the positions where gates apply. Gates carry a leading layer axis.

| site          | gate    | source per layer | what is mixed                                                    |
|---------------|---------|------------------|------------------------------------------------------------------|
| attn_pattern  | [L, H]  | [B, H, T, T]     | post-softmax attention probabilities of a query head             |
| head_out      | [L, H]  | [B, T, H, Dh]    | a head's output before the output projection                     |
| mlp_out       | [L, D]  | [B, T, D]        | the MLP block's output, per residual dimension (Gemma: before    |
|               |         |                  | its post-feedforward norm)                                       |
| mlp_hidden    | [L, F]  | [B, T, F]        | the MLP's intermediate neurons (input of the down projection)   |
| heads_mlp     | [L, H+1]| (set)            | `head_out` gates z[:, :H], `mlp_out` gates z[:, H] over all of D |
| edges         | EdgeGates | [B, T, H+1, D] | each writer's output as each later reader reads it               |

`attn_pattern` has two forms (`AttentionForm`) with the same effects and gradients. The explicit one caches the
counterfactual's pattern (H·T² floats per layer and pair) and mixes it into the live pattern. The fused one (model
site `attn_pattern_qk`) uses that mixing is linear in the pattern: ((1 − z)·A_live + z·A_cf)·V =
(1 − z)·attention(q, k, V) + z·attention(q_cf, k_cf, V), so it caches the counterfactual's post-RoPE queries and keys
((H + K)·T·Dh floats, source [B, T, H + K, Dh]) and mixes the two attention outputs; no T×T tensor is kept, and the
attention can be a fused kernel (`jax.nn.dot_product_attention`).

H counts query heads (grouped-query models share values within a KV group). For `attn_pattern` the position
restriction applies to query rows. `attn_keys`, `attn_values` ([B, T, K, Dh] after RoPE) can be captured, not gated.
`edges` (`jaxtrace.core.edges`) gates the edges between the residual stream's writers (input, heads, MLPs) and readers
(each head's q, k, v inputs, MLPs, logits): its gates are an `EdgeGates` pytree, not [L, C], its sources the
counterfactual's writer outputs (`edges` [L, B, T, H + 1, D] and the embeddings `edges_input` [1, B, T, D], both
returned by capturing `edges`), and it is gated alone. Searched, its gates are one row z [1, E] of the E edges in
MIB's order (`expand` maps them to an `EdgeGates`), so every method runs on it: atp is EAP, ig is EAP-IG.
Axis letters are those of `jaxtrace.core`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxtrace.core import edges
from jaxtrace.core.models.config import ModelConfig

Gates = Mapping[str, jax.Array]        # site -> [L, C]
Activations = Mapping[str, jax.Array]  # site -> [L, B, ...]


class SiteKind(enum.StrEnum):
    """A site the forward gates (`model`), a set of model sites gated under one array (`set`), a site that can
    only be captured (`capture`), or the residual stream's edges (`edges`: gates an `EdgeGates` pytree)."""

    MODEL = "model"
    SET = "set"
    CAPTURE = "capture"
    EDGES = "edges"


class AttentionForm(enum.StrEnum):
    """Attention with explicit patterns, or through `jax.nn.dot_product_attention` (fused kernels on GPU and TPU;
    `attn_pattern` then gated in its fused form, `attn_pattern_qk`)."""

    EXPLICIT = "explicit"
    FUSED = "fused"


# How a layer's gates z [C] (float32) and the position weight [B, T] broadcast against a site's live activation.
def _query_rows(z, where):  # [B, H, Tq, Tk]
    return z[None, :, None, None] * where[:, None, :, None]


def _per_head(z, where):  # [B, T, H, Dh]
    return z[None, None, :, None] * where[:, :, None, None]


def _per_unit(z, where):  # [B, T, C]
    return z[None, None, :] * where[:, :, None]


def _heads_and_blocks(config: ModelConfig, z: jax.Array) -> dict[str, jax.Array]:
    """`heads_mlp` gates [L, H + 1] as `head_out` [L, H] and `mlp_out` [L, D] gates."""
    heads = config.n_heads
    return {"head_out": z[:, :heads], "mlp_out": jnp.broadcast_to(z[:, heads:], (config.n_layers, config.d_model))}


@dataclasses.dataclass(frozen=True)
class Site:
    """A gate site, a component set (`parts`: the model sites it gates under one array, `expand` maps its gates to
    theirs) or a capture-only site.

    `width(config)` is C, the components per layer. `weight(z [C], where [B, T])`: how a model site's gates broadcast
    against its live activation [B, ...]. `heads`: the first H components are query heads; `blocks`: the last
    component of a layer is its whole MLP block; otherwise components are units of a vector. `lr` is the default
    Adam learning rate (the reference's 0.1 for heads, 0.5 for MLP units). `query_axis`/`key_axis`: the token axes
    of one layer's source [B, ...] (`key_axis` only for attention patterns). `source_floats(config, P)`: floats one
    pair's source takes per layer for a prompt of P tokens. `fused`: the model site that gates this one in the fused
    attention form. `flat_when_patched`: with every gate 1 a gate's change reaches no later gated input, so first-order
    scores there say nothing (edges: every reader reads the counterfactual's writers; `jaxtrace.engine.attribution`).
    """

    name: str
    description: str
    width: Callable[[ModelConfig], int]
    kind: SiteKind = SiteKind.MODEL
    weight: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    heads: bool = False
    blocks: bool = False
    lr: float = 0.5
    parts: tuple[str, ...] = ()
    expand: Callable[[ModelConfig, jax.Array], dict[str, jax.Array]] | None = None
    query_axis: int = 1
    key_axis: int | None = None
    source_floats: Callable[[ModelConfig, int], int] | None = None
    fused: str | None = None
    internal: bool = False  # a form of another site, not offered as a site of its own
    shape: Callable[[ModelConfig], tuple[int, int]] | None = None  # [L, C] unless rows are not layers
    labels: Callable[[ModelConfig], list[str]] | None = None  # component names unless per layer
    flat_when_patched: bool = False

    def component_label(self, config: ModelConfig, layer: int, index: int) -> str:
        """"L3.H7" (a head), "L3.MLP" (a whole MLP block) or "L3.N120" (a unit)."""
        if self.heads and index < config.n_heads:
            return f"L{layer}.H{index}"
        return f"L{layer}.MLP" if self.blocks else f"L{layer}.N{index}"


_ENTRIES = (
    Site("attn_pattern", "post-softmax attention probabilities per query head", lambda c: c.n_heads,
         weight=_query_rows, heads=True, lr=0.1, query_axis=2, key_axis=3,
         source_floats=lambda c, p: c.n_heads * p * p, fused="attn_pattern_qk"),
    Site("attn_pattern_qk", "attn_pattern in the fused form: the counterfactual's queries and keys", lambda c: c.n_heads,
         weight=_per_head, heads=True, lr=0.1, source_floats=lambda c, p: p * (c.n_heads + c.n_kv_heads) * c.head_dim,
         internal=True),  # mixes the attention outputs [B, T, H, Dh] of the live and the counterfactual's q, k
    Site("head_out", "per-head attention output before the output projection", lambda c: c.n_heads,
         weight=_per_head, heads=True, lr=0.1, source_floats=lambda c, p: p * c.n_heads * c.head_dim),
    Site("mlp_out", "MLP block output, one gate per residual dimension", lambda c: c.d_model, weight=_per_unit,
         source_floats=lambda c, p: p * c.d_model),
    Site("mlp_hidden", "MLP intermediate neurons", lambda c: c.d_ff, weight=_per_unit,
         source_floats=lambda c, p: p * c.d_ff),
    Site("heads_mlp", "one gate per attention head (head_out) and one per whole MLP block (mlp_out), per layer",
         lambda c: c.n_heads + 1, kind=SiteKind.SET, heads=True, blocks=True, lr=0.1, parts=("head_out", "mlp_out"),
         expand=_heads_and_blocks),
    Site("edges", "edges between residual writers (input, heads, MLPs) and readers (q, k, v inputs, MLPs, logits)",
         lambda c: edges.n_edges(c), kind=SiteKind.EDGES, lr=0.1,
         source_floats=lambda c, p: p * (c.n_heads + 1) * c.d_model + p * c.d_model // c.n_layers,
         expand=lambda c, z: {"edges": edges.from_flat(c, z[0])}, shape=lambda c: (1, edges.n_edges(c)),
         labels=lambda c: list(edges.edge_names(c)), flat_when_patched=True),  # one row [1, E], MIB's order
    Site("attn_keys", "attention keys after RoPE", lambda c: c.n_kv_heads, kind=SiteKind.CAPTURE),
    Site("attn_values", "attention values", lambda c: c.n_kv_heads, kind=SiteKind.CAPTURE),
)
REGISTRY: dict[str, Site] = {entry.name: entry for entry in _ENTRIES}
SITES: dict[str, str] = {s.name: s.description for s in _ENTRIES
                         if s.kind is not SiteKind.CAPTURE and not s.internal}                     # searched
MODEL_SITES: tuple[str, ...] = tuple(s.name for s in _ENTRIES if s.kind is SiteKind.MODEL)         # what is gated
CAPTURE_SITES: tuple[str, ...] = tuple(s.name for s in _ENTRIES if s.kind is not SiteKind.SET)     # captured


def get_site(name: str) -> Site:
    """The registry entry of a gated site or component set; a one-line error naming the known ones otherwise."""
    site = REGISTRY.get(name)
    if site is None or site.kind is SiteKind.CAPTURE:
        raise ValueError(f"unknown site {name!r}; known sites: {', '.join(SITES)}")
    return site


def model_sites(name: str, attention: AttentionForm = AttentionForm.EXPLICIT) -> tuple[str, ...]:
    """The model sites a site or component set gates under the attention form (`attn_pattern` in either form)."""
    site = get_site(name)
    if site.fused is not None and AttentionForm(attention) is AttentionForm.FUSED:
        return (site.fused,)
    return site.parts or (site.name,)


def gate_shape(config: ModelConfig, name: str) -> tuple[int, int]:
    """[L, C]: layers by components per layer ([1, E] for `edges`: its E edges in MIB's order, one row, since an
    edge forward runs every layer)."""
    site = get_site(name)
    return site.shape(config) if site.shape is not None else (config.n_layers, site.width(config))


def expand_gates(config: ModelConfig, name: str, z: jax.Array,
                 attention: AttentionForm = AttentionForm.EXPLICIT) -> dict[str, jax.Array]:
    """Model-site gates {site: [L, C_site]} of gates z [L, C] at a site or component set."""
    site = get_site(name)
    if site.expand is not None:
        return site.expand(config, z)
    return {model_sites(name, attention)[0]: z}


def component_labels(config: ModelConfig, name: str) -> list[str]:
    """[L * C] readable component names in flat order, e.g. "L3.H7", "L3.MLP", "L3.N120"."""
    site = get_site(name)
    if site.labels is not None:
        return site.labels(config)
    n_layers, width = gate_shape(config, name)
    return [site.component_label(config, layer, index) for layer in range(n_layers) for index in range(width)]


def source_bytes_per_pair(config: ModelConfig, name: str, prompt_length: int, prefix_length: int = 0,
                          attention: AttentionForm = AttentionForm.EXPLICIT) -> int:
    """Float32 bytes one pair's cached sources take (every model site `name` gates, over all layers), plus the
    keys and values of its `prefix_length` shared-prefix tokens."""
    floats = sum(REGISTRY[part].source_floats(config, prompt_length) for part in model_sites(name, attention))
    keys_values = 2 * prefix_length * config.n_kv_heads * config.head_dim
    return 4 * config.n_layers * (floats + keys_values)


def default_lr(name: str) -> float:
    return get_site(name).lr


def full_gates(config: ModelConfig, sites, value: float = 0.0, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Gates of constant `value` for each site."""
    return {site: jnp.full(gate_shape(config, site), value, dtype) for site in sites}


def source_length(name: str, source: jax.Array) -> int:
    """The number of (query) token positions a captured source [L, B, ...] covers."""
    return source.shape[1 + REGISTRY[name].query_axis]


def pad_source(name: str, source: jax.Array, length: int, n_memory: int = 0) -> jax.Array:
    """Zero-pad a captured source [L, B, ...] along its token axes up to `length` query tokens (and, for attention
    patterns, `n_memory` + `length` keys)."""
    site = REGISTRY[name]
    src_len = source_length(name, source)
    if src_len > length:
        raise ValueError(f"source for {name!r} has {src_len} tokens, more than the {length} of the live input")
    pad = [(0, 0)] * source.ndim
    pad[1 + site.query_axis] = (0, length - src_len)
    if site.key_axis is not None:
        keys = source.shape[1 + site.key_axis]
        if keys > n_memory + length:
            raise ValueError(f"source for {name!r} has {keys} keys, more than the {n_memory + length} the live "
                             "input attends to")
        pad[1 + site.key_axis] = (0, n_memory + length - keys)
    return jnp.pad(source, pad) if any(p != (0, 0) for p in pad) else source


def check_gates(config: ModelConfig, gates: Gates | None, source: Activations | None) -> None:
    """Raise a clear error when gates and source do not match the model or each other."""
    if not gates:
        return
    if "edges" in gates:
        if len(gates) > 1:
            raise ValueError(f"gates at 'edges' cannot be combined with other sites, got {', '.join(gates)}")
        return edges.check_edges(config, gates["edges"], source)
    for site, gate in gates.items():
        if site not in MODEL_SITES:
            raise ValueError(f"the forward takes gates at model sites ({', '.join(MODEL_SITES)}), got {site!r}; "
                             "expand a component set's gates with expand_gates")
        expected = gate_shape(config, site)
        if tuple(gate.shape) != expected:
            raise ValueError(f"gate for {site!r} has shape {tuple(gate.shape)}, "
                             f"expected {expected} [layers, components]")
        if source is None or site not in source:
            raise ValueError(f"gates at {site!r} need a source activation for that site (see Model.capture)")
        if source[site].shape[0] != config.n_layers:
            raise ValueError(f"source for {site!r} has {source[site].shape[0]} layers, the model {config.n_layers}")
