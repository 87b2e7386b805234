"""Custom: prompt pairs from a JSONL file, one object a line."""

from __future__ import annotations

import json
from pathlib import Path

from jaxtrace.tasks.library.common import read_lines
from jaxtrace.tasks.pairs import PathLike, PromptPair
from jaxtrace.tasks.registry import TaskKind, register


_CUSTOM_REQUIRED = ("base", "counterfactual", "targets")
_CUSTOM_OPTIONAL = ("sign", "label", "subject")


def load_custom(path: PathLike) -> list[PromptPair]:
    """Pairs from a JSONL file: one object a line with keys base, counterfactual, targets (non-empty list of
    str) and optionally sign (1 or -1, default 1), label (str) and subject (a substring of base). Blank lines are
    ignored."""
    path = Path(path)
    pairs = []
    for number, line in read_lines(path):
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


register(TaskKind("custom", load_custom))
