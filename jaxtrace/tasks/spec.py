"""`TaskSpec`: everything that builds a task's encoded pairs, as one frozen record.

The record is what the command line sets (`--task`, `--data`, and the task's own options), what a result folder
stores (`circuit.json`'s "task", "data" and "task_options"), what a resumed run is compared with and what
`evaluate --circuit` rebuilds the task from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from jaxtrace.core.options import option
from jaxtrace.tasks.encode import POSITIONS, EncodedTask, Noise, encode_pairs
from jaxtrace.tasks.loaders import GENERATED_TASKS, IOI_NAMES, IOI_NAMES_PER_PAIR, TASK_LOADERS, load_pairs

NOISE_TASKS = ("counterfact",)  # tasks whose counterfactual is the base prompt with noisy embeddings
DEFAULT_METRICS = {"binding": "accuracy", "ioi": "logit_difference"}  # a task's metric unless told otherwise


def int_range(text: str) -> tuple[int, int]:
    """"10-99" -> (10, 99)."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"expected a range LOW-HIGH such as 10-99, got {text!r}") from None


def comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task, its data and its options; options of other tasks must keep their defaults."""

    task: str = option(None, "the task", choices=tuple(TASK_LOADERS))
    data: str | None = option(None, "data folder (the file for custom and counterfact); generated tasks need none")
    split: str = option("dev", "winobias split", choices=("dev", "test"), tasks=("winobias",))
    stats: str = option("bergsma", "winogender occupation statistics", choices=("bergsma", "bls"),
                        tasks=("winogender",))
    reference_pronouns: bool = option(False, "she/he even in possessive examples, as the reference (default: "
                                      "her/his)", tasks=("winobias", "winogender"))
    limit: int | None = option(None, "counterfact: the first N records", tasks=("counterfact",))
    operands: tuple[int, int] = option((10, 99), "binding: operand range LOW-HIGH (the reference's 10-99; small "
                                       "models: 1-9)", parse=int_range, tasks=("binding",))
    per_digit: int = option(5, "binding: pairs per answer first digit and desideratum", tasks=("binding",))
    desiderata: tuple[str, ...] = option(("value", "task"), "binding: value and/or task switch pairs",
                                         parse=comma_tuple, tasks=("binding",))
    task_seed: int = option(1234, "binding, ioi: prompt generation seed", tasks=("binding", "ioi"))
    ioi_prompts: int = option(100, "ioi: prompts generated (ABBA and BABA alternating)", tasks=("ioi",))
    positions: str = option("prompt", "where gates apply: every prompt token, the last, or the subject's tokens",
                            choices=POSITIONS)
    noise_on: str = option("prompt", "counterfact: noise on every prompt token (reference) or the subject's (ROME)",
                           choices=("prompt", "subject"), tasks=NOISE_TASKS)
    noise_std: float | None = option(None, "counterfact: absolute noise std", tasks=NOISE_TASKS)
    noise_scale: float = option(3.0, "counterfact: noise std as a multiple of the token embeddings' std",
                                tasks=NOISE_TASKS)
    noise_seed: int = option(0, "counterfact: noise seed", tasks=NOISE_TASKS)

    def __post_init__(self):
        if self.task not in TASK_LOADERS:
            raise ValueError(f"unknown task {self.task!r}; known tasks: {', '.join(TASK_LOADERS)}")
        if self.data is None and self.task not in GENERATED_TASKS:
            raise ValueError(f"task {self.task!r} reads its pairs from files: give the data path (--data)")
        for field in dataclasses.fields(self):
            tasks = field.metadata["tasks"]
            if tasks and self.task not in tasks and getattr(self, field.name) != field.default:
                raise ValueError(f"--{field.name.replace('_', '-')} applies to {', '.join(tasks)} only, "
                                 f"not to {self.task}")
            choices = field.metadata["choices"]
            if choices and getattr(self, field.name) not in choices:
                raise ValueError(f"--{field.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, field.name)!r}")
        for name in ("limit", "per_digit", "ioi_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("noise_std", "noise_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        low, high = self.operands
        if not 0 <= low <= high:
            raise ValueError(f"--operands takes a range LOW-HIGH with 0 <= LOW <= HIGH, got {low}-{high}")

    @property
    def default_metric(self) -> str:
        return DEFAULT_METRICS.get(self.task, "probability_ratio")

    def options(self) -> dict:
        """The options that apply to this task (with their values): exactly what rebuilds it with `data`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("task", "data") and (f.metadata["tasks"] is None or self.task in f.metadata["tasks"])}

    @classmethod
    def from_record(cls, task: str, data: str | None, options: dict) -> TaskSpec:
        """The spec a result file recorded (JSON turns tuples into lists)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown task option(s) {', '.join(unknown)}")
        return cls(task, data, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})

    def noise(self) -> Noise | None:
        if self.task not in NOISE_TASKS:
            return None
        return Noise(self.noise_on, self.noise_std, self.noise_scale, self.noise_seed)

    def loader_options(self) -> dict:
        """The keyword arguments of the task's loader (`jaxtrace.tasks.loaders`)."""
        return {
            "winobias": {"split": self.split, "fix_possessive": not self.reference_pronouns},
            "winogender": {"stats": self.stats, "fix_possessive": not self.reference_pronouns},
            "counterfact": {"limit": self.limit},
            "binding": {"operands": self.operands, "per_digit": self.per_digit, "seed": self.task_seed,
                        "desiderata": self.desiderata},
            "ioi": {"n": self.ioi_prompts, "seed": self.task_seed},
        }.get(self.task, {})

    def build(self, tokenizer) -> EncodedTask:
        """Load the pairs and tokenise them."""
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one (--tokenizer FOLDER)")
        options = self.loader_options()
        if self.task == "ioi":
            options["names"] = single_token_names(tokenizer)
        encoded = encode_pairs(load_pairs(self.task, self.data, **options), tokenizer, self.positions, self.noise())
        return dataclasses.replace(encoded, spec=self)


def single_token_names(tokenizer, names=IOI_NAMES, needed: int = IOI_NAMES_PER_PAIR) -> tuple[str, ...]:
    """The names that `tokenizer` encodes with a leading space (as the IOI prompts hold them) as one token; refused
    when fewer than `needed` remain."""
    kept = tuple(name for name in names if len(tokenizer(" " + name, add_special_tokens=False)["input_ids"]) == 1)
    if len(kept) < needed:
        raise ValueError(f"ioi needs {needed} names that are single tokens with a leading space; this tokenizer "
                         f"keeps {len(kept)} of {len(names)}")
    return kept


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
