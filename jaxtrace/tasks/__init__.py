"""Tasks: the prompt pairs PGB-CT scores, how they are loaded and tokenised, and the `TaskSpec` that builds them.

Each task is registered once (`jaxtrace.tasks.registry`: its loader, options record, default metric, whether it is
generated and whether its counterfactual is noise); the built-in tasks live in `jaxtrace.tasks.library`, one module
each.
"""

from jaxtrace.tasks.encode import EncodedTask, Noise, TaskArrays, encode_pairs, pad_id_of
from jaxtrace.tasks.library.binding import load_binding
from jaxtrace.tasks.library.counterfact import load_counterfact
from jaxtrace.tasks.library.custom import load_custom
from jaxtrace.tasks.library.ioi import IOI_NAMES, load_ioi
from jaxtrace.tasks.library.professions import load_professions
from jaxtrace.tasks.library.winobias import load_winobias
from jaxtrace.tasks.library.winogender import load_winogender
from jaxtrace.tasks.pairs import Pairs, PromptPair
from jaxtrace.tasks.registry import (
    GENERATED_TASKS,
    TASK_LOADERS,
    TASKS,
    TaskKind,
    TaskOptions,
    load_pairs,
    register,
    task_kind,
    unregister,
)
from jaxtrace.tasks.spec import TaskSpec, build_task, task_digest

__all__ = [
    "EncodedTask",
    "GENERATED_TASKS",
    "IOI_NAMES",
    "Noise",
    "Pairs",
    "PromptPair",
    "TASKS",
    "TASK_LOADERS",
    "TaskArrays",
    "TaskKind",
    "TaskOptions",
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
    "register",
    "task_digest",
    "task_kind",
    "unregister",
]
