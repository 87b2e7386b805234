"""Model families in batch: a sweep over two tiny models of different depth and two tasks, killed and resumed."""

import json
from pathlib import Path

import pytest

import jaxtrace
from jaxtrace.runs import model_sweep as families
from jaxtrace.io.checkpoints import EpochCheckpoints
from jaxtrace.cli import main
from jaxtrace.core.search import SearchConfig
from jaxtrace.tasks import TaskSpec
from conftest import SHARED

DATA = SHARED / "data"
TASKS = [TaskSpec("winogender", str(DATA)),
         TaskSpec("binding", operands=(1, 9), per_digit=1, desiderata=("value",))]  # 9 pairs
TASK_NAMES = [t.task for t in TASKS]


@pytest.fixture(scope="module")
def tiny_llama(tiny_gpt2, tmp_path_factory):
    """A 3-layer random Llama with GPT-2's vocabulary, saved with the GPT-2 tokenizer: another family and depth."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, _, tokenizer = tiny_gpt2
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3))
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_slugs_are_safe_and_unique(tmp_path):
    a, b = tmp_path / "a" / "my model", tmp_path / "b" / "my model"
    slugs = families.model_slugs(["smollm2-135m", str(a), str(b), str(tmp_path / "x.gguf")])
    assert slugs["smollm2-135m"] == "smollm2-135m" and slugs[str(tmp_path / "x.gguf")] == "x.gguf"
    assert slugs[str(a)] != slugs[str(b)] and all(s.startswith("my-model-") for s in (slugs[str(a)], slugs[str(b)]))


def test_killed_sweep_resumes_and_reports_every_pair(tiny_gpt2, tiny_llama, tmp_path, monkeypatch):
    models = [str(tiny_gpt2[0]), str(tiny_llama)]
    slugs = families.model_slugs(models)
    folders = [f"{slugs[m]}/{t}" for m in models for t in TASK_NAMES]
    calls, loads = [], []
    real_trace, real_save = families.trace, EpochCheckpoints.save

    def counting_trace(model, task, site, config, out, resume, **kwargs):
        calls.append((Path(out).relative_to(tmp_path).as_posix(), resume))
        return real_trace(model, task, site, config, out=out, resume=resume, **kwargs)

    def killing_save(self, epochs_done, state, meta):  # the third pair is killed after its first epoch
        real_save(self, epochs_done, state, meta)
        if len(calls) == 3:
            raise KeyboardInterrupt

    def load(spec):
        loads.append(spec)
        return jaxtrace.load_model(spec)

    def sweep():
        return families.sweep_models(models, TASKS, "head_out", tmp_path,
                                     SearchConfig(epochs=2, lambda1=0.01, lambda2=0.01), progress=False, load=load)

    monkeypatch.setattr(families, "trace", counting_trace)
    monkeypatch.setattr(EpochCheckpoints, "save", killing_save)
    with pytest.raises(KeyboardInterrupt):
        sweep()
    assert calls == [(f, False) for f in folders[:3]] and loads == models
    assert [(tmp_path / f / "circuit.json").is_file() for f in folders] == [True, True, False, False]
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["status"] for p in manifest["pairs"]] == ["done", "done", "interrupted", "pending"]

    monkeypatch.setattr(EpochCheckpoints, "save", real_save)
    calls.clear(), loads.clear()
    manifest = sweep()
    assert calls == [(folders[2], True), (folders[3], False)]  # finished pairs not re-run, the killed one resumed
    assert loads == models[1:]  # the first model's pairs are all finished: not even loaded
    assert [p["status"] for p in manifest["pairs"]] == ["done"] * 4
    resumed = json.loads((tmp_path / folders[2] / "circuit.json").read_text())
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]

    report = (tmp_path / "report.md").read_text()
    for model, depth in zip(models, [2, 3]):
        for task in TASK_NAMES:
            assert f"| {model} | {task} | head_out | {depth} |" in report
    for image in ["effect_vs_size.png", "relative_depth_winogender.png", "relative_depth_binding.png",
                  *(f"{f}/z_map.png" for f in folders)]:
        assert f"]({image})" in report and (tmp_path / image).is_file()

    calls.clear(), loads.clear()
    sweep()  # everything finished: nothing loaded, nothing traced
    assert calls == [] and loads == []


def test_cli_sweep_and_errors(tiny_gpt2, tiny_llama, tmp_path, capsys):
    models = f"{tiny_gpt2[0]},{tiny_llama}"
    args = ["sweep", "--tasks", "binding", "--operands", "1-9", "--per-digit", "1", "--desiderata", "value",
            "--site", "attn_pattern", "--epochs", "1", "--no-progress"]
    assert main(args + ["--models", models, "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"| {tiny_gpt2[0]} | binding | attn_pattern | 2 |" in out
    assert f"| {tiny_llama} | binding | attn_pattern | 3 |" in out
    assert f"report     {tmp_path / 's' / 'report.md'}" in out
    circuit = json.loads((tmp_path / "s" / tiny_llama.name / "binding" / "circuit.json").read_text())
    assert circuit["task_options"]["per_digit"] == 1 and circuit["n_pairs"] == 9
    assert main(args + ["--models", f"{tiny_gpt2[0]},{tmp_path / 'missing'}", "--out", str(tmp_path / "e")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(args[:1] + ["--models", models, "--tasks", "binding,nope", "--out", str(tmp_path / "e")]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err
