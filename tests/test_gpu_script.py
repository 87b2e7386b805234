"""`benchmarks/gpu.py`, the accelerator benchmark, runs end to end on CPU with its tiny configuration (so that it
cannot rot between the times a GPU is lent) and writes GPU.md."""

import json
import math
import types

import jax
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def gpu():
    return load_benchmark("gpu.py")


def test_tiny_run_writes_every_section(gpu, tmp_path):
    # jax.nn.dot_product_attention itself mixes bfloat16 and float32 (jax 0.10-0.12), which the suite's strict
    # promotion refuses: the script runs under the standard promotion its users have.
    with jax.numpy_dtype_promotion("standard"):
        assert gpu.main(["--tiny", "--in-process", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "GPU.md").read_text()
    for heading in ("## Matmul peak", "## Training step", "## A whole trace", "## Mask evaluation"):
        assert heading in text
    assert "Not measured" not in text and "% of bf16 peak" in text
    record = json.loads((tmp_path / "gpu.json").read_text())
    assert record["skipped"] == []
    kinds = [r["kind"] for r in record["results"]]
    assert kinds == [c["kind"] for c in gpu.cells(gpu.TINY)]
    steps = [r for r in record["results"] if r["kind"] == "step"]
    assert {r["attention"] for r in steps} == {"explicit", "fused"}  # the other form is the other one
    planned = next(r for r in steps if r.get("plan"))
    assert planned["plan"]["training_flops"] > 0 and planned["plan"]["training_bytes"] > 0
    saturated = next(r for r in steps if r.get("saturate"))
    assert saturated["tokens_x_runs"] >= gpu.TINY.saturated_tokens > saturated["tokens_x_runs"] / saturated["runs"]
    masks = planned["masks"]
    assert all(math.isfinite(masks[k]["masks_per_s"]) and masks[k]["masks_per_s"] > 0 for k in ("random", "one_head"))
    trace = next(r for r in record["results"] if r["kind"] == "trace")
    assert trace["wall_s"] >= trace["search_s"] > 0 and trace["epochs_run"] >= 1


def test_a_cell_runs_in_its_own_process(gpu):
    args = types.SimpleNamespace(data=str(gpu.DEFAULT_DATA), tiny=True)
    result = gpu.isolated({"kind": "matmul"}, args, remaining=120)
    assert result["size"] == gpu.TINY.matmul and result["bfloat16_tflops"] > 0
    assert result["device"]["platform"] == "cpu"


def test_budget_skips_the_rest_and_says_so(gpu, tmp_path):
    assert gpu.main(["--tiny", "--in-process", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "GPU.md").read_text()
    assert "## Not measured" in text and "budget was spent" in text


def test_report_of_a_full_run(gpu):
    """GPU.md of the full cell list (fabricated numbers): every line a GPU run writes."""
    device = {"platform": "gpu", "kind": "NVIDIA H100", "count": 1, "jax": "0", "jaxlib": "0"}
    results = []
    for k, cell in enumerate(gpu.cells(gpu.FULL)):
        common = {**cell, "device": device}
        if cell["kind"] == "matmul":
            results.append({**common, "size": 8192, "bfloat16_tflops": 700.0, "float32_tflops": 50.0})
        elif cell["kind"] == "trace":
            results.append({**common, "load_s": 1.0, "setup_s": 1.0, "search_s": 5.0, "wall_s": 7.0, "pairs": 160,
                            "epochs_run": 11, "selected": 43, "effect": 0.5, "attention": "fused",
                            "peak_bytes": 2**30})
        else:
            attention = "explicit" if cell["attention"] == "other" else "fused"
            runs = 4 if cell.get("saturate") else 1
            results.append({**common, "attention": attention, "runs": runs, "tokens_x_runs": 1100 * runs,
                            "real_tokens": 900 * runs, "compile_s": 9.0, "step_s": 0.01 + k / 1000,
                            "peak_bytes": 3 * 2**30, "plan": cell.get("plan") and {
                                "training_bytes": 2.5 * 2**30, "training_flops": 2e12 * runs},
                            **({"masks": {"k": 256, "pairs": 160, "random": {"masks_per_s": 90.0},
                                          "one_head": {"masks_per_s": 200.0}}} if cell.get("masks") else {})})
    text = gpu.report(results, [("x", "failed: y")], gpu.FULL, 300.0, tiny=False)
    assert "Tiny configuration" not in text and "NVIDIA H100" in text and "batches of 32 WinoBias dev pairs" in text
    assert text.count("% of the measured bf16 matmul peak") == 2  # SmolLM2's and the 1B shape's saturated steps
    assert "Attention forms, SmolLM2-135M bf16: fused" in text and ", in a fresh process" in text
    assert "| 3 | 2.5 |" in text and "| 3 | n/a |" in text and "- x: failed: y" in text
    assert "TFLOP/s" in text and "not run for the cell" in text
