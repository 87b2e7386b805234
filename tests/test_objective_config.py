"""One objective constructor: every command's objective options reach the objective, and the plan analyses the
objective the run builds. Each test is one way a flag was once accepted and dropped (issue 20, (a)-(c))."""

import json
import re
from pathlib import Path

import jax

import jaxtrace
from jaxtrace.cli import main
from jaxtrace.core.search import SearchConfig
from jaxtrace.core.sites import AttentionForm, source_bytes_per_pair
from jaxtrace.engine import objective as engine_objective
from jaxtrace.engine.objective import DEFAULT_MEMORY_BUDGET, ObjectiveConfig, build_objective, resolve_attention
from jaxtrace.engine.plan import PlanReport, TaskShape
from jaxtrace.runs.plan import plan
from conftest import SHARED

DATA = SHARED / "data"
SHAPE = TaskShape(pairs=8, prompt_tokens=6, target_tokens=1)


def test_plan_analyses_the_attention_form_the_run_resolves(tiny_gpt2, capsys):
    """(a) `plan --attention` was accepted and dropped, and the plan analysed explicit patterns where the run
    resolves `auto` to fused. The plan's objective is `build_objective`'s own, so it resolves the form as the run."""
    folder, model, _ = tiny_gpt2
    task = SHAPE.encoded()
    for attention in ("auto", "explicit", "fused"):
        run = build_objective(model, task, ObjectiveConfig("attn_pattern", attention=attention, batch_size=4))
        planned = plan(model.config, SHAPE, ObjectiveConfig("attn_pattern", attention=attention, batch_size=4),
                       masks=2)
        assert planned.attention == run.spec.attention == resolve_attention(attention)
        source = source_bytes_per_pair(model.config, "attn_pattern", SHAPE.prompt_tokens, 0, run.spec.attention)
        assert planned.cache_host_bytes > len(task) * source  # its sources (and the ungated outputs)
        assert planned.cache_host_bytes == sum(a.nbytes for a in jax.tree.leaves(run.cache))
    flags = ["plan", "--model", str(folder), "--pairs", "8", "--prompt-tokens", "6", "--batch-size", "4", "--masks", "2",
             "--attention", "fused", "--json"]
    assert main(flags) == 0
    report = PlanReport.from_dict(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert report.attention == AttentionForm.FUSED


def test_stability_honours_attention(tiny_gpt2, tmp_path):
    """(b) `jaxtrace stability --attention` was accepted and ignored: the run's identity records the form used."""
    folder, _, _ = tiny_gpt2
    out = tmp_path / "stable"
    assert main(["stability", "--model", str(folder), "--task", "winogender", "--data", str(DATA), "--site",
                 "head_out", "--epochs", "1", "--seeds", "2", "--resamples", "1", "--no-progress",
                 "--attention", "fused", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["identity"]["objective"]["attention"] == "fused"


def test_memory_budget_reaches_every_mask_evaluation(tiny_gpt2, monkeypatch):
    """(c) `--memory-gb` was not honoured by the per-epoch evaluation and the warm start: every evaluation now sizes
    its chunks from the objective's own budget, the one the command line sets."""
    _, model, tokenizer = tiny_gpt2
    task = jaxtrace.build_task("winogender", DATA, tokenizer)
    objective = build_objective(model, task, ObjectiveConfig("head_out", batch_size=32, memory_gb=1e-6))
    assert objective.memory_budget == int(1e-6 * 2**30)
    seen = []
    original = engine_objective.masks_per_chunk

    def recording(objective, n_masks, share=1.0):
        seen.append((objective.memory_budget, share))
        return original(objective, n_masks, share)

    monkeypatch.setattr(engine_objective, "masks_per_chunk", recording)
    monkeypatch.setattr("jaxtrace.engine.attribution.masks_per_chunk", recording)
    config = SearchConfig(epochs=1, warm_start="atp")
    jaxtrace.run_searches(objective, [config, config.replace(lambda1=1.0)])
    assert {share for _, share in seen} == {1.0, 1 / 3}  # the per-epoch evaluation and the warm start's gradients
    assert {budget for budget, _ in seen} == {objective.memory_budget}


def test_the_memory_budget_is_written_once():
    """The default budget is one named constant, not a literal repeated in every function's signature."""
    package = Path(jaxtrace.__file__).parent
    literals = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py")
                for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\b2 << 30\b", line)]
    assert literals == ["engine/objective.py:" + str(_line_of("DEFAULT_MEMORY_BUDGET = 2 << 30"))], literals
    assert DEFAULT_MEMORY_BUDGET == ObjectiveConfig().memory_budget == 2 << 30


def _line_of(text: str) -> int:
    lines = Path(engine_objective.__file__).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.startswith(text))
