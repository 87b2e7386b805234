"""`Circuit`: a found set of components with its effects and how it was found; the one reader and writer of
`circuit.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from pathlib import Path
from typing import Any

import numpy as np

from jaxtrace.core.models.config import ModelConfig
from jaxtrace.core.sites import SITES, gate_shape
from jaxtrace.io.files import write_json
from jaxtrace.version import __version__

@dataclasses.dataclass(frozen=True)
class Circuit:
    """A binary selection `selected` ([[layer, index], ...]) over the [L, C] components of `site`, with the soft
    gates `z` [L][C] it was thresholded from, the mean effects over `n_pairs` pairs of the circuit, of all
    components and of none, and its provenance (model, task and its options, method and its settings). Baselines
    may add each component's effect alone (`single_effects` [L][C]) and the attribution scores they ranked by
    (`scores` [L][C], atp and ig) with their Spearman rank correlation with the single effects."""

    site: str
    method: str
    metric: str
    model_config: dict
    selected: list[list[int]]
    z: list[list[float]]
    effect: float
    effect_all: float
    effect_none: float
    n_pairs: int
    seconds: float
    status: str = "ok"
    batch_size: int | None = None
    search: dict = dataclasses.field(default_factory=dict)
    history: list[dict] = dataclasses.field(default_factory=list)
    model: str | None = None
    task: str | None = None
    data: str | None = None
    task_options: dict = dataclasses.field(default_factory=dict)
    skipped: list[list[str]] = dataclasses.field(default_factory=list)
    dropped: list[list[str]] = dataclasses.field(default_factory=list)  # data lines the task's loader left out
    selected_names: list[str] = dataclasses.field(default_factory=list)
    single_effects: list[list[float]] | None = None
    scores: list[list[float]] | None = None
    score_correlation: float | None = None
    jaxtrace_version: str = __version__

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.z), len(self.z[0])

    @property
    def n_components(self) -> int:
        return math.prod(self.shape)

    def mask(self) -> np.ndarray:
        """[L, C] bool, the selection."""
        mask = np.zeros(self.shape, bool)
        for layer, index in self.selected:
            mask[layer, index] = True
        return mask

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "n_selected": self.n_selected, "n_components": self.n_components}

    def write(self, path: str | Path) -> None:
        """Write circuit.json atomically."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, record: Any, where: str = "circuit") -> Circuit:
        """A validated circuit from its JSON record; a one-line ValueError naming `where` otherwise."""
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not a jaxtrace circuit (expected a JSON object)")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in record]
        if missing:
            raise ValueError(f"{where} is not a jaxtrace circuit: missing required keys {missing}")
        try:
            circuit = cls(**{k: v for k, v in record.items() if k in fields})
            circuit._check()
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise ValueError(f"{where} is not a valid jaxtrace circuit: {error}") from None
        return circuit

    @classmethod
    def read(cls, path: str | Path) -> Circuit:
        """Read and validate a circuit.json (one-line errors naming the file)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"circuit file not found: {path}")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a jaxtrace circuit (not valid JSON: {error})") from None
        return cls.from_dict(record, str(path))

    def _check(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"unknown site {self.site!r}")
        config = ModelConfig.from_dict(self.model_config)
        n_layers, width = gate_shape(config, self.site)
        z = self.z
        if not isinstance(z, list) or len(z) != n_layers or any(not isinstance(r, list) or len(r) != width for r in z):
            raise ValueError(f"z must be [{n_layers}][{width}] for site {self.site!r}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for row in z for v in row):
            raise ValueError("z has non-finite or non-numeric values")
        for name in ("single_effects", "scores"):
            grid = getattr(self, name)
            if grid is not None and (not isinstance(grid, list) or len(grid) != n_layers or any(
                    not isinstance(r, list) or len(r) != width for r in grid)):
                raise ValueError(f"{name} must be [{n_layers}][{width}] for site {self.site!r}")
        for entry in self.selected:
            try:
                layer, index = (operator.index(value) for value in entry)
            except (TypeError, ValueError):
                raise ValueError(f"selected entry {entry!r} is not a [layer, index] pair of ints") from None
            if not (0 <= layer < n_layers and 0 <= index < width):
                raise ValueError(f"selected entry {[layer, index]} is out of range for [{n_layers}, {width}] "
                                 f"({self.site})")
