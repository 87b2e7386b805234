"""Tests of jaxtrace.tasks.data against the public data files (expected values checked by hand in the files)."""

import json
import shutil
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from jaxtrace.tasks import (
    TASK_LOADERS,
    PromptPair,
    load_custom,
    load_pairs,
    load_professions,
    load_winobias,
    load_winogender,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared data not found at {DATA_DIR}")


def _by_label(pairs: list[PromptPair]) -> dict[str, PromptPair]:
    return {pair.label: pair for pair in pairs}


# ---------------------------------------------------------------------------------------------------------------
# PromptPair


def test_prompt_pair_is_frozen_and_validated():
    pair = PromptPair("a she", "a he", (" x",))
    assert (pair.sign, pair.label) == (1, "")
    with pytest.raises(FrozenInstanceError):
        pair.sign = -1
    with pytest.raises(ValueError, match="sign"):
        PromptPair("a", "b", (" x",), sign=0)
    with pytest.raises(ValueError, match="targets"):
        PromptPair("a", "b", ())
    with pytest.raises(TypeError, match="targets"):
        PromptPair("a", "b", [" x"])


# ---------------------------------------------------------------------------------------------------------------
# Winogender


@needs_data
def test_winogender_counts():
    pairs = load_winogender(DATA_DIR)
    assert len(pairs) == 44  # 88 data rows in the structure-filtered file
    assert len({pair.label for pair in pairs}) == 44  # each occupation appears in exactly one pair
    possessive = [pair for pair in pairs if pair.base.endswith(" her")]
    assert len(possessive) == 5  # 10 rows use $POSS_PRONOUN
    assert {pair.label for pair in possessive} == {"educator", "nurse", "planner", "surgeon", "chef"}
    assert all(pair.counterfactual.endswith(" his") for pair in possessive)
    nominative = [pair for pair in pairs if pair not in possessive]
    assert all(p.base.endswith(" she") and p.counterfactual.endswith(" he") for p in nominative)
    assert all(p.sign == 1 and len(p.targets) == 2 for p in pairs)


@needs_data
def test_winogender_technician_matches_reference():
    # technician: Bergsma 9.42% female, so c0 is the participant's continuation (answer 1).
    pair = load_winogender(DATA_DIR)[0]
    assert pair == PromptPair(
        base="The technician told the customer that she",
        counterfactual="The technician told the customer that he",
        targets=(" could pay with cash.", " had completed the repair."),
        label="technician",
    )


@needs_data
def test_winogender_possessive_fix_on_and_off():
    # nurse: Bergsma 88.31% female, so c0 is the occupation's continuation (answer 0).
    targets = (" shift would be ending in an hour.", " blood would be drawn in an hour.")
    fixed = _by_label(load_winogender(DATA_DIR))["nurse"]
    assert (fixed.base, fixed.counterfactual, fixed.targets) == (
        "The nurse notified the patient that her",
        "The nurse notified the patient that his",
        targets,
    )
    reference = _by_label(load_winogender(DATA_DIR, fix_possessive=False))["nurse"]
    assert (reference.base, reference.counterfactual, reference.targets) == (
        "The nurse notified the patient that she",
        "The nurse notified the patient that he",
        targets,
    )


@needs_data
def test_winogender_bls_orders_by_bls_percentage():
    bergsma = _by_label(load_winogender(DATA_DIR, stats="bergsma"))
    bls = _by_label(load_winogender(DATA_DIR, stats="bls"))
    # secretary: Bergsma 10.43% female, BLS 94.6% female.
    assert bergsma["secretary"].targets == (" could be issued a guest badge.", " could update the guest log.")
    assert bls["secretary"].targets == (" could update the guest log.", " could be issued a guest badge.")
    # technician is under 50% female in both columns (9.42 / 40.34).
    assert bls["technician"] == bergsma["technician"]
    # 13 of the 44 occupations fall on different sides of 50% in the two columns.
    flipped = [label for label in bergsma if bls[label].targets == bergsma[label].targets[::-1]]
    assert len(flipped) == 13
    assert all(bls[label].base == bergsma[label].base for label in bergsma)


def test_winogender_rejects_unknown_stats(tmp_path):
    with pytest.raises(ValueError, match="bergsma"):
        load_winogender(tmp_path, stats="census")


# ---------------------------------------------------------------------------------------------------------------
# WinoBias


@needs_data
@pytest.mark.parametrize(("split", "count", "possessive"), [("dev", 160, 6), ("test", 130, 5)])
def test_winobias_counts(split, count, possessive):
    pairs = load_winobias(DATA_DIR, split=split)
    assert len(pairs) == count
    assert sum(pair.base.endswith(" her") for pair in pairs) == possessive
    assert sum(pair.base.endswith(" she") for pair in pairs) == count - possessive
    assert [pair.label for pair in pairs] == [f"winobias-{split}-{i}" for i in range(count)]


@needs_data
def test_winobias_dev_first_pair_matches_reference():
    # Dev lines 1-2 differ in pronoun group and 3-4 in context, so lines 5-6 (mover / housekeeper) come first.
    assert load_winobias(DATA_DIR)[0] == PromptPair(
        base="The mover said thank you to the housekeeper because she",
        counterfactual="The mover said thank you to the housekeeper because he",
        targets=(" cleaned the truck.", " is grateful."),
        label="winobias-dev-0",
    )


@needs_data
def test_winobias_test_first_pair_has_female_line_first():
    # Test lines 1-2: the accountant (female list) line comes before the janitor (male list) line.
    pair = load_winobias(DATA_DIR, split="test")[0]
    assert pair.base == "The janitor reprimanded the accountant because she"
    assert pair.targets == (" made a mistake filing paperwork.", " got less allowance.")


@needs_data
def test_winobias_upper_case_ceo_is_matched():
    # Dev lines 23-24: "[The CEO] helped the nurse because [he] wanted to help." / "... [she] needed help."
    pairs = {pair.base: pair for pair in load_winobias(DATA_DIR)}
    assert pairs["The CEO helped the nurse because she"].targets == (" needed help.", " wanted to help.")


@needs_data
def test_winobias_possessive_fix_on_and_off():
    # Dev lines 171-172: "[The construction worker] asked the attendant to not lose [his] car." / "... [her] focus."
    context = "The construction worker asked the attendant to not lose"
    fixed = {pair.base: pair for pair in load_winobias(DATA_DIR)}[f"{context} her"]
    assert fixed.counterfactual == f"{context} his"
    assert fixed.targets == (" focus.", " car.")
    reference = {pair.base: pair for pair in load_winobias(DATA_DIR, fix_possessive=False)}
    assert f"{context} her" not in reference
    assert reference[f"{context} she"].counterfactual == f"{context} he"
    assert reference[f"{context} she"].targets == (" focus.", " car.")


def test_winobias_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="dev"):
        load_winobias(tmp_path, split="train")


# ---------------------------------------------------------------------------------------------------------------
# Professions


@needs_data
def test_professions_pairs_male_words_first():
    pairs = load_professions(DATA_DIR)
    assert len(pairs) == 17 * (130 + 29) == 2703
    male, female = pairs[: 17 * 130], pairs[17 * 130 :]
    assert all(p.sign == -1 and p.counterfactual.startswith("The woman ") for p in male)
    assert all(p.sign == 1 and p.counterfactual.startswith("The man ") for p in female)
    assert all(p.targets == (" she", " he") for p in pairs)
    # First template "The {} said that"; first male word "accountant", first female word "actress".
    assert (pairs[0].base, pairs[0].counterfactual) == ("The accountant said that", "The woman said that")
    assert (female[0].base, female[0].counterfactual) == ("The actress said that", "The man said that")
    # Within a gender, every word under the first template comes before the second template.
    assert pairs[130].base.startswith("The accountant yelled that")
    assert ("The nurse said that", "The man said that") in {(p.base, p.counterfactual) for p in female}
    # Last template "The {} yelled because".
    assert pairs[-1].base.endswith(" yelled because")


# ---------------------------------------------------------------------------------------------------------------
# Paths and file errors


@needs_data
@pytest.mark.parametrize(
    ("loader", "folder"),
    [(load_winogender, "winogender"), (load_winobias, "winobias"), (load_professions, "professions")],
)
def test_root_and_dataset_folder_are_both_accepted(loader, folder):
    from_root = loader(DATA_DIR)
    assert loader(DATA_DIR / folder) == from_root
    assert loader(str(DATA_DIR)) == from_root


@needs_data
def test_missing_file_is_named(tmp_path):
    shutil.copytree(DATA_DIR / "winobias", tmp_path / "winobias")
    missing = tmp_path / "winobias" / "male_occupations.txt"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="male_occupations.txt") as info:
        load_winobias(tmp_path)
    assert str(missing) in str(info.value)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="templates.txt"):
        load_professions(tmp_path / "nowhere")


@needs_data
def test_malformed_winogender_row_names_file_and_line(tmp_path):
    folder = tmp_path / "winogender"
    shutil.copytree(DATA_DIR / "winogender", folder)
    templates = folder / "winogender_templates_structurefilter.tsv"
    lines = templates.read_text().splitlines()
    lines[2] = lines[2].replace("$NOM_PRONOUN", "they")  # third line of the file: no placeholder left
    templates.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=f"{templates}:3"):
        load_winogender(tmp_path)


@needs_data
def test_malformed_professions_template_names_file_and_line(tmp_path):
    folder = tmp_path / "professions"
    shutil.copytree(DATA_DIR / "professions", folder)
    (folder / "templates.txt").write_text("The {} said that\nThe person said that\n")
    with pytest.raises(ValueError, match="templates.txt:2"):
        load_professions(folder)


# ---------------------------------------------------------------------------------------------------------------
# Custom JSONL

VALID_RECORD = {"base": "The nurse said that", "counterfactual": "The man said that", "targets": [" he", " she"]}


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_custom_happy_path(tmp_path):
    path = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            json.dumps(VALID_RECORD),
            "",
            json.dumps({**VALID_RECORD, "targets": [" x"], "sign": -1, "label": "second"}),
        ],
    )
    assert load_custom(path) == [
        PromptPair("The nurse said that", "The man said that", (" he", " she")),
        PromptPair("The nurse said that", "The man said that", (" x",), sign=-1, label="second"),
    ]
    assert load_pairs("custom", str(path)) == load_custom(path)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"base": "a",', "invalid JSON"),
        ('["a", "b"]', "JSON object"),
        (json.dumps({"base": "a", "targets": [" x"]}), "missing key"),
        (json.dumps({**VALID_RECORD, "target": [" x"]}), "unknown key"),
        (json.dumps({**VALID_RECORD, "base": 3}), "base"),
        (json.dumps({**VALID_RECORD, "targets": " he"}), "targets"),
        (json.dumps({**VALID_RECORD, "targets": [" he", 4]}), "targets"),
        (json.dumps({**VALID_RECORD, "targets": []}), "targets"),
        (json.dumps({**VALID_RECORD, "sign": 2}), "sign"),
        (json.dumps({**VALID_RECORD, "sign": True}), "sign"),
        (json.dumps({**VALID_RECORD, "label": 7}), "label"),
    ],
)
def test_custom_errors_name_the_line(tmp_path, bad_line, message):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [json.dumps(VALID_RECORD), bad_line])
    with pytest.raises(ValueError, match=message) as info:
        load_custom(path)
    assert f"{path}:2" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_custom_empty_file(tmp_path, content):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty"):
        load_custom(path)


def test_custom_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_custom(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names():
    assert set(TASK_LOADERS) == {"winogender", "winobias", "professions", "custom", "counterfact", "binding", "ioi"}


def test_unknown_task_lists_known_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'wino'") as info:
        load_pairs("wino", tmp_path)
    assert all(name in str(info.value) for name in TASK_LOADERS)


@needs_data
def test_load_pairs_passes_options():
    assert len(load_pairs("winobias", DATA_DIR, split="test")) == 130
    assert load_pairs("winogender", DATA_DIR, stats="bls") == load_winogender(DATA_DIR, stats="bls")


def test_load_pairs_rejects_empty_result(tmp_path):
    # Every pair is skipped by the "[him]" rule, so the loader itself returns no pairs.
    (tmp_path / "female_occupations.txt").write_text("nurse\n")
    (tmp_path / "male_occupations.txt").write_text("CEO\n")
    (tmp_path / "pro_stereotyped_type1.txt.dev").write_text(
        "1 [The CEO] thanked the nurse for helping [him].\n2 The CEO thanked [the nurse] because [she] helped.\n"
    )
    assert load_winobias(tmp_path) == []
    with pytest.raises(ValueError, match="no prompt pairs"):
        load_pairs("winobias", tmp_path)
