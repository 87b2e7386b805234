"""Meshes and hosts: the same search and attribution on 1 and 8 simulated CPU devices (data and tensor parallel), a
checkpoint moved between meshes, a real two-process run, and how memory grows with prompt length at each site."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace.engine import mesh as parallel
from jaxtrace.runs.trace import trace
from jaxtrace.tasks import build_task
from jaxtrace.core.intervention import Intervention
from jaxtrace.core.models import pure
from jaxtrace.core.records import Tokens
from jaxtrace.core.sites import gate_shape, source_bytes_per_pair
from jaxtrace.io import results
from conftest import SHARED, build_hf_model

TESTS = Path(__file__).parent
# Packing differs per mesh (each data shard packs its own pairs), so sums run in another order: float32 rounding,
# carried along the steps' trajectory (the loss: up to 1.05e-5 relative on GPT-2's 9 steps on one CPU of this kind).
Z_TOLERANCE = 1e-4
LOSS_RTOL = 3e-5


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def models_with_gpt2_tokenizer(tmp_path_factory, tiny_gpt2):
    """GPT-2 and a Llama with grouped-query attention (4 query, 2 KV heads), both reading GPT-2's tokenizer."""
    folder, _, tokenizer = tiny_gpt2
    llama = tmp_path_factory.mktemp("llama_gpt2_vocab")
    build_hf_model("llama", vocab_size=tokenizer.vocab_size).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    return {"gpt2": folder, "llama": llama}


@pytest.fixture(scope="module")
def winobias(tiny_gpt2):
    return build_task("winobias", SHARED / "data", tiny_gpt2[2])


@pytest.fixture(scope="module")
def mesh_runs(models_with_gpt2_tokenizer, tmp_path_factory):
    """mesh_worker.py's output per family (one subprocess each, 8 simulated devices)."""
    runs = {}
    for family, folder in models_with_gpt2_tokenizer.items():
        work = tmp_path_factory.mktemp(f"mesh_{family}")
        done = _run([TESTS / "mesh_worker.py", folder, SHARED / "data", work / "checkpoints", work / "out.json"],
                    timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[family] = json.loads((work / "out.json").read_text())
    return runs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_meshes_give_the_single_device_trajectory_and_circuit(mesh_runs, family):
    result = mesh_runs[family]
    assert result["devices"] == 8
    single = result["runs"]["None"]
    assert 0 < np.sum(single["mask"]) < np.size(single["mask"])  # a real circuit, not an empty or full one
    for spec, run in result["runs"].items():
        np.testing.assert_allclose(run["loss"], single["loss"], rtol=LOSS_RTOL, err_msg=spec)
        np.testing.assert_allclose(run["z"], single["z"], atol=Z_TOLERANCE, err_msg=spec)
        assert run["mask"] == single["mask"], spec
        np.testing.assert_allclose(run["ig"], single["ig"], atol=1e-5, err_msg=spec)  # gradients summed over data
    # The layouts are what the mesh says: tokens split 8, 4 or 2 ways over data, query heads over model.
    runs = result["runs"]
    assert runs["data=8"]["batch_tokens"]["distinct_shards"] == 8
    assert runs["data=2,model=4"]["batch_tokens"]["distinct_shards"] == 2
    assert runs["data=8"]["query"]["distinct_shards"] == 1
    assert "model" in runs["data=4,model=2"]["query"]["spec"]
    assert runs["data=2,model=4"]["query"]["distinct_shards"] == 4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_checkpoint_from_one_mesh_resumes_on_another(mesh_runs, family):
    result = mesh_runs[family]
    single = result["runs"]["None"]
    np.testing.assert_allclose(result["resumed"]["z"], single["z"], atol=Z_TOLERANCE)
    assert result["resumed"]["mask"] == single["mask"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_trace_like_one(tiny_gpt2, tmp_path):
    """`jaxtrace trace` as two processes of 4 CPU devices each (gloo over TCP) against one process: the same
    circuit, and on jax 0.12 no deadlock on programs from the compiled-program cache (which such runs skip)."""
    folder = tiny_gpt2[0]
    common = ["-m", "jaxtrace.cli", "trace", "--model", folder, "--task", "winobias", "--data", SHARED / "data",
              "--epochs", "2", "--batch-size", "32", "--lambda1", "0.01", "--lambda2", "0.01", "--no-progress"]
    single = _run([*common, "--out", tmp_path / "single"], timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port, env = _free_port(), {**os.environ, "PYTHONPATH": str(TESTS.parent),
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    processes = [subprocess.Popen(
        [sys.executable, *map(str, common), "--out", tmp_path / "multi", "--mesh", "data=4,model=2",
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "data=4 x model=2 over 8 cpu devices, 2 process(es)" in outputs[0][0]
    assert "compiled-program cache not used" in outputs[0][0]
    report = ("mesh", "model", "task", "circuit", "effect", "written")  # one report, from process 0 (gloo's own
    assert "circuit" in outputs[0][0]  # connection lines go to fd 1 from C++ on both)
    assert not [line for line in outputs[1][0].splitlines() if line.startswith(report)]
    one = json.loads((tmp_path / "single" / "circuit.json").read_text())
    two = json.loads((tmp_path / "multi" / "circuit.json").read_text())
    np.testing.assert_allclose(two["z"], one["z"], atol=Z_TOLERANCE)
    assert two["selected"] == one["selected"]
    assert two["effect_all"] == pytest.approx(one["effect_all"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir()) == ["1", "2"]


def test_only_process_zero_writes_result_files(tiny_gpt2, winobias, tmp_path, monkeypatch):
    _, model, _ = tiny_gpt2
    from jaxtrace.core.search import SearchConfig

    monkeypatch.setattr(results, "is_writer", lambda: False)  # as on process 1 (Orbax keeps its own process view)
    trace(model, winobias, "head_out", SearchConfig(epochs=1), batch_size=16, out=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "z"]  # collective Orbax writes only


def test_parse_mesh_fills_and_checks_the_device_count():
    devices = list(range(8))  # parse_mesh only reshapes the list
    assert dict(parallel.parse_mesh("model=2", devices).shape) == {"data": 4, "model": 2}
    assert dict(parallel.parse_mesh(None, devices).shape) == {"data": 8, "model": 1}
    assert dict(parallel.parse_mesh("data=2,model=4", devices).shape) == {"data": 2, "model": 4}
    for bad, message in [("data=3", "not a multiple"), ("data=2,model=2", "needs 4 devices"),
                         ("pipe=2", "data=D,model=M"), ("data=0", "positive")]:
        with pytest.raises(ValueError, match=message):
            parallel.parse_mesh(bad, devices)


def _step_memory(model, site: str, length: int) -> tuple[int, int]:
    """(source argument bytes, temporary bytes) of the compiled gated forward + backward on 4 rows of `length`."""
    lm, params = pure(model)
    ids = jnp.zeros((4, length), jnp.int32)
    _, source = jax.eval_shape(lambda p, x: lm.capture(p, Tokens(x), (site,)), params, ids)
    z = jnp.zeros(gate_shape(model.config, site))

    def loss(z, params, ids, source):
        return lm.hidden_states(params, Tokens(ids), Intervention({site: z}, source))[0].sum()

    memory = jax.jit(jax.grad(loss)).lower(z, params, ids, source).compile().memory_analysis()
    source_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(source))
    return source_bytes, memory.temp_size_in_bytes


def test_memory_growth_with_prompt_length(tiny_gpt2):
    """attn_pattern's sources grow as T² per prompt, head_out's as T; the step's temporaries are dominated by the
    live T×T attention of the backward pass, common to both (layers rematerialise the mix, so attn_pattern's step
    needs little more than head_out's)."""
    _, model, _ = tiny_gpt2
    lengths = (64, 128, 256)
    measured = {site: [_step_memory(model, site, t) for t in lengths] for site in ("attn_pattern", "head_out")}
    for site, rows in measured.items():
        for t, (source_bytes, _) in zip(lengths, rows):  # the cache estimate is exactly the source size
            assert source_bytes == 4 * source_bytes_per_pair(model.config, site, t), site
    growth = lambda values: np.log2(values[-1] / values[0]) / np.log2(lengths[-1] / lengths[0])  # noqa: E731
    assert growth([s for s, _ in measured["attn_pattern"]]) == pytest.approx(2.0, abs=0.01)
    assert growth([s for s, _ in measured["head_out"]]) == pytest.approx(1.0, abs=0.01)
    for site, rows in measured.items():
        assert growth([temp for _, temp in rows]) > 1.5, site
    for (_, pattern_temp), (_, head_temp) in zip(measured["attn_pattern"], measured["head_out"]):
        assert pattern_temp < 1.5 * head_temp


def test_attn_pattern_cache_over_the_limit_points_to_head_out(tiny_gpt2, winobias):
    from jaxtrace.engine.objective import build_objective

    _, model, _ = tiny_gpt2
    with pytest.raises(MemoryError, match="head_out gates the same heads with memory linear in length"):
        build_objective(model, winobias, "attn_pattern", cache=True, cache_limit_bytes=1000)
    assert build_objective(model, winobias, "head_out", cache=None, cache_limit_bytes=10**9).cache


def test_cli_rejects_a_mesh_that_does_not_fit(tiny_gpt2, tmp_path, capsys):
    from jaxtrace.cli import main

    code = main(["trace", "--model", str(tiny_gpt2[0]), "--task", "winobias", "--data", str(SHARED / "data"),
                 "--out", str(tmp_path), "--mesh", "data=3"])
    assert code == 2 and "1 devices are not a multiple of 3" in capsys.readouterr().err
