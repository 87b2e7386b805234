"""Building blocks shared by the model families: norms, RoPE, masks, gated attention and the per-layer mixer."""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.core.intervention import Capture
from jaxtrace.core.models.config import ModelConfig
from jaxtrace.core.sites import REGISTRY

F32 = jnp.float32
NEG_INF = float(jnp.finfo(F32).min)

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype, init: str = "normal") -> nnx.Param:
    """A parameter carrying logical axis names (`out_sharding`) for later mesh sharding."""
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, F32)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, F32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


def trailing(v: jax.Array, like: jax.Array) -> jax.Array:
    """`v` (a bias or scale over the trailing axes of `like`) with leading unit axes, to broadcast explicitly."""
    return v.reshape((1,) * (like.ndim - v.ndim) + v.shape)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + trailing(bias, y)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32."""
    x32 = x.astype(F32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    scale, bias = trailing(scale, x).astype(F32), trailing(bias, x).astype(F32)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis as in HF Llama: normalise in float32, cast back, then scale."""
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return trailing(scale, x) * normed.astype(x.dtype)


def offset_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm as in HF: normalise and scale by (1 + weight), all in float32, then cast back."""
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (normed * (1.0 + trailing(weight, x).astype(F32))).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (x itself when cap is None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


VOCAB_CHUNK = 1024  # output-head rows a step of `log_normaliser` multiplies: the fastest on CPU (benchmarks/MASKS.md)


def output_logits(x: jax.Array, head: jax.Array, cap: float | None) -> jax.Array:
    """Logits [..., V] (float32) softcap(x @ headᵀ, cap) of final-normed hidden states x [..., D] and an output head
    [V, D]."""
    return softcap(jnp.einsum("...d,vd->...v", x, head, preferred_element_type=F32), cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def log_normaliser(x: jax.Array, head: jax.Array, cap: float | None, chunk: int = VOCAB_CHUNK) -> jax.Array:
    """[Q] logsumexp over the vocabulary of `output_logits(x [Q, D], head [V, D], cap)`, computed `chunk` head rows
    at a time with a running maximum and sum: the [Q, V] logits are never held whole, and the normaliser reads each
    chunk while it is in cache (on CPU the logits' matmul and logsumexp together 38 % faster). Differentiated as
    the whole logits' logsumexp, whose backward is the faster one."""
    n_vocab = head.shape[0]
    chunk = min(chunk, n_vocab)

    def step(i, carry):
        high, total = carry
        start = jnp.minimum(i * chunk, n_vocab - chunk)  # the last chunk ends at V: rows the one before read are
        logits = output_logits(x, jax.lax.dynamic_slice_in_dim(head, start, chunk), cap)  # masked out
        logits = jnp.where(start + jnp.arange(chunk) >= i * chunk, logits, -jnp.inf)
        new_high = jnp.maximum(high, logits.max(-1))
        return new_high, total * jnp.exp(high - new_high) + jnp.exp(logits - new_high[..., None]).sum(-1)

    start = (jnp.full(x.shape[:-1], -jnp.inf, F32), jnp.zeros(x.shape[:-1], F32))
    high, total = jax.lax.fori_loop(0, -(-n_vocab // chunk), step, start)
    return high + jnp.log(total)


def _log_normaliser_forward(x, head, cap, chunk):
    return jax.vjp(lambda x, head: jax.nn.logsumexp(output_logits(x, head, cap), axis=-1), x, head)


def _log_normaliser_backward(cap, chunk, pullback, cotangent):
    return pullback(cotangent)


log_normaliser.defvjp(_log_normaliser_forward, _log_normaliser_backward)


def rope_inverse_frequencies(config: ModelConfig, windowed: bool = False) -> jax.Array:
    """[head_dim / 2] inverse frequencies, with `linear` or `llama3` scaling; in a sliding-window layer of a config
    with `rope_local_theta`, that base unscaled."""
    dim = config.head_dim
    local = windowed and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=F32) / dim))
    scaling = {} if local else dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, position_ids: jax.Array, windowed: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, 1, head_dim] for positions [B, T] (of a sliding-window layer if `windowed`)."""
    angles = position_ids[..., None].astype(F32) * rope_inverse_frequencies(config, windowed)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's rotate-half RoPE on x [B, T, H, Dh]."""
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(F32) * cos + rotated * sin).astype(x.dtype)


def attention_bias(attention_mask: jax.Array | None, position_ids: jax.Array, sliding_window: int | None,
                   key_positions: jax.Array | None = None) -> jax.Array:
    """Additive mask [B, 1, T, S] from a padding mask [B, T] (causal, padded keys excluded) or an explicit
    visibility mask [B, T, S] (packed sequences, whose S keys may start with memory slots); a sliding window applies
    to query position ids [B, T] and key positions [B, S] (default: the query positions)."""
    batch, length = position_ids.shape
    if attention_mask is not None and jnp.ndim(attention_mask) == 3:
        allowed = jnp.asarray(attention_mask, bool)
    else:
        allowed = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
        if attention_mask is not None:
            allowed &= jnp.asarray(attention_mask, bool)[:, None, :]
    if sliding_window is not None:
        key_positions = position_ids if key_positions is None else key_positions
        allowed &= position_ids[:, :, None] - key_positions[:, None, :] < sliding_window
    return jnp.where(allowed, 0.0, NEG_INF).astype(F32)[:, None]


class Mixer:
    """One layer's view of the intervention inside the layer scan: its gates {site: [C]} and sources, the position
    weight [B, T], the capture request, the layer's memory (keys and values [B, E, K, Dh] of cached tokens that
    every query may attend to before its own row) and whether attention is fused. `mixer(site, value)` mixes where
    gated and records where captured (`captured`: {site: value} of this layer)."""

    def __init__(self, gates: Mapping[str, jax.Array], source: Mapping[str, jax.Array], where: jax.Array,
                 capture: Capture, memory: Mapping[str, jax.Array] | None = None, fused: bool = False):
        self.gates, self.source, self.where, self.capture = gates, source, where, capture
        self.memory, self.fused = memory, fused
        self.captured: dict[str, jax.Array] = {}

    def __call__(self, site: str, live: jax.Array, source: jax.Array | None = None) -> jax.Array:
        """Mix `live + w * (source - live)` where gated, w the site's weight of its gates (`Site.weight`; in
        float32, whatever the activations' dtype; `source`: the site's cached one unless given); record the (mixed)
        value where captured."""
        if site in self.gates:
            weight = REGISTRY[site].weight(self.gates[site].astype(F32), self.where)
            live32 = live.astype(F32)
            source = self.source[site] if source is None else source
            live = (live32 + weight * (source.astype(F32) - live32)).astype(live.dtype)
        if site in self.capture:
            self.captured[site] = live
        return live


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float,
           logit_softcap: float | None = None, fused: bool = False, mixer: Mixer | None = None) -> jax.Array:
    """Grouped-query attention outputs [B, T, H, Dh] of q [B, T, H, Dh] over k, v [B, S, K, Dh] with an additive
    bias [B, 1, T, S]: query head h reads KV head h // (H / K); scores are `softcap(scale * q . k, logit_softcap)`.

    `fused`: through `jax.nn.dot_product_attention` (XLA; cuDNN's fused kernels on GPU where they apply), unless
    soft-capping needs the explicit scores. Otherwise the pattern is explicit and goes through `mixer`'s
    `attn_pattern` site.
    """
    batch, length, n_heads, head_dim = q.shape
    if fused and logit_softcap is None:
        floor = jnp.finfo(q.dtype).min / 2  # masked keys stay finite in the query's dtype
        return jax.nn.dot_product_attention(q, k, v.astype(q.dtype), bias=jnp.maximum(bias, floor).astype(q.dtype),
                                            scale=scale)
    n_keys, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    qg = q.reshape(batch, length, n_kv, group, head_dim)
    scores = softcap(jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=F32) * scale, logit_softcap)
    probs = jax.nn.softmax(scores.reshape(batch, n_heads, length, n_keys) + bias, axis=-1)
    if mixer is not None:
        probs = mixer("attn_pattern", probs)
    probs = probs.reshape(batch, n_kv, group, length, n_keys).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, n_heads, head_dim)


def gated_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mixer: Mixer,
                    scale: float | None = None, logit_softcap: float | None = None) -> jax.Array:
    """Grouped-query attention with the `attn_pattern` (explicit and fused) and `head_out` sites.

    q: [B, T, H, Dh]; k, v: [B, T, K, Dh] (after RoPE; captured at the `attn_keys`, `attn_values` sites, and q with
    k at `attn_pattern_qk` as [B, T, H + K, Dh]; K = H through edges, where each query head has its own keys and
    values); bias: [B, 1, T, E + T], keys being the intervention's E memory tokens (their K heads repeated to k's),
    then the T live ones. Scale default Dh ** -0.5. Returns the per-head outputs [B, T, H, Dh].

    The fused form mixes attention(q, k, v) with attention(q_cf, k_cf, v), the counterfactual's queries and keys
    over the live values (the memory's keys are shared: no gate changes a shared prefix).
    """
    n_heads, head_dim = q.shape[2], q.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    k, v = mixer("attn_keys", k), mixer("attn_values", v)
    if "attn_pattern_qk" in mixer.capture:
        mixer.captured["attn_pattern_qk"] = jnp.concatenate([q, k], axis=2)

    def with_memory(keys_or_values: jax.Array, name: str) -> jax.Array:
        if mixer.memory is None:
            return keys_or_values
        memory = mixer.memory[name].astype(keys_or_values.dtype)  # [B, E, K, Dh]; per query head under edges
        memory = jnp.repeat(memory, keys_or_values.shape[2] // memory.shape[2], axis=2)
        return jnp.concatenate([memory, keys_or_values], axis=1)

    values = with_memory(v, "values")
    out = attend(q, with_memory(k, "keys"), values, bias, scale, logit_softcap, mixer.fused, mixer)
    if "attn_pattern_qk" in mixer.gates:
        source = mixer.source["attn_pattern_qk"].astype(q.dtype)
        q_cf, k_cf = source[:, :, :n_heads], source[:, :, n_heads:]
        out_cf = attend(q_cf, with_memory(k_cf, "keys"), values, bias, scale, logit_softcap, mixer.fused)
        out = mixer("attn_pattern_qk", out, out_cf)
    return mixer("head_out", out)


def dtype_of(config: ModelConfig) -> Any:
    return jnp.dtype(config.dtype)
