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
"""

from __future__ import annotations

import json
import math
import operator
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from jaxtrace.models.sites import check_site

HEAD_SITES = ("attn_pattern", "head_out")
GATED_HEADS = HEAD_SITES + ("heads_mlp",)
_REQUIRED_KEYS = ("model_config", "site", "selected", "z")


def _check_circuit(circuit: dict) -> tuple[int, int, int, str, list[tuple[int, int]]]:
    """(n_layers, n_heads, d_model, site, selected pairs) of a validated circuit dict."""
    missing = [key for key in _REQUIRED_KEYS if key not in circuit]
    if missing:
        raise ValueError(f"circuit is missing required keys {missing}")
    site = check_site(circuit["site"])
    config = circuit["model_config"]
    sizes = ("n_layers", "n_heads", "d_model") + (("d_ff",) if site == "mlp_hidden" else ())
    missing = [key for key in sizes if key not in config]
    if missing:
        raise ValueError(f"circuit model_config is missing {missing}")
    n_layers, n_heads, d_model = (int(config[key]) for key in sizes[:3])
    width = {"attn_pattern": n_heads, "head_out": n_heads, "mlp_out": d_model,
             "mlp_hidden": int(config.get("d_ff", 0)), "heads_mlp": n_heads + 1}[site]
    if min(n_layers, n_heads, d_model, width) < 1:
        raise ValueError(f"circuit model_config sizes must be positive, got {[config[key] for key in sizes]}")
    z = circuit["z"]
    if len(z) != n_layers or any(len(row) != width for row in z):
        raise ValueError(f"circuit z must be [{n_layers}][{width}] for site {site!r}")
    if not all(math.isfinite(value) for row in z for value in row):
        raise ValueError("circuit z has non-finite values")
    selected = []
    for entry in circuit["selected"]:
        try:
            layer, index = (operator.index(value) for value in entry)
        except (TypeError, ValueError):
            raise ValueError(f"selected entry {entry!r} is not a [layer, index] pair of ints") from None
        if not (0 <= layer < n_layers and 0 <= index < width):
            raise ValueError(f"selected entry {[layer, index]} is out of range for [{n_layers}, {width}] ({site})")
        selected.append((layer, index))
    return n_layers, n_heads, d_model, site, selected


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


def to_eap_graph(circuit: dict) -> dict:
    """The EAP-IG / MIB graph JSON dict of a jaxtrace circuit (see the module docstring for the mapping)."""
    n_layers, n_heads, d_model, site, selected = _check_circuit(circuit)
    z = circuit["z"]
    chosen = set(selected)
    nodes: dict[str, dict[str, Any]] = {"input": {"in_graph": True}}
    for layer in range(n_layers):
        for head in range(n_heads):
            nodes[f"a{layer}.h{head}"] = ({"in_graph": (layer, head) in chosen, "score": float(z[layer][head])}
                                          if site in GATED_HEADS else {"in_graph": True})
        if site == "heads_mlp":
            nodes[f"m{layer}"] = {"in_graph": (layer, n_heads) in chosen, "score": float(z[layer][n_heads])}
        else:
            nodes[f"m{layer}"] = ({"in_graph": True} if site in HEAD_SITES else
                                  {"in_graph": any(lay == layer for lay, _ in chosen), "score": float(max(z[layer]))})
    nodes["logits"] = {"in_graph": True}
    edges = {name: {"score": 0.0, "in_graph": nodes[parent]["in_graph"] and nodes[child]["in_graph"]}
             for name, parent, child in _eap_edges(n_layers, n_heads)}
    return {
        "cfg": {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False, "d_model": d_model},
        "nodes": nodes,
        "edges": edges,
        "jaxtrace": {
            "model": circuit.get("model"), "task": circuit.get("task"), "site": site,
            "selected": [list(pair) for pair in selected],
            "mlp_block_score": {"heads_mlp": "gate"}.get(site, None if site in HEAD_SITES else "max"),
        },
    }


def write_eap_graph(circuit: dict, path: str | os.PathLike) -> None:
    """Write `to_eap_graph(circuit)` as JSON to `path`, atomically (temporary file in the same folder, then rename)."""
    graph = to_eap_graph(circuit)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(graph, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


EXPORT_FORMATS: dict[str, Callable[[dict, str | os.PathLike], None]] = {"eap": write_eap_graph}
