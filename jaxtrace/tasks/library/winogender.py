"""Winogender: the 44 structure-filtered pairs, base "she", counterfactual "he" (or "her"/"his")."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, NamedTuple

from jaxtrace.core.options import option
from jaxtrace.tasks.library.common import REFERENCE_PRONOUNS, dataset_dir, in_pairs, read_lines
from jaxtrace.tasks.pairs import PathLike, PromptPair
from jaxtrace.tasks.registry import TaskKind, TaskOptions, register


class _WinogenderRow(NamedTuple):
    occupation: str
    context: str  # text before the pronoun, placeholders filled, trailing space kept
    pronouns: tuple[str, str]  # (female, male)
    continuation: str
    answer: int  # 0: the pronoun refers to the occupation, 1: to the participant


_WINOGENDER_PLACEHOLDERS = {"$NOM_PRONOUN": ("she", "he"), "$POSS_PRONOUN": ("her", "his")}


def _parse_winogender_row(path: Path, number: int, line: str) -> _WinogenderRow:
    where = f"{path}:{number}"
    fields = line.split("\t")
    if len(fields) != 4:
        raise ValueError(f"{where}: expected 4 tab-separated fields, got {len(fields)}")
    occupation, participant, answer, sentence = fields
    if answer not in ("0", "1"):
        raise ValueError(f"{where}: answer must be 0 or 1, got {answer!r}")
    found = [placeholder for placeholder in _WINOGENDER_PLACEHOLDERS if placeholder in sentence]
    if len(found) != 1 or sentence.count(found[0]) != 1:
        raise ValueError(f"{where}: expected exactly one $NOM_PRONOUN or $POSS_PRONOUN in {sentence!r}")
    before, after = sentence.split(found[0])
    context = before.replace("$OCCUPATION", occupation).replace("$PARTICIPANT", participant)
    continuation = after.strip()
    if "$" in context or not context.strip() or not continuation:
        raise ValueError(f"{where}: cannot split {sentence!r} into a context and a continuation")
    return _WinogenderRow(occupation, context, _WINOGENDER_PLACEHOLDERS[found[0]], continuation, int(answer))


def _read_pct_female(path: Path, stats: str) -> dict[str, float]:
    """Occupation -> percent female, from the ``{stats}_pct_female`` column of the stats TSV."""
    lines = read_lines(path)
    column_name = f"{stats}_pct_female"
    header = lines[0][1].split("\t") if lines else []
    if column_name not in header:
        raise ValueError(f"{path}:1: header has no {column_name!r} column")
    column = header.index(column_name)
    pct_female = {}
    for number, line in lines[1:]:
        fields = line.split("\t")
        try:
            pct_female[fields[0]] = float(fields[column])
        except (IndexError, ValueError) as err:
            raise ValueError(f"{path}:{number}: cannot read {column_name} ({err})") from err
    return pct_female


def load_winogender(
    data: PathLike, stats: Literal["bergsma", "bls"] = "bergsma", fix_possessive: bool = True
) -> list[PromptPair]:
    """The 44 structure-filtered Winogender pairs: base "she", counterfactual "he" (or "her"/"his").

    targets = (" " + female-associated continuation, " " + male-associated continuation): the occupation's
    continuation is female-associated when the occupation's ``stats`` percentage of women exceeds 50.
    """
    if stats not in ("bergsma", "bls"):
        raise ValueError(f"stats must be 'bergsma' or 'bls', got {stats!r}")
    folder = dataset_dir(data, "winogender")
    stats_path = folder / "winogender_occupation_stats.tsv"
    pct_female = _read_pct_female(stats_path, stats)
    path = folder / "winogender_templates_structurefilter.tsv"
    pairs = []
    for (number1, line1), (number2, line2) in in_pairs(path, read_lines(path)[1:]):  # [1:]: header
        first = _parse_winogender_row(path, number1, line1)
        second = _parse_winogender_row(path, number2, line2)
        where = f"{path}:{number1}-{number2}"
        if (first.occupation, first.context, first.pronouns) != (second.occupation, second.context, second.pronouns):
            raise ValueError(f"{where}: paired rows must share the occupation and the text before the pronoun")
        if {first.answer, second.answer} != {0, 1}:
            raise ValueError(f"{where}: paired rows must have answers 0 and 1")
        if first.occupation not in pct_female:
            raise ValueError(f"{where}: occupation {first.occupation!r} is missing from {stats_path}")
        occupation_row, participant_row = (first, second) if first.answer == 0 else (second, first)
        if pct_female[first.occupation] > 50:
            female_row, male_row = occupation_row, participant_row
        else:
            female_row, male_row = participant_row, occupation_row
        female, male = first.pronouns if fix_possessive else REFERENCE_PRONOUNS
        pairs.append(
            PromptPair(
                base=first.context + female,
                counterfactual=first.context + male,
                targets=(" " + female_row.continuation, " " + male_row.continuation),
                label=first.occupation,
            )
        )
    return pairs


@dataclasses.dataclass(frozen=True)
class WinogenderOptions(TaskOptions):
    stats: str = option("bergsma", "winogender occupation statistics", choices=("bergsma", "bls"))
    reference_pronouns: bool = option(False, "she/he even in possessive examples, as the reference (default: "
                                      "her/his)")

    def loader_options(self, tokenizer=None) -> dict:
        return {"stats": self.stats, "fix_possessive": not self.reference_pronouns}


register(TaskKind("winogender", load_winogender, WinogenderOptions))
