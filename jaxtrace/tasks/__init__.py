"""Tasks: the prompt pairs PGB-CT scores, how they are loaded and tokenised, and the `TaskSpec` that builds them."""

from jaxtrace.tasks.encode import EncodedTask, Noise, TaskArrays, encode_pairs, pad_id_of
from jaxtrace.tasks.loaders import (
    GENERATED_TASKS,
    TASK_LOADERS,
    Pairs,
    PromptPair,
    load_binding,
    load_counterfact,
    load_custom,
    load_ioi,
    load_pairs,
    load_professions,
    load_winobias,
    load_winogender,
)
from jaxtrace.tasks.spec import TaskSpec, build_task, task_digest

__all__ = [
    "EncodedTask",
    "GENERATED_TASKS",
    "Noise",
    "Pairs",
    "PromptPair",
    "TASK_LOADERS",
    "TaskArrays",
    "TaskSpec",
    "build_task",
    "encode_pairs",
    "load_binding",
    "load_counterfact",
    "load_custom",
    "load_ioi",
    "load_pairs",
    "load_professions",
    "load_winobias",
    "load_winogender",
    "pad_id_of",
    "task_digest",
]
