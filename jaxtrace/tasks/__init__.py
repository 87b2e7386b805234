"""Tasks: the prompt pairs PGB-CT scores, and how they are loaded."""

from jaxtrace.tasks.data import (
    GENERATED_TASKS,
    TASK_LOADERS,
    PromptPair,
    load_binding,
    load_counterfact,
    load_custom,
    load_pairs,
    load_professions,
    load_winobias,
    load_winogender,
)
from jaxtrace.tasks.encode import EncodedTask, encode_pairs, pad_id_of

__all__ = [
    "EncodedTask",
    "encode_pairs",
    "pad_id_of",
    "PromptPair",
    "GENERATED_TASKS",
    "TASK_LOADERS",
    "load_binding",
    "load_counterfact",
    "load_custom",
    "load_pairs",
    "load_professions",
    "load_winobias",
    "load_winogender",
]
