"""Prompt pairs for the PGB-CT tasks, read from the public data files (standard library only).

Each loader returns ``PromptPair`` objects in the order the PyTorch reference
(``ZiruiYan/multi-component-causal-tracing``, ``datasets/*.py`` and the ``train_*.py`` scripts) builds them.
``data`` may be the root folder holding ``winogender/``, ``winobias/`` and ``professions/``, or the dataset
folder itself.

Deliberate differences from the reference:

- Possessive slots. The reference always substitutes "she"/"he", even where the pronoun is possessive, giving
  e.g. "The nurse notified the patient that she" + " shift would be ending in an hour." (5 Winogender, 6
  WinoBias-dev and 5 WinoBias-test pairs). With ``fix_possessive=True`` (the default) those pairs use
  "her"/"his"; ``fix_possessive=False`` reproduces the reference.
- Winogender ``stats="bls"`` works: it orders the continuations by ``bls_pct_female`` just as ``"bergsma"`` does
  by ``bergsma_pct_female`` (the reference crashes on a misspelled attribute).
- Malformed input raises ``FileNotFoundError``/``ValueError`` naming the file and line, instead of asserting.
- Nothing is dropped silently: ``load_pairs`` (and ``load_winobias``) return ``Pairs``, a list that also holds, in
  ``dropped``, every line pair the reference's skip rules leave out, with its file, line numbers and reason (38
  WinoBias dev pairs, 68 test pairs); the other loaders drop nothing (a line they cannot read is an error).
- Empty prompts and bytes that are not UTF-8 are errors naming the file and line.
"""

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

PathLike = str | Path

# The pronouns the reference substitutes into every attention example, possessive or not.
_REFERENCE_PRONOUNS = ("she", "he")


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


def _dataset_dir(data: PathLike, name: str) -> Path:
    """``data/name`` when ``data`` is the root holding the dataset folders, else ``data`` itself."""
    data = Path(data)
    return data / name if (data / name).is_dir() else data


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; bytes that are not UTF-8 are a ValueError naming the file, line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})") from None


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file, stripped, with their 1-based line numbers."""
    lines = read_text(path).splitlines()
    return [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]


def _in_pairs(path: Path, rows: list[tuple[int, str]]) -> list[tuple[tuple[int, str], tuple[int, str]]]:
    """Consecutive rows grouped two by two; an odd count is an error."""
    if len(rows) % 2:
        raise ValueError(f"{path}: expected rows in consecutive pairs, got an odd number ({len(rows)})")
    return list(zip(rows[0::2], rows[1::2]))


# ---------------------------------------------------------------------------------------------------------------
# Winogender


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
    lines = _read_lines(path)
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
    folder = _dataset_dir(data, "winogender")
    stats_path = folder / "winogender_occupation_stats.tsv"
    pct_female = _read_pct_female(stats_path, stats)
    path = folder / "winogender_templates_structurefilter.tsv"
    pairs = []
    for (number1, line1), (number2, line2) in _in_pairs(path, _read_lines(path)[1:]):  # [1:]: header
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
        female, male = first.pronouns if fix_possessive else _REFERENCE_PRONOUNS
        pairs.append(
            PromptPair(
                base=first.context + female,
                counterfactual=first.context + male,
                targets=(" " + female_row.continuation, " " + male_row.continuation),
                label=first.occupation,
            )
        )
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# WinoBias


class _WinobiasLine(NamedTuple):
    occupation: str  # the bracketed occupation, lower-cased
    context: str  # text before the bracketed pronoun, brackets removed, stripped
    pronouns: tuple[str, str]  # (female, male) of the bracketed pronoun's group
    continuation: str


_WINOBIAS_PRONOUN = re.compile(r"\[(she|he|her|his)\]")
_WINOBIAS_GROUPS = {"she": ("she", "he"), "he": ("she", "he"), "her": ("her", "his"), "his": ("her", "his")}


def _read_occupations(path: Path) -> list[str]:
    return [line.lower() for _, line in _read_lines(path)]


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
    folder = _dataset_dir(data, "winobias")
    female_occupations = _read_occupations(folder / "female_occupations.txt")
    male_occupations = _read_occupations(folder / "male_occupations.txt")
    occupations = female_occupations + male_occupations
    path = folder / f"pro_stereotyped_type1.txt.{split}"
    pairs, dropped = [], []
    for (number1, line1), (number2, line2) in _in_pairs(path, _read_lines(path)):
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
        female, male = first.pronouns if fix_possessive else _REFERENCE_PRONOUNS
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


# ---------------------------------------------------------------------------------------------------------------
# Professions


def load_professions(data: PathLike) -> list[PromptPair]:
    """Professions template pairs: every male word under every template, then every female word.

    Male word w: base t.format(w), counterfactual t.format("woman"), sign -1. Female word w: counterfactual
    t.format("man"), sign +1. targets = (" she", " he"), so odds = p(he)/p(she) as in the reference. Labels are
    "{word}/t{template index}".
    """
    folder = _dataset_dir(data, "professions")
    path = folder / "templates.txt"
    templates = _read_lines(path)
    for number, template in templates:
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise ValueError(f"{path}:{number}: template must contain exactly one '{{}}' and no other braces")
    male_words = [word for _, word in _read_lines(folder / "male_occupations.txt")]
    female_words = [word for _, word in _read_lines(folder / "female_occupations.txt")]
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


# ---------------------------------------------------------------------------------------------------------------
# Custom JSONL

_CUSTOM_REQUIRED = ("base", "counterfactual", "targets")
_CUSTOM_OPTIONAL = ("sign", "label", "subject")


def load_custom(path: PathLike) -> list[PromptPair]:
    """Pairs from a JSONL file: one object a line with keys base, counterfactual, targets (non-empty list of
    str) and optionally sign (1 or -1, default 1), label (str) and subject (a substring of base). Blank lines are
    ignored."""
    path = Path(path)
    pairs = []
    for number, line in _read_lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in _CUSTOM_REQUIRED if key not in record]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        unknown = sorted(set(record) - set(_CUSTOM_REQUIRED) - set(_CUSTOM_OPTIONAL))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {_CUSTOM_REQUIRED + _CUSTOM_OPTIONAL}")
        if not isinstance(record["targets"], list):
            raise ValueError(f"{where}: 'targets' must be a list of strings")
        try:
            pairs.append(
                PromptPair(
                    base=record["base"],
                    counterfactual=record["counterfactual"],
                    targets=tuple(record["targets"]),
                    sign=record.get("sign", 1),
                    label=record.get("label", ""),
                    subject=record.get("subject", ""),
                )
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
    if not pairs:
        raise ValueError(f"{path}: no prompt pairs (the file is empty)")
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# CounterFact


def load_counterfact(data: PathLike, limit: int | None = None, leading_space: bool = True) -> list[PromptPair]:
    """Factual-recall pairs from ROME's public ``counterfact.json`` (a JSON list of records with
    ``requested_rewrite.{prompt, subject, target_true.str}``); ``data`` is the file or a folder holding it.

    The base prompt is ``prompt.format(subject)``; the counterfactual is the same prompt, corrupted by noise on its
    input embeddings (see ``EncodedTask.corruption``). The single target is the true object, with a leading space
    as ROME scores it (``leading_space=False`` reproduces the reference, bug #7). ``limit`` keeps the first records.
    """
    path = Path(data)
    if path.is_dir():
        path = path / "counterfact.json"
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of CounterFact records")
    pairs = []
    for number, record in enumerate(records[:limit]):
        try:
            rewrite = record["requested_rewrite"]
            prompt, subject, target = rewrite["prompt"], rewrite["subject"], rewrite["target_true"]["str"]
            base = prompt.format(subject)
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path}: record {number} lacks requested_rewrite.prompt/subject/target_true.str "
                             f"({err!r})") from err
        label = str(record.get("case_id", number))
        pairs.append(PromptPair(base=base, counterfactual=base, targets=((" " if leading_space else "") + target,),
                                label=label, subject=subject))
    if not pairs:
        raise ValueError(f"{path}: no CounterFact records")
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Variable binding


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


# ---------------------------------------------------------------------------------------------------------------
# Indirect object identification


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


# ---------------------------------------------------------------------------------------------------------------
# Registry

TASK_LOADERS: dict[str, Callable[..., list[PromptPair]]] = {
    "winogender": load_winogender,
    "winobias": load_winobias,
    "professions": load_professions,
    "custom": load_custom,
    "counterfact": load_counterfact,
    "binding": load_binding,
    "ioi": load_ioi,
}
GENERATED_TASKS = ("binding", "ioi")  # tasks that need no --data


def load_pairs(task: str, data: PathLike | None, **options: object) -> Pairs:
    """Load the pairs of a registered task; ``options`` go to its loader (e.g. ``split="test"``)."""
    if task not in TASK_LOADERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASK_LOADERS)}")
    if data is None and task not in GENERATED_TASKS:
        raise ValueError(f"task {task!r} reads its pairs from files: give the data path (CLI: --data)")
    pairs = TASK_LOADERS[task](data, **options)
    if not pairs:
        dropped = getattr(pairs, "dropped", ())
        why = f" (all {len(dropped)} line pairs dropped, e.g. {dropped[0][0]}: {dropped[0][1]})" if dropped else ""
        raise ValueError(f"task {task!r} produced no prompt pairs from {data}{why}")
    return pairs if isinstance(pairs, Pairs) else Pairs(pairs)
