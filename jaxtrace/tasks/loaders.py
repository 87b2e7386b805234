"""The task loaders under their former module: each task now lives in its own module of `jaxtrace.tasks.library`
(its loader, options record and registration) and the registry in `jaxtrace.tasks.registry`; these names stay
importable from here."""

from jaxtrace.tasks.library.binding import BINDING_DESIDERATA, BINDING_TEMPLATE, load_binding
from jaxtrace.tasks.library.common import read_text
from jaxtrace.tasks.library.counterfact import load_counterfact
from jaxtrace.tasks.library.custom import load_custom
from jaxtrace.tasks.library.ioi import (
    IOI_NAMES,
    IOI_NAMES_PER_PAIR,
    IOI_OBJECTS,
    IOI_ORDERS,
    IOI_PLACES,
    IOI_TEMPLATES,
    load_ioi,
)
from jaxtrace.tasks.library.professions import load_professions
from jaxtrace.tasks.library.winobias import load_winobias
from jaxtrace.tasks.library.winogender import load_winogender
from jaxtrace.tasks.pairs import Pairs, PathLike, PromptPair
from jaxtrace.tasks.registry import GENERATED_TASKS, TASK_LOADERS, load_pairs

__all__ = [
    "BINDING_DESIDERATA", "BINDING_TEMPLATE", "GENERATED_TASKS", "IOI_NAMES", "IOI_NAMES_PER_PAIR", "IOI_OBJECTS",
    "IOI_ORDERS", "IOI_PLACES", "IOI_TEMPLATES", "Pairs", "PathLike", "PromptPair", "TASK_LOADERS", "load_binding",
    "load_counterfact", "load_custom", "load_ioi", "load_pairs", "load_professions", "load_winobias",
    "load_winogender", "read_text",
]
