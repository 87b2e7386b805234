"""The gated forward shared by all families: embed, scan the stacked layers with one intervention, unembed."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.core import edges
from jaxtrace.core.edges import EdgeGates
from jaxtrace.core.intervention import NO_INTERVENTION, Capture, Intervention
from jaxtrace.core.models import layers
from jaxtrace.core.models.config import ModelConfig
from jaxtrace.core.records import Tokens
from jaxtrace.core.sites import AttentionForm, check_gates, pad_source, source_length


def as_tokens(tokens) -> Tokens:
    """`tokens` as a `Tokens` record (an array of ids [B, T] alone: every token real, positions 0..T-1)."""
    return tokens if isinstance(tokens, Tokens) else Tokens(jnp.asarray(tokens))


class GatedLM(nnx.Module):
    """A decoder-only LM whose forward takes its tokens, one `Intervention` and a `Capture` request.

    Subclasses define the parameters (`self.blocks` holds every layer's parameters stacked on a leading layer axis)
    and `embed(ids, positions) -> [B, T, D]`, `block(params, x, context, mixer) -> x` and
    `final_norm_of(hidden [..., D]) -> [..., D]`, and keep `embed_tokens` [V, D] and `lm_head` [D, V] (None when
    tied): `unembed` gives the logits from them. A block hands every site
    value to `mixer(site, value)` (`layers.Mixer`), which mixes it where gated and records it where captured. The
    forward through edges (`jaxtrace.core.edges`) runs the block's two halves apart:
    `attention_writers(params, xq, xk, xv, context, mixer) -> (per-head outputs [B, T, H, D], their sum [B, T, D])`
    from the residual streams [B, T, D] (or per head [B, T, H, D]) the queries, keys and values read, and
    `mlp_block(params, x, mixer) -> [B, T, D]`, what the MLP adds to the residual stream x it reads. A
    layer's `context` is that of its kind (`context(..., windowed)`), chosen per layer inside the scan
    (`ModelConfig.windowed_layers`).
    """

    config: ModelConfig

    def __call__(self, tokens: Tokens, intervention: Intervention = NO_INTERVENTION) -> jax.Array:
        """Logits [B, T, V] (float32) of `tokens` (a `Tokens` record, or ids [B, T]) under `intervention`."""
        return self.capture(tokens, Capture(), intervention)[0]

    def capture(self, tokens: Tokens, capture: Capture | tuple[str, ...],
                intervention: Intervention = NO_INTERVENTION) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits [B, T, V], activations site -> [L, B, ...]) at the captured sites (after any mixing there)."""
        hidden, captured = self.hidden_states(tokens, intervention, capture)
        return self.unembed(hidden), captured

    def hidden_states(self, tokens: Tokens, intervention: Intervention = NO_INTERVENTION,
                      capture: Capture | tuple[str, ...] = Capture(), layer_range: tuple[int, int] | None = None,
                      initial=None, unroll: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(final hidden states [B, T, D] before the final norm, activations site -> [L, B, ...]).

        `layer_range` (start, stop): run only those layers, from `initial` [B, T, D] (the residual stream entering
        layer `start`; the embeddings when start is 0); the result is the residual leaving layer stop - 1 and the
        captures of those layers. Gates and sources keep their L layers (the others' are not read). `unroll`: layers
        per iteration of the layer scan (XLA's cost analysis counts a loop's body once)."""
        if not isinstance(intervention, Intervention):
            raise TypeError(f"expected an Intervention, got {type(intervention).__name__} (an attention mask goes in "
                            "Tokens(ids, mask))")
        config, tokens = self.config, as_tokens(tokens)
        capture = capture if isinstance(capture, Capture) else Capture(capture)
        gates, source, memory = dict(intervention.gates), intervention.sources, intervention.memory
        fused = intervention.attention is AttentionForm.FUSED
        check_gates(config, gates, source)
        if fused and ("attn_pattern" in capture or "attn_pattern" in gates):
            raise ValueError("with fused attention there is no explicit pattern: gate attn_pattern_qk instead")
        if memory is not None and jnp.ndim(tokens.mask) != 3:
            raise ValueError("a forward with memory needs an explicit [B, T, E + T] attention mask")
        input_ids = jnp.asarray(tokens.ids)
        batch, length = input_ids.shape
        where = jnp.ones((batch, length), jnp.float32)
        if intervention.positions is not None:
            where = where * jnp.asarray(intervention.positions, jnp.float32)
        sources = {}
        n_memory = 0 if memory is None else memory.keys.shape[2]
        for site in gates:
            for name in ("edges", "edges_input") if site == "edges" else (site,):
                if source[name].shape[1] != batch:
                    raise ValueError(f"source for {name!r} has batch {source[name].shape[1]}, the input {batch}")
                sources[name] = pad_source(site, source[name], length, n_memory)
                where = where * (jnp.arange(length) < source_length(site, source[name])).astype(jnp.float32)[None, :]

        position_ids = tokens.positions
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
        position_ids = jnp.asarray(position_ids)
        key_positions = None if memory is None else jnp.concatenate([memory.positions, position_ids], 1)
        windowed = config.windowed_layers
        contexts = {kind: self.context(tokens.mask, position_ids, key_positions, kind) for kind in set(windowed)}
        start, stop = layer_range or (0, config.n_layers)
        if start:
            x = jnp.asarray(initial)
        else:
            x = self.embed(input_ids, position_ids)
            if tokens.noise is not None:
                x = x + jnp.asarray(tokens.noise, x.dtype)
        stacked = nnx.to_pure_dict(nnx.state(self.blocks, nnx.Param))
        layer_memory = None if memory is None else {"keys": memory.keys, "values": memory.values}
        if "edges" in gates or "edges" in capture:
            if (start, stop) != (0, config.n_layers):
                raise ValueError("a forward through edges runs every layer: layer_range is not supported")
            return self._edge_states(x, stacked, contexts, gates.get("edges"), sources, where, capture, layer_memory,
                                     fused)
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
            mixer = layers.Mixer(layer_gates, layer_source, where, capture, layer_memory, fused)
            return self.block(params, x, context, mixer), mixer.captured

        return jax.lax.scan(layer, x, scanned, unroll=unroll)

    def output_head(self) -> jax.Array:
        """[V, D] the output head, a row per token."""
        return self.embed_tokens[...] if self.lm_head is None else self.lm_head[...].T

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """Logits [..., V] (float32) of final hidden states [..., D]: final norm, output head, final softcap."""
        return layers.output_logits(self.final_norm_of(hidden), self.output_head(), self.config.final_logit_softcap)

    def log_normaliser(self, hidden: jax.Array) -> jax.Array:
        """[Q] logsumexp of the logits of final hidden states [Q, D], without holding the logits
        (`layers.log_normaliser`)."""
        return layers.log_normaliser(self.final_norm_of(hidden), self.output_head(), self.config.final_logit_softcap)

    def token_logits(self, hidden: jax.Array, ids: jax.Array) -> jax.Array:
        """[...] the logit of token ids [...] at final hidden states [..., D]."""
        rows = self.output_head()[ids]  # [..., D]
        value = jnp.einsum("...d,...d->...", self.final_norm_of(hidden), rows, preferred_element_type=jnp.float32)
        return layers.softcap(value, self.config.final_logit_softcap)

    def _edge_states(self, x: jax.Array, stacked: dict, contexts: dict, gates: EdgeGates | None, sources: dict,
                     where: jax.Array, capture: Capture, memory: dict | None,
                     fused: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`hidden_states` through the residual stream's edges (`jaxtrace.core.edges`): every reader reads the live
        stream plus its gated writers' deltas cf − live (none when `gates` is None). Also captures `edges` (each
        layer's writer outputs [L, B, T, H + 1, D]: heads, then the MLP) and `edges_input` (the embeddings
        [1, B, T, D]).

        The layers run as a Python loop, each under `jax.checkpoint`, so that under differentiation the deltas are
        kept once ([O, B, T, D] writer-major, in the activations' dtype, in all), not once per layer as a scan's
        carry would be."""
        config, (batch, length, width) = self.config, x.shape
        n_heads = config.n_heads
        written = [] if gates is None else [(sources["edges_input"][0] - x)[None]]  # deltas [n, B, T, D]
        embeddings, captured, outputs = x, [], []

        def layer(layer_index, p, x, written, z_qkv, z_mlp, cf, layer_memory):
            mixer = layers.Mixer({}, {}, where, capture, layer_memory, fused)
            context = contexts[config.windowed_layers[layer_index]]
            xq = xk = xv = x
            if gates is not None:  # [B, T, 3, H, D] -> three [B, T, H, D]
                reads = edges.read(x, z_qkv.reshape(3 * n_heads, -1), written, where)
                xq, xk, xv = jnp.moveaxis(reads.reshape(batch, length, 3, n_heads, width), 2, 0)
            per_head, out = self.attention_writers(p, xq, xk, xv, context, mixer)
            x = x + out
            if gates is None:
                deltas, mlp = [], self.mlp_block(p, x, mixer)
            else:
                deltas = [jnp.moveaxis(cf[:, :, :n_heads] - per_head, 2, 0)]  # writer-major, once a writer
                mlp = self.mlp_block(p, edges.read(x, z_mlp[None], written + deltas, where)[:, :, 0], mixer)
                deltas.append((cf[:, :, n_heads] - mlp)[None])
            writers = jnp.concatenate([per_head, mlp[:, :, None]], axis=2) if "edges" in capture else None
            return x + mlp, deltas, writers, mixer.captured

        layer = jax.checkpoint(layer, static_argnums=0, policy=jax.checkpoint_policies.dots_saveable,
                               prevent_cse=False)
        for index in range(config.n_layers):
            at = lambda tree: jax.tree.map(lambda a: a[index], tree)  # noqa: E731
            z_qkv, z_mlp, cf = (None,) * 3 if gates is None else (gates.qkv[index], gates.mlp[index],
                                                                  sources["edges"][index])
            x, deltas, writers, layer_captured = layer(index, at(stacked), x, written, z_qkv, z_mlp, cf, at(memory))
            written, captured = written + deltas, captured + [layer_captured]
            outputs.append(writers)
        if gates is not None:
            x = edges.read(x, gates.logits[None], written, where)[:, :, 0]
        acts = jax.tree.map(lambda *a: jnp.stack(a), *captured) if captured[0] else {}
        if "edges" in capture:
            acts = {**acts, "edges": jnp.stack(outputs), "edges_input": embeddings[None]}
        return x, acts

    def context(self, attention_mask, position_ids, key_positions=None, windowed: bool = False) -> dict[str, jax.Array]:
        """Per-forward tensors the layers of one kind (sliding-window or not) read: the attention bias; RoPE tables
        where used."""
        window = self.config.sliding_window if windowed else None
        return {"bias": layers.attention_bias(attention_mask, position_ids, window, key_positions)}


@dataclasses.dataclass(frozen=True, eq=False)
class PureLM:
    """A model as pure functions of its parameters, for `jax.jit`/`grad`/`vmap` (the parameters are an argument,
    not constants of the compiled program): `logits`, `capture`, `hidden_states`, `unembed`, `log_normaliser` and
    `token_logits` as `GatedLM`'s, each
    taking `params` first. Compared and hashed by identity."""

    graphdef: nnx.GraphDef
    config: ModelConfig

    def _model(self, params) -> GatedLM:
        return nnx.merge(self.graphdef, params)

    def logits(self, params, tokens: Tokens, intervention: Intervention = NO_INTERVENTION) -> jax.Array:
        return self._model(params)(tokens, intervention)

    def capture(self, params, tokens: Tokens, capture: Capture | tuple[str, ...],
                intervention: Intervention = NO_INTERVENTION) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self._model(params).capture(tokens, capture, intervention)

    def hidden_states(self, params, tokens: Tokens, intervention: Intervention = NO_INTERVENTION,
                      capture: Capture | tuple[str, ...] = Capture(), layer_range: tuple[int, int] | None = None,
                      initial=None, unroll: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self._model(params).hidden_states(tokens, intervention, capture, layer_range, initial, unroll)

    def unembed(self, params, hidden: jax.Array) -> jax.Array:
        return self._model(params).unembed(hidden)

    def log_normaliser(self, params, hidden: jax.Array) -> jax.Array:
        return self._model(params).log_normaliser(hidden)

    def token_logits(self, params, hidden: jax.Array, ids: jax.Array) -> jax.Array:
        return self._model(params).token_logits(hidden, ids)


def pure(model: GatedLM) -> tuple[PureLM, nnx.State]:
    """(the model's pure functions, its parameters)."""
    graphdef, params = nnx.split(model)
    return PureLM(graphdef, model.config), params
