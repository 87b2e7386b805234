"""The task registry: each task's options record and default metric, TaskSpec's flat options derived from them, an
encoded task that remembers its spec (one default metric for the Python API and the command line), and a task added
by one registration."""

import argparse
import dataclasses
import json

import pytest

from jaxtrace.cli import build_parser
from jaxtrace.core.options import option
from jaxtrace.engine.objective import ObjectiveConfig, build_objective
from jaxtrace.tasks import (
    GENERATED_TASKS,
    TASK_LOADERS,
    TASKS,
    PromptPair,
    TaskKind,
    TaskOptions,
    TaskSpec,
    encode_pairs,
    load_pairs,
    register,
    task_digest,
    unregister,
)
from jaxtrace.tasks.registry import tasks_with_option
from conftest import SHARED

DATA = SHARED / "data"
TASK_FLAGS = ["--task", "--data", "--split", "--stats", "--reference-pronouns", "--limit", "--operands", "--per-digit",
              "--desiderata", "--task-seed", "--ioi-prompts", "--positions", "--noise-on", "--noise-std",
              "--noise-scale", "--noise-seed"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def small_specs(tmp_path_factory):
    """A cheap spec of every built-in task (the data-file tasks only when the shared data is there)."""
    folder = tmp_path_factory.mktemp("registry")
    custom = folder / "pairs.jsonl"
    custom.write_text("".join(json.dumps({"base": f"The {job} said that she", "counterfactual": f"The {job} said "
                                          f"that he", "targets": [" was", " is"], "label": job}) + "\n"
                              for job in ("nurse", "pilot")))
    counterfact = folder / "counterfact.json"
    counterfact.write_text(json.dumps([{"case_id": 0, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_true": {"str": "French"}}}]))
    specs = {"custom": TaskSpec("custom", str(custom)), "counterfact": TaskSpec("counterfact", str(counterfact)),
             "binding": TaskSpec("binding", operands=(1, 9), per_digit=1, desiderata=("value",)),
             "ioi": TaskSpec("ioi", ioi_prompts=4)}
    if DATA.is_dir():
        specs.update({name: TaskSpec(name, str(DATA)) for name in ("winogender", "winobias", "professions")})
    return specs


@pytest.mark.parametrize("name", list(TASKS))
def test_encoded_task_keeps_its_specs_default_metric(name, small_specs, tokenizer):
    spec = small_specs.get(name)
    if spec is None:
        pytest.skip(f"no shared data for {name} at {DATA}")
    assert spec.default_metric == TASKS[name].default_metric
    task = spec.build(tokenizer)
    assert task.spec is spec and task.default_metric == spec.default_metric
    assert task.replace_arrays(sign=-task.arrays.sign).default_metric == spec.default_metric
    assert task.corruption == ("noise" if TASKS[name].noise else "prompt")
    bare = encode_pairs(load_pairs(name, spec.data, **spec.loader_options(tokenizer)), tokenizer, spec.positions,
                        spec.noise())
    assert bare.spec is None and bare.default_metric == "probability_ratio"
    assert task_digest(bare) == task_digest(task)  # the spec is no part of the task's digest


def test_default_metrics_of_the_built_in_tasks():
    metrics = {name: kind.default_metric for name, kind in TASKS.items()}
    assert metrics == {"winogender": "probability_ratio", "winobias": "probability_ratio",
                       "professions": "probability_ratio", "custom": "probability_ratio",
                       "counterfact": "probability_ratio", "binding": "accuracy", "ioi": "logit_difference"}
    assert tuple(GENERATED_TASKS) == ("binding", "ioi") and GENERATED_TASKS == ("binding", "ioi")


@pytest.mark.parametrize("name, metric", [("ioi", "logit_difference"), ("binding", "accuracy")])
def test_every_entry_point_defaults_to_the_encoded_tasks_metric(name, metric, small_specs, tiny_gpt2):
    """Bug (d): `jaxtrace.trace` took the metric from the provenance, so the API scored IOI with probability_ratio
    where the command line used logit_difference. Every entry point (trace, baseline, compare, stability, evaluate,
    plan, sweep) builds its objective with `build_objective`, which takes the encoded task's own."""
    _, model, tokenizer = tiny_gpt2
    task = small_specs[name].build(tokenizer)
    assert build_objective(model, task, "head_out").metric.name == metric
    assert build_objective(model.config, task, ObjectiveConfig("head_out")).metric.name == metric  # plan's
    assert build_objective(model, task, "head_out", metric="kl_divergence").metric.name == "kl_divergence"
    assert build_objective(model, dataclasses.replace(task, spec=None), "head_out").metric.name == "probability_ratio"


def test_spec_options_are_the_records_fields():
    """TaskSpec's task options are the registered records' fields, declared as the records declare them."""
    spec_fields = {f.name: f for f in dataclasses.fields(TaskSpec)}
    for name, kind in TASKS.items():
        for field in dataclasses.fields(kind.options):
            flat = spec_fields[field.name]
            assert flat.default == field.default and flat.metadata["choices"] == field.metadata["choices"]
            assert flat.metadata["tasks"] == tasks_with_option(field.name) and name in flat.metadata["tasks"]
        assert set(TaskSpec(name, "data").options()) == {*kind.option_names, "positions"}
    assert spec_fields["task_seed"].metadata["help"] == "binding, ioi: prompt generation seed"
    assert spec_fields["reference_pronouns"].metadata["tasks"] == ("winobias", "winogender")
    own = [f.name for f in dataclasses.fields(TaskSpec) if f.metadata["tasks"] is None]
    assert own == ["task", "data", "positions"]


def test_command_line_task_flags_are_unchanged():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    group = next(g for g in subcommands.choices["trace"]._action_groups if g.title == "task")
    assert [action.option_strings[0] for action in group._group_actions] == TASK_FLAGS


@dataclasses.dataclass(frozen=True)
class ToyOptions(TaskOptions):
    task_seed: int = option(1234, "toy: prompt generation seed")

    def loader_options(self, tokenizer=None) -> dict:
        return {"seed": self.task_seed}


def load_toy(data=None, seed: int = 1234) -> list[PromptPair]:
    return [PromptPair(f"The nurse {seed} said that she", f"The nurse {seed} said that he", (" was", " is"),
                       label=f"toy-{i}") for i in range(2)]


def test_one_registration_makes_a_task(tokenizer):
    register(TaskKind("toy", load_toy, ToyOptions, default_metric="logit_difference", generated=True))
    try:
        assert "toy" in TASK_LOADERS and "toy" in GENERATED_TASKS and TASKS["toy"].loader is load_toy
        spec = TaskSpec("toy", task_seed=7)
        assert spec.options() == {"task_seed": 7, "positions": "prompt"} and spec.noise() is None
        assert TaskSpec.from_record("toy", None, spec.options()) == spec
        task = spec.build(tokenizer)
        assert task.default_metric == "logit_difference" and task.spec == spec
        assert task.pairs[0].base == "The nurse 7 said that she" and len(task) == 2
        assert len(load_pairs("toy", None)) == 2
        with pytest.raises(ValueError, match="--split applies to winobias only, not to toy"):
            TaskSpec("toy", split="test")
        with pytest.raises(ValueError, match="--task-seed applies to binding, ioi, toy only, not to winobias"):
            TaskSpec("winobias", "data", task_seed=1)
        with pytest.raises(ValueError, match="already registered"):
            register(TaskKind("toy", load_toy))
    finally:
        unregister("toy")
    assert "toy" not in TASK_LOADERS and "toy" not in GENERATED_TASKS
    with pytest.raises(ValueError, match="unknown task 'toy'"):
        TaskSpec("toy")
    assert TaskSpec("binding", task_seed=3).task_seed == 3  # the shared option is back to binding and ioi


def test_registration_refuses_options_taskspec_cannot_take():
    @dataclasses.dataclass(frozen=True)
    class NewOption(TaskOptions):
        depth: int = option(2, "toy: depth")

    @dataclasses.dataclass(frozen=True)
    class OtherSeed(TaskOptions):
        task_seed: int = option(1, "toy: prompt generation seed")

    @dataclasses.dataclass(frozen=True)
    class OwnField(TaskOptions):
        positions: str = option("last", "toy: positions")

    with pytest.raises(ValueError, match="depth that TaskSpec lacks"):
        register(TaskKind("toy", load_toy, NewOption))
    with pytest.raises(ValueError, match=r"--task-seed unlike binding, ioi \(default differ\)"):
        register(TaskKind("toy", load_toy, OtherSeed))
    with pytest.raises(ValueError, match="'positions' is a TaskSpec field"):
        register(TaskKind("toy", load_toy, OwnField))
    with pytest.raises(TypeError, match="must define noise"):
        TaskKind("toy", load_toy, noise=True)
    assert "toy" not in TASKS
