"""The Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm). RoPE, RMSNorm, gated MLP, GQA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.core.models import layers
from jaxtrace.core.models.base import GatedLM
from jaxtrace.core.models.config import ModelConfig


class LlamaBlocks(nnx.Module):
    """All layers' parameters, stacked on a leading `layers` axis; norm weights start at `norm_init` (the unit
    scale), and `post_norms` adds norms of the attention and MLP outputs (`post_attn_norm`, `post_mlp_norm`)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, norm_init: str = "ones", post_norms: bool = False):
        L, D, H, K = config.n_layers, config.d_model, config.n_heads, config.n_kv_heads
        Dh, F = config.head_dim, config.d_ff
        dtype = layers.dtype_of(config)

        def p(shape, axes, init="normal"):
            return layers.param(rngs, (L, *shape), ("layers", *axes), dtype, init)

        self.attn_norm = p((D,), ("embed",), norm_init)
        self.q = p((D, H, Dh), ("embed", "heads", "head_dim"))
        self.k = p((D, K, Dh), ("embed", "kv_heads", "head_dim"))
        self.v = p((D, K, Dh), ("embed", "kv_heads", "head_dim"))
        self.o = p((H, Dh, D), ("heads", "head_dim", "embed"))
        if config.qkv_bias:
            self.q_bias = p((H, Dh), ("heads", "head_dim"), "zeros")
            self.k_bias = p((K, Dh), ("kv_heads", "head_dim"), "zeros")
            self.v_bias = p((K, Dh), ("kv_heads", "head_dim"), "zeros")
        if config.o_bias:
            self.o_bias = p((D,), ("embed",), "zeros")
        if config.qk_norm:
            self.q_norm = p((Dh,), ("head_dim",), norm_init)
            self.k_norm = p((Dh,), ("head_dim",), norm_init)
        if post_norms:
            self.post_attn_norm = p((D,), ("embed",), norm_init)
            self.post_mlp_norm = p((D,), ("embed",), norm_init)
        self.mlp_norm = p((D,), ("embed",), norm_init)
        self.gate = p((D, F), ("embed", "mlp"))
        self.up = p((D, F), ("embed", "mlp"))
        self.down = p((F, D), ("mlp", "embed"))
        if config.mlp_bias:
            self.gate_bias = p((F,), ("mlp",), "zeros")
            self.up_bias = p((F,), ("mlp",), "zeros")
            self.down_bias = p((D,), ("embed",), "zeros")


def _linear(x: jax.Array, p: dict, name: str, spec: str) -> jax.Array:
    y = jnp.einsum(spec, x, p[name])
    return layers.add_bias(y, p[f"{name}_bias"]) if f"{name}_bias" in p else y


def _per_head(h: jax.Array, p: dict, name: str) -> jax.Array:
    """[B, T, H, Dh]: per-head inputs h [B, T, H, D] projected by their own head's weights p[name] [D, H or K, Dh]
    (a KV head's shared by its H / K query heads)."""
    w = p[name]
    group = h.shape[2] // w.shape[1]
    y = jnp.einsum("bthd,dhk->bthk", h, jnp.repeat(w, group, axis=1))
    bias = p.get(f"{name}_bias")
    return y if bias is None else layers.add_bias(y, jnp.repeat(bias, group, axis=0))


class Llama(GatedLM):
    """Pre-norm layers: x + attention(norm(x)), then x + mlp(norm(x)). Subclasses change `norm` and, with
    `post_norms`, get the parameters of norms around the two outputs."""

    norm_init = "ones"
    post_norms = False

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dtype = layers.dtype_of(config)
        self.config = config
        self.embed_tokens = layers.param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), dtype)
        self.blocks = LlamaBlocks(config, rngs, self.norm_init, self.post_norms)
        self.final_norm = layers.param(rngs, (config.d_model,), ("embed",), dtype, self.norm_init)
        self.lm_head = (None if config.tie_embeddings else
                        layers.param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"), dtype))

    def context(self, attention_mask, position_ids, key_positions=None, windowed: bool = False) -> dict[str, jax.Array]:
        cos, sin = layers.rope_tables(self.config, position_ids, windowed)
        return {**super().context(attention_mask, position_ids, key_positions, windowed), "cos": cos, "sin": sin}

    def norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        return layers.rms_norm(x, weight, self.config.norm_eps)

    def embed(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        return self.embed_tokens[...][input_ids]

    def heads(self, p: dict, hq: jax.Array, hk: jax.Array, hv: jax.Array, context: dict,
              mixer: layers.Mixer) -> jax.Array:
        """Per-head attention outputs [B, T, H, Dh] of the normed inputs of the queries, keys and values: [B, T, D]
        each, or per query head [B, T, H, D] (edges: keys and values then per query head, from its KV head's
        weights)."""
        config = self.config
        if hq.ndim == 3:
            q, k, v = (_linear(h, p, n, "btd,dhk->bthk") for n, h in zip("qkv", (hq, hk, hv)))
        else:
            q, k, v = (_per_head(h, p, n) for n, h in zip("qkv", (hq, hk, hv)))
        if config.qk_norm:
            q, k = self.norm(q, p["q_norm"]), self.norm(k, p["k_norm"])
        q = layers.apply_rope(q, context["cos"], context["sin"])
        k = layers.apply_rope(k, context["cos"], context["sin"])
        return layers.gated_attention(q, k, v, context["bias"], mixer, config.attn_scale, config.attn_logit_softcap)

    def attention(self, p: dict, h: jax.Array, context: dict, mixer: layers.Mixer) -> jax.Array:
        """The attention output [B, T, D] (after the output projection) of normed inputs h [B, T, D]."""
        return _linear(self.heads(p, h, h, h, context, mixer), p, "o", "bthk,hkd->btd")

    def attention_writers(self, p: dict, xq: jax.Array, xk: jax.Array, xv: jax.Array, context: dict,
                          mixer: layers.Mixer) -> tuple[jax.Array, jax.Array]:
        """(each head's output [B, T, H, D] (its share h·W_O[h] + b_O / H), their sum [B, T, D]) from the residual
        streams [B, T, (H,) D] its queries, keys and values read."""
        normed = (self.norm(x, p["attn_norm"]) for x in (xq, xk, xv))
        per_head = jnp.einsum("bthk,hkd->bthd", self.heads(p, *normed, context, mixer), p["o"])
        if "o_bias" in p:
            per_head = layers.add_bias(per_head, p["o_bias"] / self.config.n_heads)
        return per_head, per_head.sum(2)

    def mlp(self, p: dict, h: jax.Array, mixer: layers.Mixer) -> jax.Array:
        """The gated MLP's output [B, T, D] of normed inputs h [B, T, D], with the `mlp_hidden` site."""
        act = layers.activation(self.config.activation)
        hidden = mixer("mlp_hidden", act(_linear(h, p, "gate", "btd,df->btf")) * _linear(h, p, "up", "btd,df->btf"))
        return _linear(hidden, p, "down", "btf,fd->btd")

    def mlp_block(self, p: dict, x: jax.Array, mixer: layers.Mixer) -> jax.Array:
        """What the MLP adds [B, T, D] to the residual stream x [B, T, D]."""
        return mixer("mlp_out", self.mlp(p, self.norm(x, p["mlp_norm"]), mixer))

    def block(self, p: dict, x: jax.Array, context: dict, mixer: layers.Mixer) -> jax.Array:
        x = x + self.attention(p, self.norm(x, p["attn_norm"]), context, mixer)
        return x + self.mlp_block(p, x, mixer)

    def final_norm_of(self, x: jax.Array) -> jax.Array:
        return self.norm(x, self.final_norm[...])
