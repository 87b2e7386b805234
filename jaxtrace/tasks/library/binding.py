"""Variable binding: generated arithmetic pairs (reference §7), value switches and task switches."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from jaxtrace.core.options import option
from jaxtrace.tasks.library.common import check_positive, comma_tuple, int_range
from jaxtrace.tasks.pairs import PathLike, PromptPair
from jaxtrace.tasks.registry import TaskKind, TaskOptions, register


BINDING_TEMPLATE = "x = {x}\ny = {y}\nx {op} y = "
BINDING_DESIDERATA = ("value", "task")


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y


def load_binding(data: PathLike | None = None, operands: tuple[int, int] = (10, 99), per_digit: int = 5,
                 seed: int = 1234, desiderata: Sequence[str] = BINDING_DESIDERATA,
                 template: str = BINDING_TEMPLATE) -> list[PromptPair]:
    """Variable-binding arithmetic pairs (reference §7), generated with a seeded ``random.Random``; ``data`` unused.

    Base prompts ``"x = {x}\ny = {y}\nx {op} y = "`` with x, y drawn from ``operands`` (inclusive), op in {+, -},
    non-negative answers, balanced by the answer's first digit (``per_digit`` pairs for each of 1..9 per
    desideratum). Targets are (base answer, counterfactual answer) as digit strings, the answers' first digits
    different so that the first answer token tells them apart.

    - ``value`` (value switch): the counterfactual changes x (same digit count); patching the circuit should move
      the answer to the counterfactual's (``keep=False``).
    - ``task`` (task switch): the counterfactual swaps the operator; patching should keep the base answer
      (``keep=True``).
    """
    low, high = operands
    if not 0 <= low <= high:
        raise ValueError(f"operands must be a range 0 <= low <= high, got {operands}")
    unknown = set(desiderata) - set(BINDING_DESIDERATA)
    if unknown or not desiderata:
        raise ValueError(f"desiderata must be among {BINDING_DESIDERATA}, got {list(desiderata)}")
    rng = random.Random(seed)
    pairs = []
    for desideratum in desiderata:
        for digit in "123456789":
            found, tries = 0, 0
            while found < per_digit:
                tries += 1
                if tries > 100_000:
                    raise ValueError(f"operands {low}..{high} give no {desideratum}-switch pair with an answer "
                                     f"starting with {digit}; widen --operands or lower --per-digit")
                x, y, op = rng.randint(low, high), rng.randint(low, high), rng.choice("+-")
                answer = _apply(op, x, y)
                if answer < 0 or str(answer)[0] != digit:
                    continue
                if desideratum == "value":
                    x_cf, op_cf = rng.randint(low, high), op
                    if len(str(x_cf)) != len(str(x)):
                        continue
                else:
                    x_cf, op_cf = x, "-" if op == "+" else "+"
                answer_cf = _apply(op_cf, x_cf, y)
                if answer_cf < 0 or str(answer_cf)[0] == digit:
                    continue
                found += 1
                pairs.append(PromptPair(
                    base=template.format(x=x, y=y, op=op), counterfactual=template.format(x=x_cf, y=y, op=op_cf),
                    targets=(str(answer), str(answer_cf)), label=f"{desideratum}-{digit}-{found}",
                    keep=desideratum == "task"))
    return pairs


@dataclasses.dataclass(frozen=True)
class BindingOptions(TaskOptions):
    operands: tuple[int, int] = option((10, 99), "binding: operand range LOW-HIGH (the reference's 10-99; small "
                                       "models: 1-9)", parse=int_range)
    per_digit: int = option(5, "binding: pairs per answer first digit and desideratum")
    desiderata: tuple[str, ...] = option(("value", "task"), "binding: value and/or task switch pairs",
                                         parse=comma_tuple)
    task_seed: int = option(1234, "binding: prompt generation seed")

    def check(self) -> None:
        check_positive(self, "per_digit")
        low, high = self.operands
        if not 0 <= low <= high:
            raise ValueError(f"--operands takes a range LOW-HIGH with 0 <= LOW <= HIGH, got {low}-{high}")

    def loader_options(self, tokenizer=None) -> dict:
        return {"operands": self.operands, "per_digit": self.per_digit, "seed": self.task_seed,
                "desiderata": self.desiderata}


register(TaskKind("binding", load_binding, BindingOptions, default_metric="accuracy", generated=True))
