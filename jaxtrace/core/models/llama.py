"""The Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm). RoPE, RMSNorm, gated MLP, GQA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.core.models import layers
from jaxtrace.core.models.base import GatedLM
from jaxtrace.core.models.config import ModelConfig


class LlamaBlocks(nnx.Module):
    """All layers' parameters, stacked on a leading `layers` axis."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        L, D, H, K = config.n_layers, config.d_model, config.n_heads, config.n_kv_heads
        Dh, F = config.head_dim, config.d_ff
        dtype = layers.dtype_of(config)

        def p(shape, axes, init="normal"):
            return layers.param(rngs, (L, *shape), ("layers", *axes), dtype, init)

        self.attn_norm = p((D,), ("embed",), "ones")
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
            self.q_norm = p((Dh,), ("head_dim",), "ones")
            self.k_norm = p((Dh,), ("head_dim",), "ones")
        self.mlp_norm = p((D,), ("embed",), "ones")
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


class Llama(GatedLM):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dtype = layers.dtype_of(config)
        self.config = config
        self.embed_tokens = layers.param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), dtype)
        self.blocks = LlamaBlocks(config, rngs)
        self.final_norm = layers.param(rngs, (config.d_model,), ("embed",), dtype, "ones")
        self.lm_head = (None if config.tie_embeddings else
                        layers.param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"), dtype))

    def context(self, attention_mask, position_ids, key_positions=None) -> dict[str, jax.Array]:
        cos, sin = layers.rope_tables(self.config, position_ids)
        return {**super().context(attention_mask, position_ids, key_positions), "cos": cos, "sin": sin}

    def embed(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        return self.embed_tokens[...][input_ids]

    def block(self, p: dict, x: jax.Array, context: dict, iv: layers.Intervention) -> jax.Array:
        config = self.config
        eps = config.norm_eps
        h = layers.rms_norm(x, p["attn_norm"], eps)
        q, k, v = (_linear(h, p, n, "btd,dhk->bthk") for n in "qkv")
        if config.qk_norm:
            q, k = layers.rms_norm(q, p["q_norm"], eps), layers.rms_norm(k, p["k_norm"], eps)
        q = layers.apply_rope(q, context["cos"], context["sin"])
        k = layers.apply_rope(k, context["cos"], context["sin"])
        heads = layers.gated_attention(q, k, v, context["bias"], iv)
        x = x + _linear(heads, p, "o", "bthk,hkd->btd")
        h = layers.rms_norm(x, p["mlp_norm"], eps)
        act = layers.activation(config.activation)
        hidden = iv("mlp_hidden", act(_linear(h, p, "gate", "btd,df->btf")) * _linear(h, p, "up", "btd,df->btf"))
        return x + iv("mlp_out", _linear(hidden, p, "down", "btf,fd->btd"))

    def unembed(self, x: jax.Array) -> jax.Array:
        x = layers.rms_norm(x, self.final_norm[...], self.config.norm_eps)
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("...d,dv->...v", x, head, preferred_element_type=jnp.float32)
