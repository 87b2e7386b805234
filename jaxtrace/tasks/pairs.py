"""`PromptPair`, one (base, counterfactual) prompt pair, and `Pairs`, the pairs a loader read with the lines it left
out (standard library only)."""

from dataclasses import dataclass
from pathlib import Path

PathLike = str | Path


@dataclass(frozen=True)
class PromptPair:
    """One (base, counterfactual) prompt pair and what is scored on it."""

    base: str  # base prompt, e.g. "The mover said thank you to the housekeeper because she"
    counterfactual: str  # counterfactual prompt, e.g. "...because he"
    targets: tuple[str, ...]  # scored continuations/tokens, in the reference's order
    sign: int = 1  # IE = (odds_intervened / odds_base) ** sign - 1, odds = score(targets[1]) / score(targets[0])
    label: str = ""  # short human id, e.g. occupation or "winobias-dev-17"
    subject: str = ""  # the subject named in the base prompt, for subject-position interventions and noise
    keep: bool = False  # an invariance desideratum: the intervention should keep the base answer (targets[0])

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not isinstance(self.counterfactual, str):
            raise TypeError("PromptPair base and counterfactual must be str")
        for name in ("base", "counterfactual"):
            if not getattr(self, name).strip():
                raise ValueError(f"the {name} prompt is empty")
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) for t in self.targets):
            raise TypeError("PromptPair targets must be a tuple of str")
        if not self.targets or not all(self.targets):
            raise ValueError("PromptPair targets must hold at least one target, none of them empty")
        if type(self.sign) is not int or self.sign not in (1, -1):
            raise ValueError(f"PromptPair sign must be 1 or -1, got {self.sign!r}")
        if not isinstance(self.label, str):
            raise TypeError("PromptPair label must be str")
        if not isinstance(self.keep, bool):
            raise TypeError("PromptPair keep must be bool")
        if not isinstance(self.subject, str) or (self.subject and self.subject not in self.base):
            raise ValueError(f"PromptPair subject {self.subject!r} must be a substring of the base prompt")


class Pairs(list):
    """The prompt pairs a loader read (a list of ``PromptPair``) and, in ``dropped``, the lines it left out:
    ``("file:first-last", reason)`` for each line pair, in file order."""

    def __init__(self, pairs=(), dropped=()):
        super().__init__(pairs)
        self.dropped: tuple[tuple[str, str], ...] = tuple(dropped)

