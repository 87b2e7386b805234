"""Indirect object identification: generated prompts checked token by token for two tokenizers, and the logit
difference against a plain PyTorch computation."""

from collections import Counter

import numpy as np
import pytest

from jaxtrace.cli import build_parser
from jaxtrace.cli.options import from_args
from jaxtrace.engine.objective import build_objective
from jaxtrace.tasks import TaskSpec, load_ioi
from jaxtrace.tasks.loaders import IOI_NAMES, IOI_TEMPLATES
from jaxtrace.tasks.spec import single_token_names
from conftest import SHARED


def _gpt2_tokenizer():
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")


def _smollm2_tokenizer():
    from jaxtrace.io.loading import resolve_model_path
    from jaxtrace.io.loading.gguf import gguf_tokenizer

    return gguf_tokenizer(resolve_model_path("smollm2-135m"))


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("make_tokenizer", [_gpt2_tokenizer, _smollm2_tokenizer], ids=["gpt2", "smollm2"])
def test_ioi_prompts_are_valid_for_the_tokenizer(make_tokenizer):
    tokenizer = make_tokenizer()
    whole = {name for name in IOI_NAMES if len(_ids(tokenizer, " " + name, False)) == 1}
    assert set(single_token_names(tokenizer)) == whole and len(whole) >= 5
    n = 4 * len(IOI_TEMPLATES)
    task = TaskSpec("ioi", ioi_prompts=n).build(tokenizer)
    assert len(task) == n and not task.skipped
    name_ids = {_ids(tokenizer, " " + name, False)[0] for name in whole}
    orders, templates = Counter(), Counter()
    for pair, label in zip(task.pairs, task.labels):
        io, s = (_ids(tokenizer, target, False) for target in pair.targets)
        assert len(io) == len(s) == 1 and io[0] in name_ids and s[0] in name_ids and io != s
        base, cf = _ids(tokenizer, pair.base), _ids(tokenizer, pair.counterfactual)
        assert len(base) == len(cf)
        io_at = [k for k, t in enumerate(base) if t == io[0]]
        s_at = [k for k, t in enumerate(base) if t == s[0]]
        assert len(io_at) == 1 and len(s_at) == 2 and s_at[1] > io_at[0]  # the subject is named again, last
        order = "ABBA" if io_at[0] < s_at[0] else "BABA"
        assert f"-{order}-" in label
        orders[order] += 1
        templates[order, label.rsplit("-t", 1)[1]] += 1
        # ABC: the same prompt but for three new, distinct names in the three name slots
        names_at = sorted(io_at + s_at)
        assert [k for k in range(len(base)) if base[k] != cf[k]] == names_at
        new = [cf[k] for k in names_at]
        assert len(set(new)) == 3 and set(new) <= name_ids and not {io[0], s[0]} & set(cf)
    assert orders == {"ABBA": n // 2, "BABA": n // 2}
    assert len(templates) == 2 * len(IOI_TEMPLATES) and set(templates.values()) == {2}


def test_ioi_is_seeded_and_refuses_bad_options():
    pairs = load_ioi(n=20, seed=3)
    assert load_ioi(n=20, seed=3) == pairs and load_ioi(n=20, seed=4) != pairs
    assert TaskSpec("ioi").default_metric == "logit_difference"
    assert TaskSpec("ioi", task_seed=3, ioi_prompts=20).build(_gpt2_tokenizer()).pairs == tuple(pairs)
    with pytest.raises(ValueError, match="ioi needs 5 names that are single tokens"):
        single_token_names(_gpt2_tokenizer(), IOI_NAMES[:4])
    with pytest.raises(ValueError, match="applies to ioi only"):
        TaskSpec("binding", ioi_prompts=10)
    with pytest.raises(ValueError, match="--ioi-prompts must be >= 1"):
        TaskSpec("ioi", ioi_prompts=0)
    args = build_parser().parse_args(["baseline", "--task", "ioi", "--ioi-prompts", "12", "--task-seed", "3",
                                      "--out", "x"])
    assert from_args(TaskSpec, args) == TaskSpec("ioi", ioi_prompts=12, task_seed=3)


def test_ioi_logit_difference_is_the_drop_of_io_over_s(tiny_gpt2):
    """The default metric on a random head mask equals [logit(IO) - logit(S)] clean minus patched, computed with a
    plain PyTorch forward whose head outputs are mixed with the counterfactual's through hooks."""
    import torch
    from transformers import GPT2LMHeadModel

    from torch_reference import gated

    folder, model, tokenizer = tiny_gpt2
    spec = TaskSpec("ioi", ioi_prompts=6)
    task = spec.build(tokenizer)
    objective = build_objective(model, task, "head_out", batch_size=4, metric=spec.default_metric)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    masks = [(np.random.RandomState(0).uniform(size=objective.shape) > 0.5).astype(np.float32),
             np.ones(objective.shape, np.float32)]
    for z in masks:
        plain = []
        with torch.no_grad():
            for pair in task.pairs:
                io, s = (_ids(tokenizer, target, False)[0] for target in pair.targets)
                base, cf = (torch.tensor([_ids(tokenizer, text)]) for text in (pair.base, pair.counterfactual))
                with gated(hf, capture=("head_out",)) as captured:
                    hf(cf)
                source = {"head_out": torch.stack(captured["head_out"])}
                clean = hf(base).logits[0, -1]
                with gated(hf, {"head_out": torch.tensor(z)}, source):
                    patched = hf(base).logits[0, -1]
                plain.append(float((clean[io] - clean[s]) - (patched[io] - patched[s])))
        np.testing.assert_allclose(objective.effects(z), plain, atol=1e-4)
