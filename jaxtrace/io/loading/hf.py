"""Hugging Face checkpoint folders: `config.json` + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxtrace.io.files import read_json

PICKLED_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class PickledCheckpointError(ValueError):
    """The folder holds only pickled PyTorch weights, which can run arbitrary code when loaded."""


def read_hf_folder(folder: str | Path, allow_pickle: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, state dict of numpy arrays) from an HF model folder. Never runs code from the checkpoint.

    Pickled `pytorch_model.bin` weights are refused unless `allow_pickle=True` (then read with
    `torch.load(weights_only=True)`, which needs torch).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a model folder needs config.json and safetensors weights")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    files = _safetensors_files(folder)
    if files:
        state_dict = {}
        for file in files:
            state_dict.update(read_safetensors(file))
        return config, state_dict
    pickled = [folder / name for name in PICKLED_NAMES if (folder / name).exists()]
    if not pickled:
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")
    if not allow_pickle:
        raise PickledCheckpointError(
            f"{pickled[0]} is a pickled checkpoint, which can execute code when loaded; convert it to safetensors, "
            "or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source")
    return config, _read_pickled(folder, pickled[0])


def weight_files(folder: Path) -> list[Path]:
    """The weight files an HF folder would load from (safetensors, else pickled ones)."""
    files = _safetensors_files(folder)
    if files:
        return files
    return [folder / name for name in PICKLED_NAMES if (folder / name).exists()]


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, after checking that the file holds every byte its header describes (an
    empty, truncated or foreign file is a ValueError naming it)."""
    size = file.stat().st_size
    if size == 0:
        raise ValueError(f"{file} is empty (0 bytes)")
    with open(file, "rb") as f:
        head = f.read(8)
        header_length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_length is None or 8 + header_length > size:
            raise ValueError(f"{file} is truncated or not a safetensors file ({size:,} bytes, shorter than its "
                             "header)")
        try:
            header = json.loads(f.read(header_length))
            end = max([int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"],
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{file} is not a safetensors file (its header is not valid)") from None
    if 8 + header_length + end > size:
        raise ValueError(f"{file} is truncated ({size:,} bytes; its header describes {8 + header_length + end:,})")
    try:
        with safe_open(file, framework="flax") as f:
            return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{file} cannot be read as safetensors ({error})") from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        record = read_json(index)
        weight_map = record.get("weight_map") if isinstance(record, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ValueError(f"{index}: expected an object with a 'weight_map' of tensor names to file names")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _read_pickled(folder: Path, path: Path) -> dict[str, np.ndarray]:
    import torch  # only for an explicit opt-in

    files = [path]
    if path.name.endswith(".index.json"):
        files = [folder / n for n in sorted(set(read_json(path)["weight_map"].values()))]
    state_dict = {}
    for file in files:
        for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
            state_dict[key] = value.float().numpy()
    return state_dict
