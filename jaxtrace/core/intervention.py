"""An intervention is one value handed to the model: gates per model site, the source activations they mix in, the
token positions where they apply, the cached attention memory of shared prefixes and the attention form. A `Capture`
names the sites whose activations a forward returns.

    _, source = model.capture(Tokens(cf_ids), Capture(("head_out",)))
    logits = model(Tokens(ids), Intervention({"head_out": z}, source))   # z [L, H] in [0, 1]
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np

from jaxtrace.core.records import Memory
from jaxtrace.core.sites import CAPTURE_SITES, AttentionForm


@dataclasses.dataclass(frozen=True)
class Intervention:
    """gates: model site -> [L, C] in [0, 1]; sources: model site -> [L, B, ...] activations to mix in (token axes
    may be shorter than the live input: the missing positions are not mixed); positions: [B, T] where gates apply
    (None: everywhere); memory: cached prefix tokens (None: none); attention: the form attention is computed in
    (fused: `attn_pattern` can only be gated as `attn_pattern_qk`). A pytree whose leaves are the arrays; the form
    is static."""

    gates: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    sources: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    positions: np.ndarray | None = None
    memory: Memory | None = None
    attention: AttentionForm = AttentionForm.EXPLICIT

    def __post_init__(self):
        object.__setattr__(self, "attention", AttentionForm(self.attention))


jax.tree_util.register_dataclass(Intervention, data_fields=["gates", "sources", "positions", "memory"],
                                 meta_fields=["attention"])

NO_INTERVENTION = Intervention()


@dataclasses.dataclass(frozen=True)
class Capture:
    """The sites whose activations a forward returns ({site: [L, B, ...]}, after any mixing there)."""

    sites: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        for site in self.sites:
            if site not in CAPTURE_SITES:
                raise ValueError(f"unknown site {site!r} for capture; sites: {', '.join(CAPTURE_SITES)}")

    def __contains__(self, site: str) -> bool:
        return site in self.sites
