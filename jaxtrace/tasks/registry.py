"""The task registry: each task's loader, options record, default metric and kind of counterfactual, in one place.

A task is a `TaskKind` made by `register` (the built-in tasks register themselves in `jaxtrace.tasks.library`,
one module each). Its options are a frozen `TaskOptions` dataclass whose fields are declared with
`jaxtrace.core.options.option`: `TaskSpec` takes every registered task's options as its own flat fields (the
command line's task flags), checks that only the task's own options leave their defaults, and hands them to the
task's record, which checks them and turns them into the loader's keyword arguments.

Two tasks may share an option (`--task-seed`, `--reference-pronouns`) when they declare it alike: the same type,
default, choices and parsing, and the same help, or helps that differ only in their "task: " prefix (merged into
"binding, ioi: ...").
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from jaxtrace.core.options import option
from jaxtrace.tasks.pairs import Pairs, PathLike, PromptPair

if TYPE_CHECKING:
    from jaxtrace.tasks.encode import Noise


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of an option field, e.g. "--per-digit"."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """A task's options (subclass it as a frozen dataclass of `option` fields; this base has none).

    On construction each field with choices is checked, then `check` (override it for the task's own checks, with
    one-line messages naming the flag). `loader_options` gives the loader's keyword arguments (default: every field
    by its name); a task whose counterfactual is noise overrides `noise`."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            choices, value = field.metadata.get("choices"), getattr(self, field.name)
            if choices and value not in choices:
                raise ValueError(f"{flag_of(field)} must be one of {', '.join(choices)}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Raise ValueError on values the task refuses."""

    def loader_options(self, tokenizer=None) -> dict:
        """The keyword arguments of the task's loader; `tokenizer` is the one the pairs will be encoded with (None
        when the pairs are loaded without one)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def noise(self) -> Noise | None:
        """The noise that corrupts the base prompt (tasks whose counterfactual is noise)."""
        return None


@dataclasses.dataclass(frozen=True)
class TaskKind:
    """A registered task: its name, loader `loader(data, **options.loader_options(tokenizer))` returning prompt
    pairs, options record, the metric it is scored with unless told otherwise, whether it is generated (needs no
    data) and whether its counterfactual is the base prompt with noisy embeddings (its options' `noise()`)."""

    name: str
    loader: Callable[..., Sequence[PromptPair]]
    options: type[TaskOptions] = TaskOptions
    default_metric: str = "probability_ratio"
    generated: bool = False
    noise: bool = False

    def __post_init__(self):
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"a task name must be an identifier, got {self.name!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, TaskOptions)
                and dataclasses.is_dataclass(self.options) and self.options.__dataclass_params__.frozen):
            raise TypeError(f"task {self.name!r}: options must be a frozen dataclass subclassing TaskOptions")
        if self.noise and self.options.noise is TaskOptions.noise:
            raise TypeError(f"task {self.name!r}: a noise task's options must define noise()")
        if not isinstance(self.default_metric, str) or not self.default_metric:
            raise ValueError(f"task {self.name!r}: default_metric must be a metric name")

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(self.options))


_TASKS: dict[str, TaskKind] = {}
_LOADERS: dict[str, Callable[..., Sequence[PromptPair]]] = {}
_SEALED: frozenset[str] | None = None  # the option names TaskSpec has, once it is built
SPEC_FIELDS = ("task", "data", "positions")  # TaskSpec's own fields: no task option may take these names

TASKS: typing.Mapping[str, TaskKind] = MappingProxyType(_TASKS)  # name -> TaskKind, in registration order
TASK_LOADERS: typing.Mapping[str, Callable[..., Sequence[PromptPair]]] = MappingProxyType(_LOADERS)  # name -> loader


class TaskNames(Sequence):
    """A live, read-only tuple of the names of the registered tasks that pass `test`."""

    def __init__(self, test: Callable[[TaskKind], bool]):
        self._test = test

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, kind in _TASKS.items() if self._test(kind))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and self._names() == tuple(other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


GENERATED_TASKS = TaskNames(lambda kind: kind.generated)  # tasks that need no --data
NOISE_TASKS = TaskNames(lambda kind: kind.noise)  # tasks whose counterfactual is the base prompt with noisy embeddings


@dataclasses.dataclass(frozen=True)
class Declared:
    """One task option as the registered tasks declare it (merged over the tasks that share it)."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    parse: Callable[[str], Any] | None
    flag: str | None
    tasks: tuple[str, ...]  # the tasks that take it, sorted

    def field(self) -> dataclasses.Field:
        """A fresh `option` field declaring it (for `TaskSpec`)."""
        return option(self.default, self.help, choices=self.choices, parse=self.parse, tasks=self.tasks,
                      flag=self.flag)


def _merged_help(helps: dict[str, str]) -> str | None:
    """One help for an option several tasks declare: theirs if equal; "a, b: text" if each is "its task: text"."""
    if len(set(helps.values())) == 1:
        return next(iter(helps.values()))
    rests = {text.removeprefix(f"{task}: ") for task, text in helps.items()}
    if len(rests) == 1 and all(text.startswith(f"{task}: ") for task, text in helps.items()):
        return f"{', '.join(sorted(helps))}: {rests.pop()}"
    return None


def _declarations(kinds) -> dict[str, Declared]:
    """Every option of `kinds`, in order of first declaration; ValueError where tasks declare one differently."""
    seen: dict[str, tuple[Declared, dict[str, str]]] = {}
    for kind in kinds:
        hints = typing.get_type_hints(kind.options)
        for field in dataclasses.fields(kind.options):
            if field.name in SPEC_FIELDS:
                raise ValueError(f"task {kind.name!r}: option {field.name!r} is a TaskSpec field of every task")
            if field.default is dataclasses.MISSING or "help" not in field.metadata:
                raise ValueError(f"task {kind.name!r}: declare option {field.name!r} with "
                                 f"jaxtrace.core.options.option(default, help)")
            mine = Declared(field.name, hints[field.name], field.default, field.metadata["help"],
                            field.metadata.get("choices"), field.metadata.get("parse"), field.metadata.get("flag"),
                            (kind.name,))
            if field.name not in seen:
                seen[field.name] = (mine, {kind.name: mine.help})
                continue
            first, helps = seen[field.name]
            helps = {**helps, kind.name: mine.help}
            merged = _merged_help(helps)
            how = ("type", "default", "choices", "parse", "flag")
            differ = [name for name in how if getattr(first, name) != getattr(mine, name)]
            if differ or merged is None:
                raise ValueError(f"task {kind.name!r} declares option {flag_of(field)} unlike "
                                 f"{', '.join(first.tasks)} ({', '.join(differ or ['help'])} differ)")
            seen[field.name] = (dataclasses.replace(first, help=merged, tasks=tuple(sorted(first.tasks + mine.tasks))),
                                helps)
    return {name: declared for name, (declared, _) in seen.items()}


def register(kind: TaskKind) -> TaskKind:
    """Add a task (refused if its name is taken or it declares a shared option differently). `TaskSpec` takes the
    options registered when `jaxtrace.tasks` is first imported; a task registered later may only use option names it
    already has."""
    if kind.name in _TASKS:
        raise ValueError(f"task {kind.name!r} is already registered")
    _declarations([*_TASKS.values(), kind])
    if _SEALED is not None:
        new = [name for name in kind.option_names if name not in _SEALED]
        if new:
            raise ValueError(f"task {kind.name!r} declares option(s) {', '.join(new)} that TaskSpec lacks: TaskSpec's "
                             f"fields are fixed when jaxtrace.tasks is imported, so register the task in "
                             f"jaxtrace/tasks/library/__init__.py")
    _TASKS[kind.name] = kind
    _LOADERS[kind.name] = kind.loader
    return kind


def unregister(name: str) -> TaskKind:
    """Remove a task and return it."""
    kind = task_kind(name)
    del _TASKS[name], _LOADERS[name]
    return kind


def task_kind(name: str) -> TaskKind:
    """The registered task called `name`."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(_TASKS)}")
    return _TASKS[name]


def tasks_with_option(name: str) -> tuple[str, ...]:
    """The registered tasks that take option `name`, sorted."""
    return tuple(sorted(task for task, kind in _TASKS.items() if name in kind.option_names))


def spec_options() -> dict[str, Declared]:
    """Every registered task option, merged, in order of first declaration; from now on a task registered may use
    only these option names (`TaskSpec` is built from them)."""
    global _SEALED
    declared = _declarations(_TASKS.values())
    _SEALED = frozenset(declared)
    return declared


def load_pairs(task: str, data: PathLike | None, **options: object) -> Pairs:
    """Load the pairs of a registered task; ``options`` go to its loader (e.g. ``split="test"``)."""
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(_TASKS)}")
    kind = _TASKS[task]
    if data is None and not kind.generated:
        raise ValueError(f"task {task!r} reads its pairs from files: give the data path (CLI: --data)")
    pairs = kind.loader(data, **options)
    if not pairs:
        dropped = getattr(pairs, "dropped", ())
        why = f" (all {len(dropped)} line pairs dropped, e.g. {dropped[0][0]}: {dropped[0][1]})" if dropped else ""
        raise ValueError(f"task {task!r} produced no prompt pairs from {data}{why}")
    return pairs if isinstance(pairs, Pairs) else Pairs(pairs)
