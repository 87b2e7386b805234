"""Checkpoint folders: sharded safetensors, both config spellings, and a clear error for each kind of bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

import jaxtrace
from jaxtrace.io.loading import CheckpointMismatchError, PickledCheckpointError
from jaxtrace.core.models import ModelConfig, UnsupportedModelError
from conftest import build_hf_model

IDS = np.arange(10).reshape(1, 10)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_hf_model("llama").save_pretrained(folder)
    return folder


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_sharded_safetensors_load_like_single_file(llama_folder, tmp_path):
    sharded = tmp_path / "sharded"
    build_hf_model("llama").save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single, _ = jaxtrace.load_model(llama_folder)
    model, _ = jaxtrace.load_model(sharded)
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(single(IDS)))


def test_transformers4_and_5_config_spellings_agree(llama_folder, tmp_path):
    config5 = json.loads((llama_folder / "config.json").read_text())
    assert "rope_parameters" in config5  # what transformers 5 writes
    config4 = {k: v for k, v in config5.items() if k != "rope_parameters"}
    rope = dict(config5["rope_parameters"])
    config4["rope_theta"] = rope.pop("rope_theta")
    config4["rope_scaling"] = rope
    assert ModelConfig.from_hf(config4) == ModelConfig.from_hf(config5)
    assert ModelConfig.from_hf(config5).rope_theta == 500000.0


def test_missing_model_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        jaxtrace.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        jaxtrace.load_model("no-such-registered-model")


def test_missing_config_or_weights(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        jaxtrace.load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        jaxtrace.load_model(folder)


def test_unsupported_architecture_lists_supported(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path)
    _edit_config(folder, lambda c: c.update(model_type="bert", architectures=["BertModel"]))
    with pytest.raises(UnsupportedModelError, match="bert.*supported: gpt2, llama, mistral, qwen2, qwen3"):
        jaxtrace.load_model(folder)


def test_config_weight_shape_mismatch_names_tensor(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path)
    _edit_config(folder, lambda c: c.update(intermediate_size=64))
    with pytest.raises(CheckpointMismatchError, match=r"gate_proj.weight.*\(48, 32\).*\(64, 32\)"):
        jaxtrace.load_model(folder)


def test_pickled_checkpoint_refused_unless_opted_in(llama_folder, tmp_path):
    folder = _copy(llama_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(build_hf_model("llama").state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PickledCheckpointError, match="allow_pickle"):
        jaxtrace.load_model(folder)
    model, _ = jaxtrace.load_model(folder, allow_pickle=True)
    reference, _ = jaxtrace.load_model(llama_folder)
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(reference(IDS)))


def test_bad_gates_are_reported(llama_folder):
    model, _ = jaxtrace.load_model(llama_folder)
    _, source = model.capture(IDS, sites=("mlp_out",))
    with pytest.raises(ValueError, match=r"expected \(2, 32\)"):
        model(IDS, gates={"mlp_out": np.zeros((2, 5), np.float32)}, source=source)
    with pytest.raises(ValueError, match="need a source"):
        model(IDS, gates={"head_out": np.zeros((2, 4), np.float32)}, source=source)
    with pytest.raises(ValueError, match="unknown site"):
        model.capture(IDS, sites=("residual",))
