"""GPT-2: learned positions, pre-LayerNorm blocks, gelu_new MLP, fused biases, tied unembedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.core.models import layers
from jaxtrace.core.models.base import GatedLM
from jaxtrace.core.models.config import ModelConfig


class GPT2Blocks(nnx.Module):
    """All layers' parameters, stacked on a leading `layers` axis."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        L, D, H, Dh, F = config.n_layers, config.d_model, config.n_heads, config.head_dim, config.d_ff
        dtype = layers.dtype_of(config)

        def p(shape, axes, init="normal"):
            return layers.param(rngs, (L, *shape), ("layers", *axes), dtype, init)

        self.attn_norm = p((D,), ("embed",), "ones")
        self.attn_norm_bias = p((D,), ("embed",), "zeros")
        self.q = p((D, H, Dh), ("embed", "heads", "head_dim"))
        self.k = p((D, H, Dh), ("embed", "heads", "head_dim"))
        self.v = p((D, H, Dh), ("embed", "heads", "head_dim"))
        self.q_bias = p((H, Dh), ("heads", "head_dim"), "zeros")
        self.k_bias = p((H, Dh), ("heads", "head_dim"), "zeros")
        self.v_bias = p((H, Dh), ("heads", "head_dim"), "zeros")
        self.o = p((H, Dh, D), ("heads", "head_dim", "embed"))
        self.o_bias = p((D,), ("embed",), "zeros")
        self.mlp_norm = p((D,), ("embed",), "ones")
        self.mlp_norm_bias = p((D,), ("embed",), "zeros")
        self.up = p((D, F), ("embed", "mlp"))
        self.up_bias = p((F,), ("mlp",), "zeros")
        self.down = p((F, D), ("mlp", "embed"))
        self.down_bias = p((D,), ("embed",), "zeros")


class GPT2(GatedLM):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dtype = layers.dtype_of(config)
        self.config = config
        self.embed_tokens = layers.param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), dtype)
        self.embed_positions = layers.param(rngs, (config.max_positions, config.d_model), (None, "embed"), dtype)
        self.blocks = GPT2Blocks(config, rngs)
        self.final_norm = layers.param(rngs, (config.d_model,), ("embed",), dtype, "ones")
        self.final_norm_bias = layers.param(rngs, (config.d_model,), ("embed",), dtype, "zeros")
        self.lm_head = (None if config.tie_embeddings else
                        layers.param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"), dtype))

    def embed(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        return self.embed_tokens[...][input_ids] + self.embed_positions[...][position_ids]

    def heads(self, p: dict, xq: jax.Array, xk: jax.Array, xv: jax.Array, context: dict,
              mixer: layers.Mixer) -> jax.Array:
        """Per-head attention outputs [B, T, H, Dh] of the residual streams the queries, keys and values read:
        [B, T, D] each, or per head [B, T, H, D] (edges)."""
        eps, spec = self.config.norm_eps, "btd,dhk->bthk" if xq.ndim == 3 else "bthd,dhk->bthk"
        q, k, v = (layers.add_bias(jnp.einsum(spec, layers.layer_norm(x, p["attn_norm"], p["attn_norm_bias"], eps),
                                              p[n]), p[f"{n}_bias"]) for n, x in zip("qkv", (xq, xk, xv)))
        return layers.gated_attention(q, k, v, context["bias"], mixer)

    def attention_writers(self, p: dict, xq: jax.Array, xk: jax.Array, xv: jax.Array, context: dict,
                          mixer: layers.Mixer) -> tuple[jax.Array, jax.Array]:
        """(each head's output [B, T, H, D] (its share h·W_O[h] + b_O / H), their sum [B, T, D])."""
        per_head = jnp.einsum("bthk,hkd->bthd", self.heads(p, xq, xk, xv, context, mixer), p["o"])
        per_head = layers.add_bias(per_head, p["o_bias"] / self.config.n_heads)
        return per_head, per_head.sum(2)

    def mlp_block(self, p: dict, x: jax.Array, mixer: layers.Mixer) -> jax.Array:
        """The MLP's output [B, T, D] read from the residual stream x [B, T, D]."""
        h = layers.layer_norm(x, p["mlp_norm"], p["mlp_norm_bias"], self.config.norm_eps)
        act = layers.activation(self.config.activation)
        hidden = mixer("mlp_hidden", act(layers.add_bias(h @ p["up"], p["up_bias"])))
        return mixer("mlp_out", layers.add_bias(hidden @ p["down"], p["down_bias"]))

    def block(self, p: dict, x: jax.Array, context: dict, mixer: layers.Mixer) -> jax.Array:
        heads = self.heads(p, x, x, x, context, mixer)
        x = x + layers.add_bias(jnp.einsum("bthk,hkd->btd", heads, p["o"]), p["o_bias"])
        return x + self.mlp_block(p, x, mixer)

    def final_norm_of(self, x: jax.Array) -> jax.Array:
        return layers.layer_norm(x, self.final_norm[...], self.final_norm_bias[...], self.config.norm_eps)
