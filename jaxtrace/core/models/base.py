"""The gated forward shared by all families: embed, scan the stacked layers with gates and sources, unembed."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.core.models import layers
from jaxtrace.core.models.config import ModelConfig
from jaxtrace.core.sites import CAPTURE_SITES, Activations, Gates, check_gates, pad_source, source_length


class GatedLM(nnx.Module):
    """A decoder-only LM whose forward takes explicit gates and source activations.

    Subclasses define the parameters (`self.blocks` holds every layer's parameters stacked on a leading layer axis)
    and `embed(ids, positions) -> [B, T, D]`, `block(params, x, context, intervention) -> x` and
    `unembed(hidden [..., D]) -> logits [..., V]` (final norm and output head, float32). A layer's `context` is that
    of its kind (`context(..., windowed)`), chosen per layer inside the scan (`ModelConfig.windowed_layers`).
    """

    config: ModelConfig

    def __call__(self, input_ids, attention_mask=None, gates: Gates | None = None,
                 source: Activations | None = None, gate_positions=None, position_ids=None,
                 input_noise=None, memory=None, fused: bool = False) -> jax.Array:
        """Logits [B, T, V] (float32).

        input_ids: [B, T] ints; attention_mask: [B, T] (1 = real token, causal attention) or [B, T, E + T] (which
        keys each query sees, for packed sequences); gates: site -> [L, C] in [0, 1]; source: site -> [L, B, ...]
        captured activations (token axes may be shorter than T: the missing positions are not mixed);
        gate_positions: [B, T] bool, the token positions where gates apply (default: all); position_ids: [B, T]
        (default: 0..T-1); input_noise: [B, T, D] added to the input embeddings (noise-corrupted counterfactuals);
        memory: {"keys", "values": [L, B, E, K, Dh], "positions": [B, E]}, cached tokens (e.g. captured at
        `attn_keys`/`attn_values`) that queries attend to before the T live keys, as `attention_mask` allows;
        fused: attention through `jax.nn.dot_product_attention` instead of explicit patterns (`attn_pattern` can then
        only be gated in its fused form, `attn_pattern_qk`).
        """
        logits, _ = self.capture(input_ids, attention_mask, (), gates, source, gate_positions, position_ids,
                                 input_noise, memory, fused)
        return logits

    def capture(self, input_ids, attention_mask=None, sites: Sequence[str] = (), gates: Gates | None = None,
                source: Activations | None = None, gate_positions=None, position_ids=None,
                input_noise=None, memory=None, fused: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits [B, T, V], activations site -> [L, B, ...]) at the requested sites (after any mixing there)."""
        hidden, captured = self.hidden_states(input_ids, attention_mask, sites, gates, source, gate_positions,
                                              position_ids, input_noise, memory, fused)
        return self.unembed(hidden), captured

    def hidden_states(self, input_ids, attention_mask=None, sites: Sequence[str] = (), gates: Gates | None = None,
                      source: Activations | None = None, gate_positions=None, position_ids=None,
                      input_noise=None, memory=None, fused: bool = False, layer_range: tuple[int, int] | None = None,
                      initial=None, unroll: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(final hidden states [B, T, D] before the final norm, activations site -> [L, B, ...]); see `capture`.

        `layer_range` (start, stop): run only those layers, from `initial` [B, T, D] (the residual stream entering
        layer `start`; the embeddings when start is 0); the result is the residual leaving layer stop - 1 and the
        captures of those layers. Gates and sources keep their L layers (the others' are not read)."""
        config = self.config
        for site in sites:
            if site not in CAPTURE_SITES:
                raise ValueError(f"unknown site {site!r} for capture; sites: {', '.join(CAPTURE_SITES)}")
        check_gates(config, gates, source)
        if fused and ("attn_pattern" in sites or "attn_pattern" in (gates or {})):
            raise ValueError("with fused attention there is no explicit pattern: gate attn_pattern_qk instead")
        if memory is not None and jnp.ndim(attention_mask) != 3:
            raise ValueError("a forward with memory needs an explicit [B, T, E + T] attention mask")
        input_ids = jnp.asarray(input_ids)
        batch, length = input_ids.shape
        gates = dict(gates or {})
        where = jnp.ones((batch, length), jnp.float32)
        if gate_positions is not None:
            where = where * jnp.asarray(gate_positions, jnp.float32)
        sources = {}
        n_memory = 0 if memory is None else memory["keys"].shape[2]
        for site in gates:
            if source[site].shape[1] != batch:
                raise ValueError(f"source for {site!r} has batch {source[site].shape[1]}, the input {batch}")
            sources[site] = pad_source(site, source[site], length, n_memory)
            where = where * (jnp.arange(length) < source_length(site, source[site])).astype(jnp.float32)[None, :]

        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
        position_ids = jnp.asarray(position_ids)
        key_positions = None if memory is None else jnp.concatenate([memory["positions"], position_ids], 1)
        windowed = config.windowed_layers
        contexts = {kind: self.context(attention_mask, position_ids, key_positions, kind) for kind in set(windowed)}
        start, stop = layer_range or (0, config.n_layers)
        if start:
            x = jnp.asarray(initial)
        else:
            x = self.embed(input_ids, position_ids)
            if input_noise is not None:
                x = x + jnp.asarray(input_noise, x.dtype)
        stacked = nnx.to_pure_dict(nnx.state(self.blocks, nnx.Param))
        layer_memory = None if memory is None else {"keys": memory["keys"], "values": memory["values"]}
        scanned = (stacked, jnp.asarray(windowed), gates, sources, layer_memory)
        if (start, stop) != (0, config.n_layers):
            scanned = jax.tree.map(lambda a: a[start:stop], scanned)

        # Under differentiation each layer keeps only its matmul outputs and recomputes the rest (norms, softmax,
        # mixing) in the backward pass: on CPU that is faster than storing every residual of the scan.
        @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False)
        def layer(x, inputs):
            params, layer_windowed, layer_gates, layer_source, layer_memory = inputs
            if len(contexts) == 1:
                (context,) = contexts.values()
            else:  # sliding-window and global layers: the layer's flag picks its kind's tensors
                context = jax.tree.map(functools.partial(jnp.where, layer_windowed), contexts[True], contexts[False])
            iv = layers.Intervention(layer_gates, layer_source, where, tuple(sites), layer_memory, fused)
            return self.block(params, x, context, iv), iv.captured

        return jax.lax.scan(layer, x, scanned, unroll=unroll)

    def context(self, attention_mask, position_ids, key_positions=None, windowed: bool = False) -> dict[str, jax.Array]:
        """Per-forward tensors the layers of one kind (sliding-window or not) read: the attention bias; RoPE tables
        where used."""
        window = self.config.sliding_window if windowed else None
        return {"bias": layers.attention_bias(attention_mask, position_ids, window, key_positions)}


def functional(model: GatedLM):
    """(apply, params): a pure `apply(params, *args, method="__call__", **kwargs)` for `jax.jit`/`grad`/`vmap`.

    Passing the parameters as an argument keeps them out of the compiled program as constants.
    """
    graphdef, params = nnx.split(model)

    def apply(params, *args, method: str = "__call__", **kwargs):
        return getattr(nnx.merge(graphdef, params), method)(*args, **kwargs)

    return apply, params
