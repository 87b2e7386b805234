"""Shared fixtures: tiny random Hugging Face models of every supported family, saved as safetensors folders."""

import importlib.util
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("JAX_ENABLE_X64", "0")

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrace.io.cache import enable_compilation_cache

# JAX test habits: no silent dtype widening, no implicit broadcasting of arrays of different ranks.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Many tests compile the same tiny programs again (a model loaded anew is a new program): a persistent compilation
# cache for the session (not the user's) compiles each once; it must be set before the first compilation.
enable_compilation_cache(Path(tempfile.mkdtemp(prefix="jaxtrace-tests-xla-")), min_seconds=0.2)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Tiny configs: 2 layers, GQA where the family has it, head_dim != hidden/heads for Qwen3.
TINY_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8)),
    "mistral": dict(model_type="mistral", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, sliding_window=5),
    "qwen2": dict(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64),
    # Local (window 4) then global layers; soft-capping that bites; q.k scaled by 12 ** -0.5, not head_dim's.
    "gemma2": dict(model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                   sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
                   final_logit_softcapping=3.0),
    # Multi-query, q/k norms, a local RoPE base of 100 in the window-4 layer, linear scaling in the global one.
    "gemma3": dict(model_type="gemma3_text", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                   sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
                   rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=100.0),
                                        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))),
}
FAMILY_NAMES = list(TINY_CONFIGS)


def load_benchmark(script: str):
    """A script of benchmarks/ (e.g. "gpu.py") imported as a module, registered so its dataclasses find it."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    spec = importlib.util.spec_from_file_location(f"jaxtrace_benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A tiny random transformers model (float32, eager attention, eval mode) with non-trivial norms and biases;
    `overrides` change its config (e.g. vocab_size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY_CONFIGS[name], **overrides}
    config = AutoConfig.for_model(kwargs.pop("model_type"), initializer_range=0.3, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))  # untrained norms are all ones and biases zero: perturb them
    return model


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def hf_family(request, tmp_path_factory):
    """(family name, HF torch model, folder with config.json + model.safetensors)."""
    model = build_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer, 4-head random GPT-2 with the real GPT-2 tokenizer, saved as an HF folder: (folder, model, tok)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    import jaxtrace

    tokenizer = GPT2Tokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3))
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tok = jaxtrace.load_model(folder)
    return folder, model, tok


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every compiled CPU program keeps a few memory maps, and a
    long single-process run of many distinct programs reaches Linux's `vm.max_map_count` (65530), where LLVM's JIT
    aborts the process."""
    yield
    import jax

    jax.clear_caches()


def gguf_against_transformers(name: str, package: str):
    """(transformers' model from the registered GGUF `name`, jaxtrace's model, its tokenizer); the test is skipped
    when the model's package (or accelerate, which transformers' GGUF loading needs) is not installed."""
    import importlib.util

    if importlib.util.find_spec(package) is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip(f"{package} or accelerate is not installed")
    import torch
    from transformers import AutoModelForCausalLM

    import jaxtrace

    path = jaxtrace.io.loading.resolve_model_path(name)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model, tokenizer = jaxtrace.load_model(name)
    return reference, model, tokenizer


def logits_of_both(reference, model, tokenizer, text: str):
    """(jaxtrace's logits, transformers' logits) [1, T, V] of a text."""
    import torch

    ids = tokenizer(text, return_tensors="np")["input_ids"]
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    return np.asarray(model(ids)), expected
