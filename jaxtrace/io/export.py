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

`eap_graph` builds the same graph from any node scores [L, C] in z's place. An `eap` file is one circuit (its
untraced nodes in graph, as jaxtrace never patched them); the files MIB scores are written by `write_mib_submission`.

MIB's files (`jaxtrace compare --mib`; `../shared/reference/mib.md`). MIB's circuit track evaluates at node level
with EAP-IG's `apply_topn(n, absolute, level="node")`: every node whose score is NaN or missing is unscored and
ALWAYS kept, the others are sorted by score with torch's unstable argsort and the top n kept, n = int(p · n_scored)
(truncated: 0 at small p; asking for more than n_scored fails an assertion). Its default ranking is signed (largest
score first; CPR), the leaderboard's CMD run takes |score|. Its k = 0 circuit keeps `input` (and `logits`, always
in); dropping `input` disconnects every node after pruning (f = 0). A submission folder holds either one importances
file or up to 9 binary circuit files at fractions ≤ 50 %, never both. So, per method:

    <root>/<method>_patching_node/<task>_<model>/importances.json            every node scored, nothing else
    <root>/<method>-circuits_patching_node/<task>_<model>/circuit_<p>.json   in_graph only, p = 0.001 ... 0.5

- Every node is scored, so n_scored = 1 + L (H + 1) (`input`, every head, every MLP block; `logits` is always in):
  `input` ranks first (jaxtrace never patches the embeddings, and a circuit without it is disconnected); the traced
  nodes follow the ranking; an untraced node (MLP blocks on head sites, heads on MLP sites) and a traced one whose
  score is NaN have no score and rank as a score of 0, after the traced zeros, in node order. MIB's top-n then
  takes the ranking's components in its order, and the other kind only where the ranking would place a zero.
- `mlp_out` / `mlp_hidden` units: MIB counts MLP blocks, so a block is one node scored by its largest unit score
  (where the ranking first reaches the block); sizes and fractions count nodes, not units.
- Scores are distinct, so MIB's unstable sort cannot reorder ties: a node's exported score is ±(n − a), a the
  node's position in the |score| order (0 first), with the sign of its score (+ for `input` and the zeros). The
  signed order of these is the ranking's (score descending, ties by node order; `input` first, the zeros between
  the positives and the negatives) and the |score| order is the ranking's |score| order, except ties: equal
  |score| puts the positive scores first, then the negative ones last node first (a negative tie cannot be first
  in both orders). The ranking's own scores are kept under "jaxtrace" (non-finite as null); JSON has no NaN, and
  files are written with `allow_nan=False`.
- circuit_<p>.json holds the top int(p · n) nodes of the signed order in graph (MIB's default ranking), the empty
  circuit (int(p · n) = 0) as MIB builds it: `input` and `logits` only; edges in graph iff both ends are (what
  node-level top-n and `prune()` leave); no scores, so MIB scores the folder as fixed circuits.
- The `edges` site is written at edge level (`<method>_patching_edge/...`, `<method>-circuits_patching_edge/...`):
  every edge scored (distinct scores as above, no leading node), no node scores; circuit_<p>.json holds the top
  int(p · E) edges by signed score in graph and the nodes they touch (`input`, `logits` always).
- Folders use MIB's names (`mib_task`, `mib_model`; `<task>` with "_" as "-", as run_evaluation.py looks it up);
  a task or model MIB has no name for keeps jaxtrace's name (`mib_folder` says so in one line).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
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
    """Write a graph JSON dict to `path`, atomically (one string: `json.dump`'s many small writes take 4 times as
    long for SmolLM2's 123,211 edges)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(graph, allow_nan=False))


def write_eap_graph(circuit: Circuit | dict, path: str | os.PathLike) -> None:
    """Write `to_eap_graph(circuit)` as JSON to `path`, atomically."""
    write_graph(to_eap_graph(circuit), path)


# MIB's names (MIB_circuit_track/utils.py): jaxtrace task -> MIB task; model file or folder name (lower case) -> MIB
# model, the checkpoints MIB evaluates (`MODEL_NAME_TO_FULLNAME`).
MIB_TASKS = {"ioi": "ioi"}
MIB_MODELS = {"gpt2": "gpt2", "gpt2-small": "gpt2", "qwen2.5-0.5b": "qwen2.5", "gemma-2-2b": "gemma2",
              "llama-3.1-8b": "llama3"}


def mib_task(task: str | None) -> str | None:
    """MIB's name of a jaxtrace task (None: MIB has no such task)."""
    return MIB_TASKS.get(task or "")


def mib_model(model: str | None) -> str | None:
    """MIB's name of a model spec, by its file or folder name (None: not a model MIB evaluates)."""
    return MIB_MODELS.get(Path(model).name.lower()) if model else None


def mib_folder(task: str | None, model: str | None, model_slug: str) -> tuple[str, list[str]]:
    """The submission folder name `<task>_<model>` (MIB's names, "_" in the task as "-", as run_evaluation.py
    builds the path) and one line for each of the task and model MIB has no name for (jaxtrace's name is used)."""
    notes = []
    task_name = mib_task(task)
    if task_name is None:
        task_name = task or "task"
        notes.append(f"task {task_name} has no MIB name (MIB's: {', '.join(sorted(set(MIB_TASKS.values())))}): "
                     f"the folder uses jaxtrace's")
    model_name = mib_model(model)
    if model_name is None:
        model_name = model_slug
        notes.append(f"model {model_slug} has no MIB name (MIB's: {', '.join(sorted(set(MIB_MODELS.values())))}): "
                     f"the folder uses jaxtrace's")
    return f"{task_name.replace('_', '-')}_{model_name}", notes


def _eap_nodes(n_layers: int, n_heads: int) -> list[str]:
    """EAP-IG's scored node names in graph order: input, then per layer its heads and its MLP block (no logits)."""
    return ["input"] + [name for layer in range(n_layers)
                        for name in [*(f"a{layer}.h{head}" for head in range(n_heads)), f"m{layer}"]]


def _node_scores(model_config: dict, site: str, ranking) -> dict[str, float | None]:
    """{node: the ranking's score of it} (module docstring): heads and blocks as traced, an MLP block of a unit site
    as its largest unit score; None for `input`, untraced nodes and NaN scores."""
    spec = get_site(site)
    n_layers, n_heads = model_config["n_layers"], model_config["n_heads"]
    rows = [[float(value) for value in row] for row in ranking]
    width = n_heads + spec.blocks if spec.heads else None  # unit sites: any width, the same in every layer
    widths = {len(row) for row in rows}
    if len(rows) != n_layers or len(widths) != 1 or widths == {0} or (width is not None and widths != {width}):
        raise ValueError(f"a {site} ranking must be [L, C] with L = {n_layers} layers and C = "
                         f"{width or 'the units'} per layer, got {[len(row) for row in rows]}")
    scores: dict[str, float | None] = dict.fromkeys(_eap_nodes(n_layers, n_heads))
    for layer, row in enumerate(rows):
        if spec.heads:
            scores.update({f"a{layer}.h{head}": row[head] for head in range(n_heads)})
        if spec.blocks:
            scores[f"m{layer}"] = row[n_heads]
        elif not spec.heads:
            scored = [value for value in row if not math.isnan(value)]
            scores[f"m{layer}"] = max(scored) if scored else None
    return {name: None if value is None or math.isnan(value) else value for name, value in scores.items()}


def _distinct(scores: dict[str, float | None], first: tuple[str, ...] = ()) -> dict[str, float]:
    """{name: ±(n − position in the |score| order)}: `first` leading, then the scores by |score| (equal |score|:
    the positive first, then the negative last name first), the zeros and the unscored (None) last; the sign of
    the score (+ for `first` and the zeros). The signed order of these is score descending, ties by name order."""
    names = list(scores)
    position = {name: i for i, name in enumerate(names)}
    rest = [name for name in names if name not in first]
    signed = [name for name in rest if scores[name]]
    zeros = [name for name in rest if scores[name] == 0] + [name for name in rest if scores[name] is None]
    by_magnitude = sorted(signed, key=lambda name: (-abs(scores[name]), scores[name] < 0,
                                                    -position[name] if scores[name] < 0 else position[name]))
    magnitude = {name: len(names) - i for i, name in enumerate([*first, *by_magnitude, *zeros])}
    return {name: float(magnitude[name]) * (-1.0 if (scores[name] or 0) < 0 else 1.0) for name in names}


def mib_scores(model_config: dict, site: str, ranking) -> dict[str, float]:
    """{node: distinct score ±(n − position in the |score| order)} for MIB's node-level top-n of the ranking
    (scores [L, C], larger first) of `site`'s components: `input` first, the ranking's order (signed and by
    |score|), unscored nodes as zeros (module docstring)."""
    return _distinct(_node_scores(model_config, site, ranking), first=("input",))


def mib_edge_scores(model_config: dict, ranking) -> dict[str, float]:
    """{edge: distinct score} for MIB's edge-level top-n of an `edges` ranking [1, E] (edges in MIB's order;
    non-finite scores rank as zeros)."""
    names = [name for name, _, _ in _eap_edges(model_config["n_layers"], model_config["n_heads"])]
    rows = [[float(value) for value in row] for row in ranking]
    if len(rows) != 1 or len(rows[0]) != len(names):
        raise ValueError(f"an edges ranking must be [1, E] with E = {len(names)} edges, got "
                         f"{[len(row) for row in rows]}")
    return _distinct({name: value if math.isfinite(value) else None for name, value in zip(names, rows[0])})


def _edge_graph(model_config: dict, in_graph: set[str] | None, scores: dict[str, float] | None,
                about: dict) -> dict:
    """An edge-level graph JSON: edges in graph as `in_graph` says (None: all) with `scores` (else 0.0), nodes in
    graph iff an in-graph edge touches them (`input`, `logits` always), no node scores."""
    n_layers, n_heads = model_config["n_layers"], model_config["n_heads"]
    all_edges = _eap_edges(n_layers, n_heads)
    kept = {name for name, _, _ in all_edges} if in_graph is None else in_graph
    touched = {"input", "logits"} | {end for name, parent, child in all_edges if name in kept
                                     for end in (parent, child)}
    nodes = {name: {"in_graph": name in touched} for name in [*_eap_nodes(n_layers, n_heads), "logits"]}
    edges = {name: {"score": 0.0 if scores is None else scores[name], "in_graph": name in kept}
             for name, _, _ in all_edges}
    return {"cfg": {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False,
                    "d_model": model_config["d_model"]},
            "nodes": nodes, "edges": edges, "jaxtrace": about}


def _node_graph(model_config: dict, nodes: dict[str, dict], about: dict) -> dict:
    """A node-level graph JSON: `nodes` as given, `logits` in, each edge in iff both ends are (score 0.0)."""
    n_layers, n_heads = model_config["n_layers"], model_config["n_heads"]
    nodes = {**nodes, "logits": {"in_graph": True}}
    edges = {name: {"score": 0.0, "in_graph": nodes[parent]["in_graph"] and nodes[child]["in_graph"]}
             for name, parent, child in _eap_edges(n_layers, n_heads)}
    return {"cfg": {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False,
                    "d_model": model_config["d_model"]},
            "nodes": nodes, "edges": edges, "jaxtrace": about}


def mib_importances(model_config: dict, site: str, ranking, about: dict | None = None) -> dict:
    """MIB's importances graph JSON of a ranking (scores [L, C]): every node in graph with its `mib_scores` score;
    the ranking itself under "jaxtrace" ("ranking", non-finite scores as null) with `about`."""
    ranking = [[float(value) for value in row] for row in ranking]
    scores = mib_scores(model_config, site, ranking)
    nodes = {name: {"in_graph": True, "score": score} for name, score in scores.items()}
    raw = [[value if math.isfinite(value) else None for value in row] for row in ranking]
    return _node_graph(model_config, nodes, {**(about or {}), "site": site, "ranking": raw})


def mib_circuits(model_config: dict, site: str, ranking, fractions, about: dict | None = None) -> dict[float, dict]:
    """{p: MIB's binary circuit at fraction p}: the top int(p · n) of the n nodes by `mib_scores` (signed, MIB's
    default ranking) in graph, the empty circuit keeping `input`; no scores. At most 9 fractions, each in (0, 0.5]."""
    fractions = _circuit_fractions(fractions)
    scores = mib_scores(model_config, site, ranking)
    order = sorted(scores, key=lambda name: -scores[name])
    circuits = {}
    for p in fractions:
        size = int(p * len(order))
        kept = set(order[:size]) | {"input"}
        nodes = {name: {"in_graph": name in kept} for name in _eap_nodes(model_config["n_layers"],
                                                                        model_config["n_heads"])}
        circuits[p] = _node_graph(model_config, nodes, {**(about or {}), "site": site, "fraction": p, "size": size})
    return circuits


def mib_edge_files(model_config: dict, ranking, fractions, about: dict | None = None
                   ) -> tuple[dict, dict[float, dict]]:
    """An `edges` ranking [1, E] as MIB's edge-level files: the importances graph (every edge in graph with its
    `mib_edge_scores` score, the raw ranking under "jaxtrace") and {p: the circuit of the top int(p · E) edges by
    signed score} (no scores; nodes in graph iff a kept edge touches them)."""
    fractions = _circuit_fractions(fractions)
    scores = mib_edge_scores(model_config, ranking)
    raw = [value if math.isfinite(value) else None for value in (float(v) for v in ranking[0])]
    importances = _edge_graph(model_config, None, scores, {**(about or {}), "site": "edges", "ranking": [raw]})
    order = sorted(scores, key=lambda name: -scores[name])
    circuits = {p: _edge_graph(model_config, set(order[:int(p * len(order))]), None,
                               {**(about or {}), "site": "edges", "fraction": p, "size": int(p * len(order))})
                for p in fractions}
    return importances, circuits


def _circuit_fractions(fractions) -> list[float]:
    fractions = [float(p) for p in fractions]
    if not 1 <= len(fractions) <= 9 or any(not 0 < p <= 0.5 for p in fractions):
        raise ValueError(f"MIB scores 1 to 9 circuits at fractions in (0, 0.5], got {fractions}")
    return fractions


def write_mib_submission(root: str | os.PathLike, method: str, folder: str, model_config: dict, site: str, ranking,
                         fractions, about: dict | None = None) -> None:
    """A ranking's MIB files under `root` (module docstring): <method>_patching_<level>/<folder>/importances.json
    alone, and <method>-circuits_patching_<level>/<folder>/circuit_<p>.json for the `fractions` up to 0.5 (at most
    9); level `edge` for the `edges` site, else `node`."""
    circuit_fractions = [p for p in fractions if p <= 0.5]
    if site == "edges":
        level, (importances, circuits) = "edge", mib_edge_files(model_config, ranking, circuit_fractions, about)
    else:
        level = "node"
        importances = mib_importances(model_config, site, ranking, about)
        circuits = mib_circuits(model_config, site, ranking, circuit_fractions, about)
    scored = Path(root) / f"{method}_patching_{level}" / folder
    scored.mkdir(parents=True)
    write_graph(importances, scored / "importances.json")
    fixed = Path(root) / f"{method}-circuits_patching_{level}" / folder
    fixed.mkdir(parents=True)
    for p, graph in circuits.items():
        write_graph(graph, fixed / f"circuit_{p:g}.json")


EXPORT_FORMATS: dict[str, Callable[[Circuit | dict, str | os.PathLike], None]] = {"eap": write_eap_graph}
