"""Indirect object identification (Wang et al. 2022): generated pairs with the ABC corruption."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from jaxtrace.core.options import option
from jaxtrace.tasks.library.common import check_positive
from jaxtrace.tasks.pairs import PathLike, PromptPair
from jaxtrace.tasks.registry import TaskKind, TaskOptions, register


# The templates of Wang et al. (2022), "Interpretability in the Wild": two names are introduced ({first}, {second}),
# then the subject {S} is named again and the prompt stops where the indirect object is due. ABBA: first is the
# indirect object; BABA: first is the subject.
IOI_TEMPLATES = (
    "Then, {first} and {second} went to the {place}. {S} gave a {object} to",
    "Then, {first} and {second} had a lot of fun at the {place}. {S} gave a {object} to",
    "Then, {first} and {second} were working at the {place}. {S} decided to give a {object} to",
    "Then, {first} and {second} were thinking about going to the {place}. {S} wanted to give a {object} to",
    "Then, {first} and {second} had a long argument, and afterwards {S} said to",
    "After {first} and {second} went to the {place}, {S} gave a {object} to",
    "When {first} and {second} got a {object} at the {place}, {S} decided to give it to",
    "When {first} and {second} got a {object} at the {place}, {S} decided to give the {object} to",
    "While {first} and {second} were working at the {place}, {S} gave a {object} to",
    "While {first} and {second} were commuting to the {place}, {S} gave a {object} to",
    "After the lunch, {first} and {second} went to the {place}. {S} gave a {object} to",
    "Afterwards, {first} and {second} went to the {place}. {S} gave a {object} to",
    "Then, {first} and {second} had a long argument. Afterwards {S} said to",
    "The {place} {first} and {second} went to had a {object}. {S} gave it to",
    "Friends {first} and {second} found a {object} at the {place}. {S} gave it to",
)
IOI_ORDERS = ("ABBA", "BABA")
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
IOI_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
IOI_NAMES = tuple("""
    Aaron Adam Alan Alex Alice Amy Anderson Andre Andrew Andy Anna Anthony Arthur Austin Blake Brandon Brian Carter
    Charles Charlie Christian Christopher Clark Cole Collins Connor Crystal Daniel David Dean Edward Elizabeth Emily
    Eric Eva Ford Frank George Georgia Graham Grant Henry Ian Jack Jacob Jake James Jamie Jane Jason Jay Jennifer
    Jeremy Jessica John Jonathan Jordan Joseph Joshua Justin Kate Kelly Kevin Kyle Laura Leon Lewis Lisa Louis Luke
    Madison Marco Marcus Maria Mark Martin Mary Matthew Max Michael Michelle Morgan Patrick Paul Peter Rachel Richard
    Robert Roman Rose Ruby Russell Ryan Sarah Scott Sean Simon Stephen Steven Taylor Thomas Tyler Victoria Warren
    William""".split())
IOI_NAMES_PER_PAIR = 5  # indirect object and subject, and the counterfactual's three new names


def load_ioi(data: PathLike | None = None, n: int = 100, seed: int = 1234,
             names: Sequence[str] = IOI_NAMES) -> list[PromptPair]:
    """Indirect-object-identification pairs (Wang et al. 2022), generated with a seeded ``random.Random``; ``data``
    unused.

    Pair i fills template ``IOI_TEMPLATES[(i // 2) mod 15]`` in order ``IOI_ORDERS[i % 2]`` (ABBA and BABA alternate,
    so each template appears in both) with an indirect object IO, a subject S, a place and an object, e.g. BABA
    "Then, Mary and John went to the store. Mary gave a ring to" (IO John). The counterfactual is the ABC
    corruption: the same template and place and object with the three name slots (first, second, repeated subject)
    filled by three other distinct names, so it repeats no name and shares none with the base. Every name appears
    with a leading space; `TaskSpec.build` keeps only the names that are single tokens, so base and counterfactual
    tokenise to the same length.

    targets = (" " + IO, " " + S), sign +1: odds = p(S) / p(IO), so ``logit_difference`` is the drop of the
    IO-over-S logit difference, [logit(IO) - logit(S)]_base - [logit(IO) - logit(S)]_gated (log-probabilities
    differ from logits by the same normaliser), positive when patching in the counterfactual's activations lowers
    the preference for the indirect object, as in the IOI ablations.
    """
    names = list(dict.fromkeys(names))
    if len(names) < IOI_NAMES_PER_PAIR:
        raise ValueError(f"ioi needs at least {IOI_NAMES_PER_PAIR} distinct names, got {len(names)}")
    if n < 1:
        raise ValueError(f"ioi needs at least one prompt, got n={n}")
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        index, order = (i // 2) % len(IOI_TEMPLATES), IOI_ORDERS[i % 2]
        io, s, *new = rng.sample(names, IOI_NAMES_PER_PAIR)
        place, thing = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
        fill = IOI_TEMPLATES[index].format
        first, second = (io, s) if order == "ABBA" else (s, io)
        pairs.append(PromptPair(
            base=fill(first=first, second=second, S=s, place=place, object=thing),
            counterfactual=fill(first=new[0], second=new[1], S=new[2], place=place, object=thing),
            targets=(" " + io, " " + s), label=f"ioi-{i}-{order}-t{index}"))
    return pairs


def single_token_names(tokenizer, names=IOI_NAMES, needed: int = IOI_NAMES_PER_PAIR) -> tuple[str, ...]:
    """The names that `tokenizer` encodes with a leading space (as the IOI prompts hold them) as one token; refused
    when fewer than `needed` remain."""
    kept = tuple(name for name in names if len(tokenizer(" " + name, add_special_tokens=False)["input_ids"]) == 1)
    if len(kept) < needed:
        raise ValueError(f"ioi needs {needed} names that are single tokens with a leading space; this tokenizer "
                         f"keeps {len(kept)} of {len(names)}")
    return kept


@dataclasses.dataclass(frozen=True)
class IOIOptions(TaskOptions):
    task_seed: int = option(1234, "ioi: prompt generation seed")
    ioi_prompts: int = option(100, "ioi: prompts generated (ABBA and BABA alternating)")

    def check(self) -> None:
        check_positive(self, "ioi_prompts")

    def loader_options(self, tokenizer=None) -> dict:
        """With a tokenizer, only the names it encodes as single tokens (so base and counterfactual align)."""
        names = {} if tokenizer is None else {"names": single_token_names(tokenizer)}
        return {"n": self.ioi_prompts, "seed": self.task_seed, **names}


register(TaskKind("ioi", load_ioi, IOIOptions, default_metric="logit_difference", generated=True))
