"""WinoBias: the pro-stereotyped type-1 pairs (dev: 160, test: 130), with the reference's skip rules."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal, NamedTuple

from jaxtrace.core.options import option
from jaxtrace.tasks.library.common import REFERENCE_PRONOUNS, dataset_dir, in_pairs, read_lines
from jaxtrace.tasks.pairs import Pairs, PathLike, PromptPair
from jaxtrace.tasks.registry import TaskKind, TaskOptions, register


class _WinobiasLine(NamedTuple):
    occupation: str  # the bracketed occupation, lower-cased
    context: str  # text before the bracketed pronoun, brackets removed, stripped
    pronouns: tuple[str, str]  # (female, male) of the bracketed pronoun's group
    continuation: str


_WINOBIAS_PRONOUN = re.compile(r"\[(she|he|her|his)\]")
_WINOBIAS_GROUPS = {"she": ("she", "he"), "he": ("she", "he"), "her": ("her", "his"), "his": ("her", "his")}


def _read_occupations(path: Path) -> list[str]:
    return [line.lower() for _, line in read_lines(path)]


def _parse_winobias_line(path: Path, number: int, line: str, occupations: list[str]) -> _WinobiasLine:
    where = f"{path}:{number}"
    _, _, sentence = line.partition(" ")  # drop the leading sentence number
    matches = [occupation for occupation in occupations if f"[the {occupation}]" in sentence.lower()]
    if len(matches) != 1:
        raise ValueError(f"{where}: expected one bracketed known occupation, found {matches}")
    pronouns = _WINOBIAS_PRONOUN.findall(sentence)
    if len(pronouns) != 1:
        raise ValueError(f"{where}: expected one bracketed she/he/her/his, found {pronouns}")
    before, after = sentence.split(f"[{pronouns[0]}]")
    continuation = after.strip()
    if "[" in after or not continuation:
        raise ValueError(f"{where}: expected a non-empty, bracket-free continuation after [{pronouns[0]}]")
    context = before.replace("[", "").replace("]", "").strip()
    return _WinobiasLine(matches[0], context, _WINOBIAS_GROUPS[pronouns[0]], continuation)


def load_winobias(
    data: PathLike, split: Literal["dev", "test"] = "dev", fix_possessive: bool = True
) -> list[PromptPair]:
    """Pro-stereotyped type-1 WinoBias pairs (dev: 160, test: 130), with the reference's skip rules.

    A line pair is skipped when either line lacks exactly two "[", when it contains "[him]", or when its two
    contexts or pronoun groups differ; the result (``Pairs``) lists those in ``dropped``. targets = (" " + female
    occupation's continuation, " " + male occupation's continuation); labels are "winobias-{split}-{index of the kept
    pair}".
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    folder = dataset_dir(data, "winobias")
    female_occupations = _read_occupations(folder / "female_occupations.txt")
    male_occupations = _read_occupations(folder / "male_occupations.txt")
    occupations = female_occupations + male_occupations
    path = folder / f"pro_stereotyped_type1.txt.{split}"
    pairs, dropped = [], []
    for (number1, line1), (number2, line2) in in_pairs(path, read_lines(path)):
        where = f"{path}:{number1}-{number2}"
        reason = _winobias_skip(((number1, line1), (number2, line2)))
        if reason is None:
            first = _parse_winobias_line(path, number1, line1, occupations)
            second = _parse_winobias_line(path, number2, line2, occupations)
            if first.context != second.context:
                reason = "the two lines' text before the pronoun differs"
            elif first.pronouns != second.pronouns:
                reason = f"the pronouns are of different kinds ({'/'.join(first.pronouns)} and " \
                         f"{'/'.join(second.pronouns)})"
        if reason is not None:
            dropped.append((where, reason))
            continue
        female_row, male_row = (first, second) if first.occupation in female_occupations else (second, first)
        if female_row.occupation not in female_occupations or male_row.occupation not in male_occupations:
            raise ValueError(
                f"{path}:{number1}-{number2}: expected one female and one male occupation, "
                f"got {first.occupation!r} and {second.occupation!r}"
            )
        female, male = first.pronouns if fix_possessive else REFERENCE_PRONOUNS
        pairs.append(
            PromptPair(
                base=f"{first.context} {female}",
                counterfactual=f"{first.context} {male}",
                targets=(" " + female_row.continuation, " " + male_row.continuation),
                label=f"winobias-{split}-{len(pairs)}",
            )
        )
    return Pairs(pairs, dropped)


def _winobias_skip(lines: tuple[tuple[int, str], ...]) -> str | None:
    """Why the reference's rules skip a WinoBias line pair (a line without exactly two bracketed spans, or with
    "[him]"), or None."""
    for number, line in lines:
        if line.count("[") != 2:
            return f"line {number} has {line.count('[')} '[' (expected 2: the occupation and the pronoun)"
        if "[him]" in line:
            return f"line {number} has [him] (the reference skips object pronouns)"
    return None


@dataclasses.dataclass(frozen=True)
class WinobiasOptions(TaskOptions):
    split: str = option("dev", "winobias split", choices=("dev", "test"))
    reference_pronouns: bool = option(False, "she/he even in possessive examples, as the reference (default: "
                                      "her/his)")

    def loader_options(self, tokenizer=None) -> dict:
        return {"split": self.split, "fix_possessive": not self.reference_pronouns}


register(TaskKind("winobias", load_winobias, WinobiasOptions))
