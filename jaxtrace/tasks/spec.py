"""`TaskSpec`: everything that builds a task's encoded pairs, as one frozen record.

The record is what the command line sets (`--task`, `--data`, and the task's own options), what a result folder
stores (`circuit.json`'s "task", "data" and "task_options"), what a resumed run is compared with and what
`evaluate --circuit` rebuilds the task from.

Its fields are `task`, `data` and `positions`, and every registered task's options (`jaxtrace.tasks.registry`),
taken from the tasks' options records when this module is imported; the task's own record checks them and makes
its loader's arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from jaxtrace.core.options import option
from jaxtrace.tasks import library  # noqa: F401  (registers the built-in tasks before TaskSpec takes their options)
from jaxtrace.tasks.encode import POSITIONS, EncodedTask, Noise, encode_pairs
from jaxtrace.tasks.library.common import comma_tuple, int_range  # noqa: F401  (importable from here as before)
from jaxtrace.tasks.library.ioi import single_token_names  # noqa: F401  (importable from here as before)
from jaxtrace.tasks.registry import (
    TASK_LOADERS,
    TaskKind,
    TaskOptions,
    flag_of,
    load_pairs,
    spec_options,
    task_kind,
    tasks_with_option,
)

# The order of TaskSpec's fields, hence of the task flags in `--help`: as it has always been. The options of tasks
# not named here follow, in registration order.
FIELD_ORDER = ("task", "data", "split", "stats", "reference_pronouns", "limit", "operands", "per_digit", "desiderata",
               "task_seed", "ioi_prompts", "positions", "noise_on", "noise_std", "noise_scale", "noise_seed")


def _with_task_options(cls):
    """`cls` (declaring TaskSpec's own fields) as a frozen dataclass with every registered task option as a field
    too, declared as the tasks declare it (`option`'s `tasks`: the tasks that take it)."""
    own = dict(cls.__dict__.get("__annotations__", {}))
    declared = spec_options()
    names = [name for name in FIELD_ORDER if name in own or name in declared]
    names += [name for name in [*own, *declared] if name not in names]
    annotations = {}
    for name in names:
        if name in own:
            annotations[name] = own[name]
        else:
            annotations[name] = declared[name].type
            setattr(cls, name, declared[name].field())
    cls.__annotations__ = annotations
    return dataclasses.dataclass(frozen=True)(cls)


@_with_task_options
class TaskSpec:
    """A task, its data and its options; options of other tasks must keep their defaults.

    Besides the fields below, every registered task's options are fields (`split`, `stats`, `reference_pronouns`,
    `limit`, `operands`, `per_digit`, `desiderata`, `task_seed`, `ioi_prompts`, `noise_on`, `noise_std`,
    `noise_scale`, `noise_seed` for the built-in tasks)."""

    task: str = option(None, "the task", choices=tuple(TASK_LOADERS))
    data: str | None = option(None, "data folder (the file for custom and counterfact); generated tasks need none")
    positions: str = option("prompt", "where gates apply: every prompt token, the last, or the subject's tokens",
                            choices=POSITIONS)

    def __post_init__(self):
        kind = task_kind(self.task)
        if self.data is None and not kind.generated:
            raise ValueError(f"task {self.task!r} reads its pairs from files: give the data path (--data)")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata["tasks"] is not None:  # a task option: another task's must keep its default
                tasks = tasks_with_option(field.name)
                if self.task not in tasks and value != field.default:
                    raise ValueError(f"{flag_of(field)} applies to {', '.join(tasks)} only, not to {self.task}")
            elif field.name != "task" and field.metadata["choices"] and value not in field.metadata["choices"]:
                raise ValueError(f"{flag_of(field)} must be one of {', '.join(field.metadata['choices'])}, "
                                 f"got {value!r}")
        self.task_options()  # the task's own checks

    @property
    def kind(self) -> TaskKind:
        """The registered task."""
        return task_kind(self.task)

    @property
    def default_metric(self) -> str:
        return self.kind.default_metric

    def task_options(self) -> TaskOptions:
        """The task's options record (`TaskKind.options`) with this spec's values."""
        record = self.kind.options
        return record(**{field.name: getattr(self, field.name) for field in dataclasses.fields(record)})

    def options(self) -> dict:
        """The options that apply to this task (with their values): exactly what rebuilds it with `data`."""
        mine = self.kind.option_names
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("task", "data") and (f.metadata["tasks"] is None or f.name in mine)}

    @classmethod
    def from_record(cls, task: str, data: str | None, options: dict) -> TaskSpec:
        """The spec a result file recorded (JSON turns tuples into lists)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown task option(s) {', '.join(unknown)}")
        return cls(task, data, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})

    def noise(self) -> Noise | None:
        """The noise that corrupts the base prompt, for a task whose counterfactual is noise; else None."""
        return self.task_options().noise() if self.kind.noise else None

    def loader_options(self, tokenizer=None) -> dict:
        """The keyword arguments of the task's loader (for the pairs `tokenizer` will encode, when given)."""
        return self.task_options().loader_options(tokenizer)

    def build(self, tokenizer) -> EncodedTask:
        """Load the pairs and tokenise them; the encoded task remembers this spec."""
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one (--tokenizer FOLDER)")
        pairs = load_pairs(self.task, self.data, **self.loader_options(tokenizer))
        return dataclasses.replace(encode_pairs(pairs, tokenizer, self.positions, self.noise()), spec=self)


def build_task(task: str, data, tokenizer, **options) -> EncodedTask:
    """Load a task's prompt pairs from `data` and tokenise them; `options` are `TaskSpec` fields (e.g.
    split="test", positions="last", noise_on="subject")."""
    return TaskSpec(task, None if data is None else str(data), **options).build(tokenizer)


def task_digest(task: EncodedTask) -> str:
    """SHA-256 of what a task's pairs say (prompts, targets, signs, labels, skips) and how they tokenised: equal
    digests mean the same data, whatever file it came from."""
    digest = hashlib.sha256(json.dumps([[p.base, p.counterfactual, list(p.targets), p.sign, p.label, p.subject,
                                         p.keep] for p in task.pairs] + [list(s) for s in task.skipped]).encode())
    for array in dataclasses.astuple(task.arrays):
        digest.update(array.tobytes())
    return digest.hexdigest()
