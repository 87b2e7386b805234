"""Export circuits to other tools' formats.

`eap` writes the graph JSON of EAP-IG (hannamw/EAP-IG, `src/eap/graph.py`: `Graph.to_json` / `Graph.from_json`),
which the MIB circuit-localization track loads with `Graph.from_json`:

    {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D},
     "nodes": {"input" | "a{l}.h{h}" | "m{l}" | "logits": {"in_graph": bool, "score": float (optional)}},
     "edges": {"{parent}->{child}" | "{parent}->a{l}.h{h}<q|k|v>": {"score": float, "in_graph": bool}}}

`from_json` rebuilds the full graph with `Graph.from_model(cfg)` and then, by name, sets each listed node's
`in_graph`/`score` (skipping "logits", which is always in) and each listed edge's `score`/`in_graph`; an unknown name
is a KeyError, a node without "score" stays NaN ("unscored": always kept by node-level top-n), and other top-level
keys are ignored, so jaxtrace's own unit-level selection goes under "jaxtrace".

Mapping of a jaxtrace circuit:
- Traced nodes (query heads for `attn_pattern`/`head_out`, MLP blocks for `mlp_out`/`mlp_hidden`) are in the graph
  iff selected; their score is the soft gate z. An MLP block is in iff any of its units is selected, and its score
  is the max of its units' z: this keeps block scores on the heads' [0, 1] gate scale (a sum would grow with the
  number of units), and for jaxtrace's z-ranked selection it is the largest selected z of an in-graph block.
  The unit-level selection is lost from the graph and kept in the "jaxtrace" key.
- `heads_mlp` traces both kinds: heads and MLP blocks are in iff selected, scored by their own gate.
- Untraced nodes (the other kind), "input" and "logits" are in the graph without a score: the search left them live.
- An edge is in the graph iff both its endpoints are, with score 0.0 (a node-level circuit has no edge scores). This
  is what EAP-IG's node-level `apply_topn(..., level="node")` gives: every outgoing edge of an in-graph node, then
  `prune()` drops edges into nodes that are out; nothing more is pruned since every node has in-graph edges from
  "input" and to "logits".

`eap_graph` builds the same graph from any node scores [L, C] in z's place (a ranking's: MIB's importances files and
thresholded circuits, written by `jaxtrace compare --mib`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from jaxtrace.core.sites import get_site
from jaxtrace.io.circuit import Circuit
from jaxtrace.io.files import atomic_path


def _eap_edges(n_layers: int, n_heads: int) -> list[tuple[str, str, str]]:
    """(edge name, parent, child) of every edge of EAP-IG's `Graph.from_model` (parallel_attn_mlp=False), in order."""
    edges = []
    residual = ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{head}" for head in range(n_heads)]
        edges += [(f"{parent}->{head}<{qkv}>", parent, head) for parent in residual for head in heads for qkv in "qkv"]
        residual += heads
        edges += [(f"{parent}->m{layer}", parent, f"m{layer}") for parent in residual]
        residual.append(f"m{layer}")
    edges += [(f"{parent}->logits", parent, "logits") for parent in residual]
    return edges


def to_eap_graph(circuit: Circuit | dict) -> dict:
    """The EAP-IG / MIB graph JSON dict of a jaxtrace circuit (or its circuit.json record; see the module docstring
    for the mapping)."""
    if not isinstance(circuit, Circuit):
        circuit = Circuit.from_dict(circuit)
    return eap_graph(circuit.model_config, circuit.site, circuit.selected, circuit.z, circuit.model, circuit.task)


def eap_graph(model_config: dict, site: str, selected, scores, model: str | None = None,
              task: str | None = None) -> dict:
    """The graph JSON dict of the components `selected` ([[layer, index], ...]) of `site` on a model of
    `model_config`, the traced nodes scored by `scores` [L][C] (a circuit's z, or any ranking's scores)."""
    spec = get_site(site)
    n_layers, n_heads, d_model = model_config["n_layers"], model_config["n_heads"], model_config["d_model"]
    chosen = {tuple(int(i) for i in pair) for pair in selected}
    nodes: dict[str, dict[str, Any]] = {"input": {"in_graph": True}}
    for layer in range(n_layers):
        for head in range(n_heads):
            nodes[f"a{layer}.h{head}"] = ({"in_graph": (layer, head) in chosen, "score": float(scores[layer][head])}
                                          if spec.heads else {"in_graph": True})
        if spec.blocks:
            nodes[f"m{layer}"] = {"in_graph": (layer, n_heads) in chosen, "score": float(scores[layer][n_heads])}
        else:
            nodes[f"m{layer}"] = ({"in_graph": True} if spec.heads else
                                  {"in_graph": any(lay == layer for lay, _ in chosen),
                                   "score": float(max(scores[layer]))})
    nodes["logits"] = {"in_graph": True}
    edges = {name: {"score": 0.0, "in_graph": nodes[parent]["in_graph"] and nodes[child]["in_graph"]}
             for name, parent, child in _eap_edges(n_layers, n_heads)}
    return {
        "cfg": {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False, "d_model": d_model},
        "nodes": nodes,
        "edges": edges,
        "jaxtrace": {
            "model": model, "task": task, "site": site, "selected": [[int(i) for i in pair] for pair in selected],
            "mlp_block_score": "gate" if spec.blocks else None if spec.heads else "max",
        },
    }


def write_graph(graph: dict, path: str | os.PathLike) -> None:
    """Write a graph JSON dict to `path`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(graph, f)


def write_eap_graph(circuit: Circuit | dict, path: str | os.PathLike) -> None:
    """Write `to_eap_graph(circuit)` as JSON to `path`, atomically."""
    write_graph(to_eap_graph(circuit), path)


EXPORT_FORMATS: dict[str, Callable[[Circuit | dict, str | os.PathLike], None]] = {"eap": write_eap_graph}
