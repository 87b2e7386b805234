"""CounterFact: factual recall, the counterfactual being the base prompt with noise on its input embeddings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxtrace.core.options import option
from jaxtrace.tasks.encode import Noise
from jaxtrace.tasks.library.common import check_non_negative, check_positive, read_text
from jaxtrace.tasks.pairs import PathLike, PromptPair
from jaxtrace.tasks.registry import TaskKind, TaskOptions, register


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


@dataclasses.dataclass(frozen=True)
class CounterfactOptions(TaskOptions):
    limit: int | None = option(None, "counterfact: the first N records")
    noise_on: str = option("prompt", "counterfact: noise on every prompt token (reference) or the subject's (ROME)",
                           choices=("prompt", "subject"))
    noise_std: float | None = option(None, "counterfact: absolute noise std")
    noise_scale: float = option(3.0, "counterfact: noise std as a multiple of the token embeddings' std")
    noise_seed: int = option(0, "counterfact: noise seed")

    def check(self) -> None:
        check_positive(self, "limit")
        check_non_negative(self, "noise_std", "noise_scale")

    def loader_options(self, tokenizer=None) -> dict:
        return {"limit": self.limit}

    def noise(self) -> Noise:
        return Noise(self.noise_on, self.noise_std, self.noise_scale, self.noise_seed)


register(TaskKind("counterfact", load_counterfact, CounterfactOptions, noise=True))
