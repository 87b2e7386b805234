"""Hugging Face checkpoint folders: `config.json` + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

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
    config = json.loads(config_path.read_text())
    files = _safetensors_files(folder)
    if files:
        state_dict = {}
        for file in files:
            with safe_open(file, framework="flax") as f:
                state_dict.update({key: np.asarray(f.get_tensor(key)) for key in f.keys()})
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


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
        files = [folder / n for n in sorted(set(json.loads(path.read_text())["weight_map"].values()))]
    state_dict = {}
    for file in files:
        for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
            state_dict[key] = value.float().numpy()
    return state_dict
