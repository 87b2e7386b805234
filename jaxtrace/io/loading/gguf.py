"""GGUF (llama.cpp) checkpoints -> Hugging Face-style (config dict, float32 state dict with HF names and layouts).

The result feeds the same converter as an HF folder. Tensors are dequantized with `gguf.quants.dequantize`
(F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants, the IQ types, ...). llama.cpp's conversion is undone:
GGUF's reversed dimension order, the q/k row permutation of the `llama` architecture, the transposed GPT-2
Conv1D weights, llama3 rope scaling baked into a `rope_freqs` tensor, and the 1 added to Gemma's norm weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from jaxtrace.core.errors import first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# GGUF tensor name (without `.weight`/`.bias`) -> HF name; `blk.{i}.*` entries are relative to the HF layer prefix.
_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_NAMES = {
    **_LLAMA_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp's layer pattern: Gemma 3 has every 6th layer global, Gemma 2 every other one (layer 0 local).
_GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3": 6}
_GPT2_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
# llama.cpp stores GPT-2's Conv1D weights ([in, out] in HF) transposed, as [out, in].
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_ROPE_FREQS = "rope_freqs.weight"


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (hf_config, state_dict) of a GGUF checkpoint, dequantized to float32 numpy arrays with HF names/layouts.

    Llama-family shapes: `model.embed_tokens.weight` [V, D], `...self_attn.q_proj.weight` [H*Dh, D], `k/v_proj`
    [KV*Dh, D], `o_proj` [D, H*Dh], `mlp.{gate,up}_proj` [F, D], `down_proj` [D, F]; `lm_head.weight` [V, D] only
    when the file has an `output.weight` (otherwise `tie_word_embeddings` is true). GPT-2: `transformer.wte` [V, D],
    `wpe` [P, D], Conv1D weights [in, out] (`attn.c_attn.weight` [D, 3D]).
    Raises FileNotFoundError, or ValueError for a non-GGUF file, an unsupported architecture or tensor type.
    """
    path, reader, tensors, arch, config = _open(path)
    gemma = arch in _GEMMA_GLOBAL_EVERY
    names = _GPT2_NAMES if arch == "gpt2" else _GEMMA_NAMES if gemma else _LLAMA_NAMES
    layer_prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    state_dict = {}
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:  # already folded into config["rope_scaling"]
            continue
        parts = name.split(".")
        module, suffix = parts[-2], parts[-1]
        if module not in names or suffix not in ("weight", "bias") or len(parts) not in (2, 4):
            raise ValueError(f"{path}: tensor {name!r} has no Hugging Face counterpart for architecture {arch!r}")
        layer = "" if len(parts) == 2 else f"{layer_prefix}.{parts[1]}."
        hf_name = f"{layer}{names[module]}.{suffix}"
        value = _dequantize(tensor, path)
        if arch == "llama" and module == "attn_q":
            value = _unpermute_rope_rows(value, config["num_attention_heads"])
        elif arch == "llama" and module == "attn_k":
            value = _unpermute_rope_rows(value, config["num_key_value_heads"])
        elif arch == "gpt2" and module in _GPT2_CONV1D and suffix == "weight":
            value = np.ascontiguousarray(value.T)
        elif gemma and module.endswith("norm"):  # llama.cpp stores Gemma's (1 + weight) norms as 1 + weight
            value = value - np.float32(1)
        state_dict[hf_name] = value
    return config, state_dict


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The HF config dict of a GGUF checkpoint from its metadata and tensor shapes alone (no weight is read, except
    the small `rope_freqs` vector that holds a llama3 rope scaling)."""
    return _open(path)[4]


def _open(path: str | os.PathLike) -> tuple[str, gguf.GGUFReader, dict[str, gguf.ReaderTensor], str, dict]:
    """(path, reader, tensors by name, GGUF architecture, HF config dict) of a GGUF file, its architecture checked."""
    reader = open_gguf(path)
    path = str(Path(path).expanduser())
    arch = _get(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    if arch == "gpt2":
        config = _gpt2_config(reader, tensors, path)
    elif arch in _GEMMA_GLOBAL_EVERY:
        config = _gemma_config(reader, arch, tensors, path)
    else:
        config = _llama_config(reader, arch, tensors, path)
    return path, reader, tensors, arch, config


def gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer stored in the GGUF file's metadata (`tokenizer.ggml.*`), as transformers' own GGUF tokenizer
    conversion builds it, without torch or network (`jaxtrace.io.loading.gguf_tokenizer`; byte-level BPE `gpt2` and
    sentencepiece-style `llama` vocabularies).

    Raises FileNotFoundError, or ValueError for a non-GGUF file, an unsupported tokenizer model or missing metadata.
    """
    from jaxtrace.io.loading.gguf_tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(path)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A reader of the GGUF file at `path`, after checking that it exists and starts with the GGUF magic; a file the
    reader cannot parse (cut short, or damaged) is a ValueError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, EOFError) as error:
        raise ValueError(f"{path} is truncated or damaged ({size:,} bytes; the GGUF reader failed: "
                         f"{first_line(error)[:200]})") from None
    _check_tensor_bytes(reader, path, size)
    return reader


def _check_tensor_bytes(reader: gguf.GGUFReader, path: Path, size: int) -> None:
    """Every tensor's data lies inside the file (a file cut at a tensor boundary still parses)."""
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path} is truncated ({size:,} bytes; tensor {tensor.name!r} ends at byte "
                             f"{tensor.data_offset + tensor.n_bytes:,})")


def _get(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value (scalar, string or list), or `default` when the key is absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _required(reader: gguf.GGUFReader, key: str, path: str) -> Any:
    """A metadata value that must be present."""
    value = _get(reader, key)
    if value is None:
        raise ValueError(f"{path}: missing GGUF metadata key {key!r}")
    return value


def _dequantize(tensor: gguf.ReaderTensor, path: str) -> np.ndarray:
    """The tensor as a new float32 array in HF (row-major) dimension order: GGUF's `shape` reversed."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has unsupported GGUF type {tensor.tensor_type.name}") from None
    return np.array(values, dtype=np.float32).reshape(_shape(tensor))


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation of a [n_heads * Dh, ...] weight or bias (interleaved -> rotate_half halves).

    Same as transformers' `LlamaTensorProcessor._reverse_permute_weights`.
    """
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _token_ids(reader: gguf.GGUFReader) -> dict[str, int]:
    """bos/eos/pad token ids the file states, under their HF config names."""
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    return {hf: int(v) for hf, key in keys.items() if (v := _get(reader, f"tokenizer.ggml.{key}")) is not None}


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """HF (row-major) shape of a GGUF tensor."""
    return tuple(int(n) for n in reversed(tensor.shape))


def _llama_config(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor], path: str) -> dict:
    """HF config dict for the `llama` (Llama, Mistral, SmolLM, ...), `qwen2` and `qwen3` architectures."""
    key = lambda name, default=None: _get(reader, f"{arch}.{name}", default)  # noqa: E731
    hidden = int(_required(reader, f"{arch}.embedding_length", path))
    n_heads = int(_required(reader, f"{arch}.attention.head_count", path))
    n_kv_heads = int(key("attention.head_count_kv", n_heads))
    head_dim = int(key("attention.key_length", _shape(tensors["blk.0.attn_q.weight"])[0] // n_heads))
    theta = float(key("rope.freq_base", 10000.0))
    scaling = _rope_scaling(reader, arch, tensors, theta, head_dim, path)
    config = {
        "model_type": arch,
        "architectures": [_HF_ARCHITECTURES[arch]],
        "vocab_size": _shape(tensors["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": int(_required(reader, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_required(reader, f"{arch}.block_count", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})},
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        **_token_ids(reader),
    }
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _gemma_config(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor], path: str) -> dict:
    """HF config dict for `gemma2` and `gemma3` (as `gemma3_text`, the text model transformers loads from GGUF).

    As in transformers' GGUF loading, `query_pre_attn_scalar` is its default 256 (the files do not state it; right
    for every size but the 27B ones) and Gemma 3's sliding layers have RoPE base 10000 (llama.cpp's too). As in
    llama.cpp, a `{arch}.rope.scaling.*` (Gemma 3 4B and up) scales the global layers' RoPE and the soft-capping
    values are the file's (transformers reads neither: it uses its defaults, as here when the file has none).
    """
    config = _llama_config(reader, arch, tensors, path)
    del config["rope_theta"], config["hidden_act"], config["mlp_bias"]
    config.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256)
    n_layers, every = config["num_hidden_layers"], _GEMMA_GLOBAL_EVERY[arch]
    config["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]
    config["sliding_window"] = int(_required(reader, f"{arch}.attention.sliding_window", path))
    if arch == "gemma2":
        config["attn_logit_softcapping"] = float(_get(reader, "gemma2.attn_logit_softcapping", 50.0))
        config["final_logit_softcapping"] = float(_get(reader, "gemma2.final_logit_softcapping", 30.0))
        return config
    global_rope = config["rope_parameters"]
    config.update(model_type="gemma3_text", rope_parameters={
        "full_attention": global_rope, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    config.pop("rope_scaling", None)
    return config


def _rope_scaling(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor], theta: float,
                  head_dim: int, path: str) -> dict | None:
    """HF rope scaling parameters: llama3 from a `rope_freqs` tensor, linear from `{arch}.rope.scaling.*` keys."""
    if _ROPE_FREQS in tensors:
        return _llama3_scaling(_dequantize(tensors[_ROPE_FREQS], path), theta, head_dim, path)
    kind = _get(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_required(reader, f"{arch}.rope.scaling.factor", path))}
    raise ValueError(f"{path}: unsupported rope scaling type {kind!r} (supported: linear, llama3)")


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: float) -> np.ndarray:
    """llama.cpp's `rope_freqs` [head_dim / 2]: the divisor of each rope frequency under llama3 scaling."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, path: str) -> dict | None:
    """HF llama3 rope parameters reproducing llama.cpp's `rope_freqs` divisors [head_dim / 2] (None if all 1).

    Between the two cut-offs the divisor is 1 / ((1 - s) / factor + s), s = (orig / wavelen - low) / (high - low):
    only orig / (high - low) and low / (high - low) are identifiable, so low_freq_factor is fixed at 1 (Meta's value)
    and high_freq_factor, original_max_position_embeddings are fitted on those frequencies, then checked.
    """
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    if factor == 1.0:
        return None
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if mid.sum() >= 2:
        inv_wavelen = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_wavelen[mid], smooth, 1)
        high, orig = float(round(1 - 1 / intercept, 4)), int(round(-slope / intercept))
        if np.allclose(_llama3_factors(theta, head_dim, factor, 1.0, high, orig), factors, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                    "original_max_position_embeddings": orig}
    raise ValueError(f"{path}: {_ROPE_FREQS} does not match a llama3 rope scaling that can be recovered")


def _gpt2_config(reader: gguf.GGUFReader, tensors: dict[str, gguf.ReaderTensor], path: str) -> dict:
    """HF `GPT2Config` dict (tied embeddings only when the file has no `output.weight`; llama.cpp writes a copy)."""
    n_positions, n_embd = _shape(tensors["position_embd.weight"])
    return {
        "model_type": "gpt2",
        "architectures": [_HF_ARCHITECTURES["gpt2"]],
        "vocab_size": _shape(tensors["token_embd.weight"])[0],
        "n_embd": n_embd,
        "n_layer": int(_required(reader, "gpt2.block_count", path)),
        "n_head": int(_required(reader, "gpt2.attention.head_count", path)),
        "n_positions": n_positions,
        "n_inner": int(_get(reader, "gpt2.feed_forward_length", 4 * n_embd)),
        "layer_norm_epsilon": float(_get(reader, "gpt2.attention.layer_norm_epsilon", 1e-5)),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "output.weight" not in tensors,
        **_token_ids(reader),
    }
