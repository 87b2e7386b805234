"""Professions: template pairs swapping an occupation word for "woman" or "man", scored on " she" and " he"."""

from __future__ import annotations

from jaxtrace.tasks.library.common import dataset_dir, read_lines
from jaxtrace.tasks.pairs import PathLike, PromptPair
from jaxtrace.tasks.registry import TaskKind, register


def load_professions(data: PathLike) -> list[PromptPair]:
    """Professions template pairs: every male word under every template, then every female word.

    Male word w: base t.format(w), counterfactual t.format("woman"), sign -1. Female word w: counterfactual
    t.format("man"), sign +1. targets = (" she", " he"), so odds = p(he)/p(she) as in the reference. Labels are
    "{word}/t{template index}".
    """
    folder = dataset_dir(data, "professions")
    path = folder / "templates.txt"
    templates = read_lines(path)
    for number, template in templates:
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise ValueError(f"{path}:{number}: template must contain exactly one '{{}}' and no other braces")
    male_words = [word for _, word in read_lines(folder / "male_occupations.txt")]
    female_words = [word for _, word in read_lines(folder / "female_occupations.txt")]
    pairs = []
    for words, swap, sign in ((male_words, "woman", -1), (female_words, "man", 1)):
        for index, (_, template) in enumerate(templates):
            pairs.extend(
                PromptPair(
                    base=template.format(word),
                    counterfactual=template.format(swap),
                    targets=(" she", " he"),
                    sign=sign,
                    label=f"{word}/t{index}",
                )
                for word in words
            )
    return pairs


register(TaskKind("professions", load_professions))
