"""Model configuration: one frozen dataclass for every family, parsed from Hugging Face `config.json` dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# HF `model_type` -> jaxtrace family (one implementation per family).
FAMILIES: dict[str, str] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "gemma3": "gemma",  # the multimodal wrapper: its text model, under `text_config`
}
DTYPES = ("float32", "bfloat16")
_OPTIONAL_POSITIVE = ("rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap")
_SIZES = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_positions")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only transformer.

    `rope_scaling` is a tuple of (key, value) items so the config stays hashable (a static jit argument).
    `sliding_layers` [L]: which layers attend only to the `sliding_window` latest positions (None: every layer, when
    `sliding_window` is set); `rope_local_theta`: the unscaled RoPE base of those layers (None: `rope_theta` and
    `rope_scaling`, as in the others). Attention scores scale by `query_pre_attn_scalar ** -0.5` (None: head_dim);
    `attn_logit_softcap` / `final_logit_softcap`: c in c * tanh(x / c) on attention scores / output logits.
    """

    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int
    norm_eps: float
    tie_embeddings: bool
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    dtype: str = "float32"

    def __post_init__(self):
        bad = [name for name in _SIZES if type(getattr(self, name)) is not int or getattr(self, name) < 1]
        if bad:
            raise ValueError("model sizes must be positive integers: " +
                             ", ".join(f"{name}={getattr(self, name)!r}" for name in bad))
        for name in ("norm_eps", "rope_theta", *_OPTIONAL_POSITIVE):
            value = getattr(self, name)
            if name in _OPTIONAL_POSITIVE and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.sliding_layers is not None:
            if self.sliding_window is None:
                raise ValueError("sliding_layers needs a sliding_window")
            if (not isinstance(self.sliding_layers, tuple) or len(self.sliding_layers) != self.n_layers
                    or any(type(flag) is not bool for flag in self.sliding_layers)):
                raise ValueError(f"sliding_layers must be a tuple of {self.n_layers} booleans (one per layer), "
                                 f"got {self.sliding_layers!r}")
        if self.model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        from jaxtrace.core.models.layers import ACTIVATIONS  # layers imports this module

        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported activation {self.activation!r}; supported: "
                                        f"{', '.join(ACTIVATIONS)}")

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def windowed_layers(self) -> tuple[bool, ...]:
        """[L] whether each layer attends within `sliding_window`."""
        if self.sliding_window is None:
            return (False,) * self.n_layers
        return self.sliding_layers or (True,) * self.n_layers

    @property
    def attn_scale(self) -> float:
        """The factor of attention scores q . k."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def n_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = (2 if self.family == "gpt2" else 3) * self.d_model * self.d_ff
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        if self.family == "gpt2":
            embed += self.max_positions * self.d_model
        return self.n_layers * (attn + mlp) + embed

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, record) -> ModelConfig:
        """The config `dataclasses.asdict` recorded (e.g. in circuit.json), checked."""
        if not isinstance(record, dict):
            raise ValueError("model_config must be an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - set(fields))
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in record]
        if missing:
            raise ValueError(f"model_config is missing {missing}")
        if unknown:
            raise ValueError(f"model_config has unknown keys {unknown}")
        record = dict(record)
        if record.get("rope_scaling") is not None:
            record["rope_scaling"] = tuple(tuple(item) for item in record["rope_scaling"])
        if isinstance(record.get("sliding_layers"), list):
            record["sliding_layers"] = tuple(record["sliding_layers"])
        return cls(**record)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32") -> ModelConfig:
        """Parse a transformers 4 or 5 `config.json` dict. A missing key, a value of the wrong type and inconsistent
        sizes are ValueErrors naming the `config.json` key."""
        if not isinstance(hf, Mapping):
            raise ValueError(f"expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            archs = hf.get("architectures") or []
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} {archs}; supported: {', '.join(sorted(FAMILIES))}"
            )
        if model_type == "gpt2":
            return _gpt2_from_hf(hf, dtype)
        if FAMILIES[model_type] == "gemma":
            return _gemma_from_hf(hf, model_type, dtype)
        return _llama_from_hf(hf, model_type, dtype)


_MISSING = object()


def _int(hf: Mapping[str, Any], key: str, default: Any = _MISSING) -> int:
    """A positive integer from the config (`default` when the key is absent or null)."""
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"missing key {key!r}")
        return default
    if type(value) is not int or value < 1:
        raise ValueError(f"{key!r} must be a positive integer, got {value!r}")
    return value


def _number(hf: Mapping[str, Any], key: str, default: float) -> float:
    """A positive finite number from the config (`default` when the key is absent or null)."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{key!r} must be a positive number, got {value!r}")
    return float(value)


def _of_type(hf: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ValueError(f"{key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _gpt2_from_hf(hf: Mapping[str, Any], dtype: str) -> ModelConfig:
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(option):
            raise UnsupportedModelError(f"GPT-2 option {option}=true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise UnsupportedModelError("GPT-2 option scale_attn_weights=false is not supported")
    d_model, n_heads = _int(hf, "n_embd"), _int(hf, "n_head")
    if d_model % n_heads:
        raise ValueError(f"n_embd={d_model} is not divisible by n_head={n_heads}")
    return ModelConfig(
        model_type="gpt2",
        vocab_size=_int(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_int(hf, "n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=_int(hf, "n_inner", 4 * d_model),
        max_positions=_int(hf, "n_positions"),
        norm_eps=_number(hf, "layer_norm_epsilon", 1e-5),
        tie_embeddings=_of_type(hf, "tie_word_embeddings", bool, True),
        activation=_of_type(hf, "activation_function", str, "gelu_new"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        dtype=dtype,
    )


def _rope_from_hf(hf: Mapping[str, Any], params: Mapping[str, Any] | None = None,
                  default_theta: float = 10000.0) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, scaling items) from `params` (default: `rope_parameters`, transformers 5) or `rope_theta`/`rope_scaling`
    (4)."""
    params = dict(_of_type(hf, "rope_parameters", dict, {}) if params is None else params)
    theta = _number(params, "rope_theta", _number(hf, "rope_theta", default_theta))
    params.pop("rope_theta", None)
    scaling = params or dict(_of_type(hf, "rope_scaling", dict, {}))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ("llama3", "linear"):
        raise UnsupportedModelError(f"rope scaling {rope_type!r} is not supported (supported: default, linear, llama3)")
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return float(theta), tuple(sorted(scaling.items()))


def _llama_from_hf(hf: Mapping[str, Any], model_type: str, dtype: str) -> ModelConfig:
    d_model, n_heads = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    n_kv_heads = _int(hf, "num_key_value_heads", n_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}")
    head_dim = _int(hf, "head_dim", None)
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"hidden_size={d_model} is not divisible by num_attention_heads={n_heads} (and there "
                             "is no head_dim)")
        head_dim = d_model // n_heads
    theta, scaling = _rope_from_hf(hf)
    attention_bias = _of_type(hf, "attention_bias", bool, False)
    if model_type == "mistral":
        sliding_window = _int(hf, "sliding_window", None)
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen2 use_sliding_window=true is not supported")
    else:
        sliding_window = None
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModelError(f"layer_types {sorted(layer_types)} are not supported (only full_attention)")
    return ModelConfig(
        model_type=model_type,
        vocab_size=_int(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_int(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=_int(hf, "intermediate_size"),
        max_positions=_int(hf, "max_position_embeddings", 2048),
        norm_eps=_number(hf, "rms_norm_eps", 1e-6),
        tie_embeddings=_of_type(hf, "tie_word_embeddings", bool, False),
        activation=_of_type(hf, "hidden_act", str, "silu"),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=_of_type(hf, "mlp_bias", bool, False),
        qk_norm=model_type == "qwen3",
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=sliding_window,
        dtype=dtype,
    )


def _gemma_from_hf(hf: Mapping[str, Any], model_type: str, dtype: str) -> ModelConfig:
    """Gemma 2 and Gemma 3 (`gemma3_text`, or `gemma3` with its text model under `text_config`)."""
    top = hf
    if model_type == "gemma3":
        hf = hf.get("text_config") or {}
        if not isinstance(hf, Mapping) or "hidden_size" not in hf:
            raise UnsupportedModelError("gemma3 config: text_config with the text model's sizes is missing")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{model_type} option use_bidirectional_attention=true is not supported")
    n_layers = hf["num_hidden_layers"]
    gemma3 = model_type != "gemma2"
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers' default: every `sliding_window_pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern", 6) if gemma3 else 2
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if len(layer_types) != n_layers or unknown:
        raise UnsupportedModelError(f"{model_type} layer_types must list full_attention or sliding_attention for "
                                    f"each of the {n_layers} layers, got {layer_types}")
    sliding = tuple(kind == "sliding_attention" for kind in layer_types)
    window = hf.get("sliding_window") if any(sliding) else None
    rope_local_theta = None
    params = hf.get("rope_parameters") or {}
    if gemma3:  # one set of rope parameters per layer type (transformers 5), or rope_theta + rope_local_base_freq
        nested = "full_attention" in params or "sliding_attention" in params
        theta, scaling = _rope_from_hf(hf, params.get("full_attention") if nested else None, 1_000_000.0)
        local = dict(params.get("sliding_attention") or {}) if nested else {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"gemma3 sliding-layer rope scaling {local['rope_type']!r} is not supported")
        rope_local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
    else:
        theta, scaling = _rope_from_hf(hf)
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    attention_bias = hf.get("attention_bias", False)
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 8192),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=top.get("tie_word_embeddings", True),
        activation=hf.get("hidden_activation") or "gelu_pytorch_tanh",
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=gemma3,
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        sliding_layers=sliding if window is not None else None,
        rope_local_theta=rope_local_theta if window is not None else None,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        # as transformers: Gemma 3's attention ignores attn_logit_softcapping, and the multimodal
        # Gemma3ForConditionalGeneration final_logit_softcapping
        attn_logit_softcap=None if gemma3 else hf.get("attn_logit_softcapping", 50.0),
        final_logit_softcap=None if model_type == "gemma3" else hf.get("final_logit_softcapping",
                                                                           30.0 if model_type == "gemma2" else None),
        dtype=dtype,
    )
