"""Hugging Face state dicts (HF names and layouts) -> jaxtrace parameters (stacked layers, head axes split)."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrace.core.models import MODEL_CLASSES, GatedLM, ModelConfig


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor is missing or its shape disagrees with the config."""


class NonFiniteWeightsError(ValueError):
    """A checkpoint tensor holds NaN or infinite values (every effect computed with it would be NaN)."""


# Where a checkpoint keeps its decoder (the first prefix whose embedding it has) and its untied output head: text
# models, then transformers 5's and older multimodal ones (Gemma3ForConditionalGeneration; their vision tower and
# projector tensors are never read).
_TEXT_PREFIXES = ("transformer.", "model.", "model.language_model.", "language_model.model.")
_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


class _Reader:
    """Fetches HF tensors by name, checking their shapes against what the config implies."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], embedding: str):
        """Names lose the text model's prefix (the first of `_TEXT_PREFIXES` under which the state dict has the
        `embedding` tensor); the output head is `lm_head.weight`."""
        prefix = next((p for p in _TEXT_PREFIXES if p + embedding in state_dict), "")
        self.state_dict = state_dict
        self.names = {k.removeprefix(prefix): k for k in state_dict if k not in _HEAD_NAMES}  # short -> stored name
        self.names.update({"lm_head.weight": k for k in _HEAD_NAMES if k in state_dict})

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.names:
            raise CheckpointMismatchError(f"checkpoint has no tensor {name!r}")
        value = np.asarray(self.state_dict[self.names[name]])
        if value.shape != shape:
            raise CheckpointMismatchError(
                f"tensor {name!r} has shape {value.shape} but the config implies {shape}")
        if not np.isfinite(value).all():
            bad = np.count_nonzero(~np.isfinite(value))
            raise NonFiniteWeightsError(f"tensor {self.names[name]!r} is not finite: {bad:,} of its {value.size:,} "
                                        "values are NaN or infinite")
        return value


def _stack(config: ModelConfig, per_layer: Callable[[int], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    layers = [per_layer(i) for i in range(config.n_layers)]
    return {name: np.stack([layer[name] for layer in layers]) for name in layers[0]}


def _gpt2_params(config: ModelConfig, get: _Reader) -> dict:
    D, H, Dh, F, V = config.d_model, config.n_heads, config.head_dim, config.d_ff, config.vocab_size

    def layer(i: int) -> dict[str, np.ndarray]:
        n = f"h.{i}."
        qkv = get(n + "attn.c_attn.weight", (D, 3 * D))
        qkv_bias = get(n + "attn.c_attn.bias", (3 * D,))
        out = {
            "attn_norm": get(n + "ln_1.weight", (D,)), "attn_norm_bias": get(n + "ln_1.bias", (D,)),
            "o": get(n + "attn.c_proj.weight", (D, D)).reshape(H, Dh, D), "o_bias": get(n + "attn.c_proj.bias", (D,)),
            "mlp_norm": get(n + "ln_2.weight", (D,)), "mlp_norm_bias": get(n + "ln_2.bias", (D,)),
            "up": get(n + "mlp.c_fc.weight", (D, F)), "up_bias": get(n + "mlp.c_fc.bias", (F,)),
            "down": get(n + "mlp.c_proj.weight", (F, D)), "down_bias": get(n + "mlp.c_proj.bias", (D,)),
        }
        for j, name in enumerate("qkv"):
            out[name] = qkv[:, j * D:(j + 1) * D].reshape(D, H, Dh)
            out[f"{name}_bias"] = qkv_bias[j * D:(j + 1) * D].reshape(H, Dh)
        return out

    params = {
        "embed_tokens": get("wte.weight", (V, D)), "embed_positions": get("wpe.weight", (config.max_positions, D)),
        "blocks": _stack(config, layer),
        "final_norm": get("ln_f.weight", (D,)), "final_norm_bias": get("ln_f.bias", (D,)),
    }
    if not config.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (V, D)).T
    return params


def _llama_params(config: ModelConfig, get: _Reader) -> dict:
    """Llama and Gemma families (Gemma's four norms a layer: input, post-attention, pre- and post-feedforward)."""
    D, H, K, Dh, F, V = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff,
                          config.vocab_size)

    def layer(i: int) -> dict[str, np.ndarray]:
        n = f"layers.{i}."
        out = {
            "attn_norm": get(n + "input_layernorm.weight", (D,)),
            "o": get(n + "self_attn.o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D),
        }
        if config.family == "gemma":
            out["post_attn_norm"] = get(n + "post_attention_layernorm.weight", (D,))
            out["mlp_norm"] = get(n + "pre_feedforward_layernorm.weight", (D,))
            out["post_mlp_norm"] = get(n + "post_feedforward_layernorm.weight", (D,))
        else:
            out["mlp_norm"] = get(n + "post_attention_layernorm.weight", (D,))
        for name, heads in (("q", H), ("k", K), ("v", K)):
            out[name] = get(n + f"self_attn.{name}_proj.weight", (heads * Dh, D)).T.reshape(D, heads, Dh)
            if config.qkv_bias:
                out[f"{name}_bias"] = get(n + f"self_attn.{name}_proj.bias", (heads * Dh,)).reshape(heads, Dh)
        if config.o_bias:
            out["o_bias"] = get(n + "self_attn.o_proj.bias", (D,))
        if config.qk_norm:
            out["q_norm"] = get(n + "self_attn.q_norm.weight", (Dh,))
            out["k_norm"] = get(n + "self_attn.k_norm.weight", (Dh,))
        for name, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
            out[name] = get(n + f"mlp.{name}_proj.weight", shape).T
            if config.mlp_bias:
                out[f"{name}_bias"] = get(n + f"mlp.{name}_proj.bias", shape[:1])
        return out

    params = {
        "embed_tokens": get("embed_tokens.weight", (V, D)),
        "blocks": _stack(config, layer),
        "final_norm": get("norm.weight", (D,)),
    }
    if not config.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (V, D)).T
    return params


def model_from_state_dict(config: ModelConfig, state_dict: Mapping[str, np.ndarray]) -> GatedLM:
    """Build a model of `config` holding the weights of an HF-named state dict (cast to `config.dtype`)."""
    if config.family == "gpt2":
        params = _gpt2_params(config, _Reader(state_dict, "wte.weight"))
    else:
        params = _llama_params(config, _Reader(state_dict, "embed_tokens.weight"))
    abstract = nnx.eval_shape(lambda: MODEL_CLASSES[config.family](config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, config.dtype), params))
    return nnx.merge(graphdef, state)

