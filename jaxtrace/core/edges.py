"""Edges of the residual stream: the `edges` gate site's graph, gates and mixing.

The residual stream is disentangled into its O = 1 + L·(H + 1) writers, in this order: `input` (the embeddings),
then per layer l the heads `a{l}.h0` … `a{l}.h{H-1}` and the MLP `m{l}`. Its readers are each head's query, key and
value inputs (`a{l}.h{h}<q>`, `<k>`, `<v>`), each MLP's input and the logits. Reader r receives the embeddings plus
the outputs of every earlier writer p, each mixed by its edge gate z[p → r]:

    input_r = x_r + where · Σ_p z[p → r] · (cf_p − live_p)

where x_r is the live residual stream at r (all gates 0), live_p writer p's output in this (gated) forward, cf_p its
output in the counterfactual's forward (cached once per pair, like other sites' sources) and `where` [B, T] the
positions where gates apply. All gates 0 is the live forward, all 1 the counterfactual's; every outgoing edge of a
head at 1 is patching that head's output (`head_out`) in GPT-2 and Llama. A writer's output is what it adds to the
residual stream: a head's is its share of the attention output, h_h·W_O[h] (+ b_O / H); in Gemma, whose attention
output is normed after the heads are summed, it is that share times the norm's scale in the writer's own forward,
so the heads still sum to the block's output (all 0 and all 1 stay exact), but one head's outgoing edges at 1 is no
longer its `head_out` patch (the norm's scale there is computed from the patched sum).

The graph is MIB's / EAP-IG's (`Graph.from_model`, parallel_attn_mlp=False): a reader reads every writer before it
(an MLP reads its own layer's heads), so there are Σ_l 3H·(1 + l(H + 1)) + Σ_l (1 + l(H + 1) + H) + O edges, 32,491
for GPT-2 small. Grouped-query models keep MIB's ungrouped names: query head h has its own key and value readers,
which project with the weights of its KV head h // (H / K); an edge into `a{l}.h{h}<k>` changes the keys (and
`<v>` the values) only query head h reads, so the gated forward computes keys and values for every query head (as
TransformerLens' ungrouped attention does) and the edge count is the same as for an ungrouped model.

Gates (`EdgeGates`, a pytree: `grad`, `vmap` over masks and sharding apply) hold every (reader, writer) pair,
writers padded to O; the entries of writers at or after a reader are not edges and are never read (their gradient
is 0). `to_flat`/`from_flat` map them to and from the E edges in MIB's order (`edge_names`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace.core.models.config import ModelConfig
from jaxtrace.core.records import record

F32 = jnp.float32


@record
class EdgeGates:
    """Edge gates in [0, 1]: `qkv` [L, 3, H, O] (reader layer, q/k/v, query head, writer), `mlp` [L, O] (reader
    layer, writer), `logits` [O] (writer). Writers in `writer_names` order."""

    qkv: jax.Array
    mlp: jax.Array
    logits: jax.Array


def n_writers(config: ModelConfig) -> int:
    """O = 1 + L·(H + 1)."""
    return 1 + config.n_layers * (config.n_heads + 1)


def layer_writers(config: ModelConfig, layer: int) -> int:
    """The writers before layer `layer`'s heads: the input and every earlier layer's heads and MLP."""
    return 1 + layer * (config.n_heads + 1)


def writer_names(config: ModelConfig) -> list[str]:
    """[O] "input", "a{l}.h{h}", "m{l}" in writer order."""
    heads = range(config.n_heads)
    return ["input", *(name for layer in range(config.n_layers)
                       for name in (*(f"a{layer}.h{h}" for h in heads), f"m{layer}"))]


def edge_shapes(config: ModelConfig) -> EdgeGates:
    """The gates' shapes (tuples in an `EdgeGates`)."""
    L, H, O = config.n_layers, config.n_heads, n_writers(config)
    return EdgeGates((L, 3, H, O), (L, O), (O,))


def full_edges(config: ModelConfig, value: float = 0.0, dtype=F32) -> EdgeGates:
    """Edge gates of constant `value`."""
    return jax.tree.map(lambda shape: jnp.full(shape, value, dtype), edge_shapes(config),
                        is_leaf=lambda s: isinstance(s, tuple))


@functools.lru_cache(maxsize=16)
def _graph(config: ModelConfig) -> tuple[tuple[str, ...], np.ndarray]:
    """(E edge names "parent->child" in MIB's order, [E] their indices into the concatenated raveled gates)."""
    L, H, O = config.n_layers, config.n_heads, n_writers(config)
    writers = writer_names(config)
    names, index = [], []
    mlp_start, logits_start = L * 3 * H * O, L * 3 * H * O + L * O
    for layer in range(L):
        before = layer_writers(config, layer)
        for parent in range(before):
            for head in range(H):
                for port, letter in enumerate("qkv"):
                    names.append(f"{writers[parent]}->a{layer}.h{head}<{letter}>")
                    index.append(((layer * 3 + port) * H + head) * O + parent)
        for parent in range(before + H):
            names.append(f"{writers[parent]}->m{layer}")
            index.append(mlp_start + layer * O + parent)
    for parent in range(O):
        names.append(f"{writers[parent]}->logits")
        index.append(logits_start + parent)
    return tuple(names), np.asarray(index, np.int32)


def edge_names(config: ModelConfig) -> tuple[str, ...]:
    """[E] the edges "parent->child" in MIB's order (EAP-IG's `Graph.from_model` edge names)."""
    return _graph(config)[0]


def n_edges(config: ModelConfig) -> int:
    """E, the edges as MIB counts them."""
    return len(_graph(config)[1])


def to_flat(config: ModelConfig, gates: EdgeGates) -> jax.Array:
    """[E] the gates of the edges in `edge_names` order."""
    return jnp.concatenate([gates.qkv.ravel(), gates.mlp.ravel(), gates.logits.ravel()])[_graph(config)[1]]


def from_flat(config: ModelConfig, flat: jax.Array) -> EdgeGates:
    """Edge gates from [E] gates in `edge_names` order (non-edges 0)."""
    shapes = edge_shapes(config)
    sizes = [int(np.prod(s)) for s in (shapes.qkv, shapes.mlp, shapes.logits)]
    dense = jnp.zeros(sum(sizes), flat.dtype).at[_graph(config)[1]].set(flat)
    qkv, mlp, logits = jnp.split(dense, np.cumsum(sizes)[:-1])
    return EdgeGates(qkv.reshape(shapes.qkv), mlp.reshape(shapes.mlp), logits.reshape(shapes.logits))


def check_edges(config: ModelConfig, gates, sources) -> None:
    """Raise a clear error when edge gates or their sources do not match the model."""
    if not isinstance(gates, EdgeGates):
        raise ValueError(f"gates at 'edges' must be an EdgeGates (jaxtrace.core.edges), got {type(gates).__name__}")
    for field, expected in zip(("qkv", "mlp", "logits"), jax.tree.leaves(edge_shapes(config),
                                                                          is_leaf=lambda s: isinstance(s, tuple))):
        if tuple(getattr(gates, field).shape) != expected:
            raise ValueError(f"edge gates {field!r} have shape {tuple(getattr(gates, field).shape)}, expected "
                             f"{expected}")
    if sources is None or "edges" not in sources or "edges_input" not in sources:
        raise ValueError("gates at 'edges' need the counterfactual's writer outputs 'edges' and 'edges_input' (see "
                         "Model.capture(tokens, ('edges',)))")
    expected = (config.n_layers, config.n_heads + 1, config.d_model)
    got = sources["edges"].shape
    if (got[0], *got[3:]) != expected:
        raise ValueError(f"source for 'edges' has shape {tuple(got)}, expected [L, B, T, H + 1, D] with (L, H + 1, "
                         f"D) = {expected}")


def read(x: jax.Array, z: jax.Array, written: list[jax.Array], where: jax.Array) -> jax.Array:
    """[B, T, R, D] the inputs of R readers: the live residual x [B, T, D] plus, where gated, the writers' deltas
    cf − live (`written`: writer-major chunks [n_i, B, T, D] in writer order, n = Σ n_i writers so far) mixed by
    their gates z [R, O] (float32; writers from n on unread)."""
    mixed = _mix(z[:, :sum(w.shape[0] for w in written)].astype(F32), tuple(written))  # [R, B, T, D]
    return (x.astype(F32)[:, :, None] + where[:, :, None, None] * jnp.moveaxis(mixed, 0, 2)).astype(x.dtype)


@jax.custom_vjp
def _mix(z: jax.Array, written: tuple[jax.Array, ...]) -> jax.Array:
    """[R, B, T, D] Σ_p z[r, p] · delta_p over the n writers of the writer-major chunks `written` (z [R, n]
    float32): one matmul [R, n] x [n, B·T·D] over their concatenation, which is a contiguous copy.

    Its gradient is computed chunk by chunk and keeps only the arguments: differentiated as one einsum over the
    concatenated float32 deltas, every read of a forward left a [n, B, T, D] float32 array for the backward pass
    (SmolLM2-135M's training step: 4.6 GiB of XLA temp for 160 tokens; chunk by chunk 1.7 GiB). Writer-major, each
    chunk's products are matmuls over B·T·D with no transposes (writers minor cost a transposing copy of every
    writer at every read: 3.3 of a mask evaluation's 8.9 s on SmolLM2, `benchmarks/EDGES.md`)."""
    return jnp.einsum("rn,nbtd->rbtd", z, jnp.concatenate([w.astype(F32) for w in written], axis=0))


def _mix_forward(z, written):
    return _mix(z, written), (z, written)


def _mix_backward(residuals, cotangent):
    z, written = residuals
    starts = np.cumsum([0] + [w.shape[0] for w in written])
    dz = jnp.concatenate([jnp.einsum("rbtd,nbtd->rn", cotangent, w.astype(F32)) for w in written], axis=1)
    d_written = tuple(jnp.einsum("rn,rbtd->nbtd", z[:, start:end], cotangent).astype(w.dtype)
                      for start, end, w in zip(starts[:-1], starts[1:], written))
    return dz, d_written


_mix.defvjp(_mix_forward, _mix_backward)
