"""The Gemma family: Gemma 2 and Gemma 3 (text). Llama's layers with (1 + weight) RMSNorms, norms around the
attention and MLP outputs too, embeddings scaled by sqrt(D), GeGLU, and from the config: local (sliding-window) and
global layers, Gemma 3's q/k norms and local RoPE base, `query_pre_attn_scalar`, Gemma 2's logit soft-capping."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtrace.core.models import layers
from jaxtrace.core.models.llama import Llama


class Gemma(Llama):
    """x + post_attn_norm(attention(attn_norm(x))), then x + post_mlp_norm(mlp(mlp_norm(x))).

    The `mlp_out` site is the MLP's output before its post norm (HF's `mlp` module output), a matmul result, so that
    zero gates leave the forward bit for bit unchanged: a norm's output added to the residual at once can compile to
    fused multiply-adds when ungated and not when gated.
    """

    norm_init = "zeros"  # (1 + weight)
    post_norms = True

    def norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        return layers.offset_rms_norm(x, weight, self.config.norm_eps)

    def embed(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        table = self.embed_tokens[...]
        # HF keeps sqrt(D) as a float32 tensor cast to the embedding dtype (sqrt(2304) = 55.5 in bfloat16)
        return table[input_ids] * jnp.asarray(jnp.float32(self.config.d_model ** 0.5), table.dtype)

    def attention_writers(self, p: dict, xq: jax.Array, xk: jax.Array, xv: jax.Array, context: dict,
                          mixer: layers.Mixer) -> tuple[jax.Array, jax.Array]:
        """(each head's share [B, T, H, D] of the post-normed attention output: its output times the norm's scale in
        this forward, the post-normed output [B, T, D])."""
        per_head, out = super().attention_writers(p, xq, xk, xv, context, mixer)
        out32 = out.astype(jnp.float32)
        scale = jax.lax.rsqrt(jnp.square(out32).mean(-1, keepdims=True) + self.config.norm_eps)  # [B, T, 1]
        scale = scale * (1.0 + layers.trailing(p["post_attn_norm"], out).astype(jnp.float32))  # [B, T, D]
        return (per_head.astype(jnp.float32) * scale[:, :, None]).astype(out.dtype), self.norm(out, p["post_attn_norm"])

    def mlp_block(self, p: dict, x: jax.Array, mixer: layers.Mixer) -> jax.Array:
        return self.norm(mixer("mlp_out", self.mlp(p, self.norm(x, p["mlp_norm"]), mixer)), p["post_mlp_norm"])

    def block(self, p: dict, x: jax.Array, context: dict, mixer: layers.Mixer) -> jax.Array:
        x = x + self.norm(self.attention(p, self.norm(x, p["attn_norm"]), context, mixer), p["post_attn_norm"])
        return x + self.mlp_block(p, x, mixer)
