"""The files `compare --mib` writes, read back as MIB's circuit track would (../shared/reference/mib.md), by a reader
written here from MIB's rules, not from jaxtrace's code: which circuit MIB evaluates at each fraction."""

import json
import math
import struct

import numpy as np
import pytest

from jaxtrace.io import export
from jaxtrace.io.export import _eap_edges, mib_folder, write_graph, write_mib_submission

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CFG = {"n_layers": 4, "n_heads": 6, "d_model": 8}


# ---- MIB's rules, transcribed ----

def strict_json(path) -> dict:
    """json.load that fails on the bare NaN / Infinity tokens (JSON has none; MIB's scores must be finite)."""
    def refuse(token):
        raise AssertionError(f"{path} holds a bare {token}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def float32(value: float) -> float:
    """The value as torch stores a node score (float32)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def graph_nodes(cfg: dict) -> list[str]:
    """Graph.from_model's scored nodes: input, then per layer its heads and its MLP block (logits aside)."""
    return ["input"] + [n for l in range(cfg["n_layers"]) for n in [*(f"a{l}.h{h}" for h in range(cfg["n_heads"])),
                                                                      f"m{l}"]]


def load(path) -> dict:
    """Graph.from_json on plain dicts: {node: {"in_graph", "score" (NaN: unscored)}} and whether any node has a
    score (MIB's node-level evaluation needs one)."""
    d = strict_json(path)
    assert all(k in d for k in ("cfg", "nodes", "edges")), "Bad input JSON format - Missing keys"
    nodes = {name: {"in_graph": False, "score": math.nan} for name in graph_nodes(d["cfg"])}
    any_score = False
    for name, node in d["nodes"].items():
        if name == "logits":
            continue
        nodes[name]["in_graph"] = node["in_graph"]  # KeyError on an unknown node
        if "score" in node:
            any_score = True
            assert isinstance(node["score"], (int, float)) and math.isfinite(node["score"])
            nodes[name]["score"] = float32(node["score"])
    return {"cfg": d["cfg"], "nodes": nodes, "scored": any_score}


def prune(cfg: dict, kept: set[str]) -> set[str]:
    """Nodes left once nodes without a path from `input` are dropped (every node reaches the logits directly)."""
    order = graph_nodes(cfg)
    left = set()
    for i, name in enumerate(order):  # a node's parents are the nodes before it, except its own layer's heads
        layer = None if name == "input" else int(name[1:].split(".")[0])
        parents = [p for p in order[:i] if not (name.startswith("a") and p.startswith(f"a{layer}."))]
        if name in kept and (name == "input" or any(p in left for p in parents)):
            left.add(name)
    return left


def top_n(graph: dict, n: int, absolute: bool, ties_last_first: bool) -> set[str]:
    """apply_topn(n, absolute, level="node", prune=True): unscored nodes always kept; the scored sorted by (|)score(|)
    descending by an unstable sort (`ties_last_first`: equal keys in reverse node order, else in node order)."""
    scores = {name: node["score"] for name, node in graph["nodes"].items()}
    scored = [name for name, s in scores.items() if not math.isnan(s)]
    assert n <= len(scored), f"Requested n ({n}) is greater than the number of scored nodes ({len(scored)})"
    key = {name: abs(scores[name]) if absolute else scores[name] for name in scored}
    position = {name: i for i, name in enumerate(scores)}
    ranked = sorted(scored, key=lambda name: (-key[name], -position[name] if ties_last_first else position[name]))
    kept = set(ranked[:n]) | {name for name in scores if name not in scored}
    return prune(graph["cfg"], kept)


def mib_circuit(graph: dict, n: int, absolute: bool = False) -> set[str]:
    """The circuit MIB evaluates at size n, checked not to depend on its sort's tie order."""
    circuit = top_n(graph, n, absolute, ties_last_first=False)
    assert circuit == top_n(graph, n, absolute, ties_last_first=True)
    return circuit


def n_scored(graph: dict) -> int:
    return sum(not math.isnan(node["score"]) for node in graph["nodes"].values())


def fixed_circuits(folder) -> dict[float, set[str]]:
    """A fixed-circuits folder (MIB's multiple circuits): at most 9 files, no importances, no node scores;
    {fraction: in-graph nodes after pruning}."""
    files = sorted(folder.iterdir())
    assert 1 <= len(files) <= 9 and not any(f.name.startswith("importances") for f in files)
    circuits = {}
    for f in files:
        graph = load(f)
        assert not graph["scored"], f"{f.name} carries node scores"
        p = float(f.stem.removeprefix("circuit_"))
        assert 0 < p <= 0.5
        circuits[p] = prune(graph["cfg"], {name for name, node in graph["nodes"].items() if node["in_graph"]})
    return circuits


def signed_order(scores: dict[str, float]) -> list[str]:
    """jaxtrace's ranking order of the traced components: score descending, ties by position (a stable sort)."""
    return sorted(scores, key=lambda name: -scores[name])


# ---- the files ----

def heads(ranking) -> dict[str, float]:
    return {f"a{l}.h{h}": v for l, row in enumerate(ranking) for h, v in enumerate(row)}


def write(tmp_path, ranking, site="head_out", cfg=CFG, folder="ioi_gpt2", method="pgbct"):
    write_mib_submission(tmp_path, method, folder, cfg, site, ranking, FRACTIONS, {"method": method})
    return (load(tmp_path / f"{method}_patching_node" / folder / "importances.json"),
            fixed_circuits(tmp_path / f"{method}-circuits_patching_node" / folder))


DISTINCT = [[0.9, -0.06, 0.3, 0.02, -0.7, 0.4], [0.11, 0.6, -0.21, 0.05, 0.08, 0.01],  # distinct |score| too
            [0.25, -0.33, 0.07, 0.5, 0.03, 0.12], [0.15, 0.2, -0.015, 0.35, 0.45, 0.09]]


def test_importances_alone_and_circuits_apart(tmp_path):
    importances, circuits = write(tmp_path, DISTINCT)
    assert [p.name for p in (tmp_path / "pgbct_patching_node" / "ioi_gpt2").iterdir()] == ["importances.json"]
    assert importances["scored"] and all(node["in_graph"] for node in importances["nodes"].values())
    assert sorted(circuits) == [p for p in FRACTIONS if p <= 0.5]


def test_circuit_files_hold_mib_sizes_and_the_empty_circuit(tmp_path):
    importances, circuits = write(tmp_path, DISTINCT)
    n = n_scored(importances)
    assert n == 1 + 4 * 7  # input, 24 heads, 4 MLP blocks: all scored
    assert [int(p * n) for p in sorted(circuits)] == [0, 0, 0, 0, 0, 1, 2, 5, 14]
    for p, circuit in circuits.items():
        size = int(p * n)
        assert circuit == (mib_circuit(importances, size) if size else {"input"})  # MIB's k = 0 circuit keeps input
        assert len(circuit) == max(size, 1)
    assert circuits[0.1] == {"input", "a0.h0"}  # int(0.1 · 29) = 2: input and the top head, not max(1, ·) heads


def test_heads_only_site_scores_mlps_and_input(tmp_path):
    """Heads-only rankings: MIB's top-n takes input, then the heads in the ranking's order (signed and by |score|);
    MLP blocks come where a zero score would, after every positive head."""
    importances, _ = write(tmp_path, DISTINCT)
    head_scores = heads(DISTINCT)
    positive = [name for name in signed_order(head_scores) if head_scores[name] > 0]
    for n in range(1, len(positive) + 2):
        assert mib_circuit(importances, n) == {"input", *positive[: n - 1]}
    assert mib_circuit(importances, len(positive) + 1 + 4) == {"input", *positive, "m0", "m1", "m2", "m3"}
    by_magnitude = sorted(head_scores, key=lambda name: -abs(head_scores[name]))
    for n in range(1, 25):
        assert mib_circuit(importances, n, absolute=True) == {"input", *by_magnitude[: n - 1]}
    assert mib_circuit(importances, 29, absolute=True) == set(graph_nodes(CFG))


def test_ties_give_the_rankings_nodes_whatever_the_sort(tmp_path):
    """A ranking with five distinct values (PGB-CT's mean of four nearly binary z): MIB's circuit at every size is
    the ranking's top (ties by position), for either tie order of its sort."""
    ranking = [[(l * 6 + h) % 5 / 4 for h in range(6)] for l in range(4)]
    importances, circuits = write(tmp_path, ranking)
    scores = [node["score"] for node in importances["nodes"].values()]
    assert len(set(scores)) == len(set(map(abs, scores))) == 29
    order = ["input", *signed_order(heads(ranking)), "m0", "m1", "m2", "m3"]
    for n in range(1, 30):
        assert mib_circuit(importances, n) == set(order[:n])
        assert mib_circuit(importances, n, absolute=True) == set(order[:n])
    assert circuits[0.5] == set(order[:14])


def test_negative_ties_keep_the_signed_order(tmp_path):
    """Equal negative scores: MIB's signed top-n (its default ranking) takes them in the ranking's order, after the
    zeros (the MLP blocks)."""
    ranking = [[0.5, -0.2, 0.4, -0.2, 0.3, -0.2]] + [[0.1 * (l + 1)] * 6 for l in range(3)]
    importances, _ = write(tmp_path, ranking)
    before = {"input", *(f"a{l}.h{h}" for l in (1, 2, 3) for h in range(6)), "a0.h0", "a0.h2", "a0.h4",
              "m0", "m1", "m2", "m3"}
    assert [mib_circuit(importances, n) - before for n in (26, 27, 28, 29)] == [
        set(), {"a0.h1"}, {"a0.h1", "a0.h3"}, {"a0.h1", "a0.h3", "a0.h5"}]


def test_mlp_units_are_exported_as_blocks(tmp_path):
    """mlp_out ranks d_model units per layer; MIB counts MLP blocks: a block is one node, ranked at its best unit."""
    units = [[0.1, 0.3, -0.9, 0.0], [0.2, 0.95, 0.05, 0.4], [0.0, 0.0, 0.0, 0.0], [-0.5, 0.35, 0.1, 0.2]]
    importances, circuits = write(tmp_path, units, site="mlp_out", cfg={**CFG, "d_model": 4})
    n = n_scored(importances)
    assert n == 29  # nodes, not 4 · 4 units
    assert [mib_circuit(importances, k) - {"input"} for k in (2, 3, 4)] == [{"m1"}, {"m1", "m3"},
                                                                           {"m1", "m3", "m0"}]
    assert mib_circuit(importances, 5) == {"input", "m0", "m1", "m3", "m2"}  # its zero block before the heads
    assert circuits[0.2] == {"input", "m1", "m3", "m0", "m2"}  # int(0.2 · 29) = 5 nodes


def test_heads_mlp_site_ranks_blocks_among_heads(tmp_path):
    ranking = [[0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.8], [0.0] * 6 + [0.3], [0.0] * 7, [0.0] * 7]
    importances, _ = write(tmp_path, ranking, site="heads_mlp")
    assert mib_circuit(importances, 4) == {"input", "m0", "m1", "a0.h0"}


def test_nan_scores_are_written_as_numbers(tmp_path):
    """A NaN in the ranking has no score: it ranks as a zero (after the traced zeros); JSON keeps no bare NaN."""
    ranking = [row[:] for row in DISTINCT]
    ranking[0][1], ranking[2][2] = math.nan, 0.0
    importances, _ = write(tmp_path, ranking)
    assert n_scored(importances) == 29
    raw = strict_json(tmp_path / "pgbct_patching_node" / "ioi_gpt2" / "importances.json")["jaxtrace"]["ranking"]
    assert raw[0][1] is None and raw[2][2] == 0.0 and raw[0][0] == 0.9
    positive = signed_order({name: v for name, v in heads(ranking).items() if v > 0})
    k = len(positive) + 1
    assert mib_circuit(importances, k + 1) == {"input", *positive, "a2.h2"}
    assert mib_circuit(importances, k + 2) == {"input", *positive, "a2.h2", "a0.h1"}
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_graph({"cfg": {}, "nodes": {"a0.h0": {"in_graph": True, "score": math.nan}}, "edges": {}},
                    tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()


def run_evaluation_path(circuit_dir: str, method: str, task: str, model: str) -> str:
    """Where MIB's run_evaluation.py looks for a method's files (ablation patching, level node)."""
    return f"{circuit_dir}/{method}_patching_node/{task.replace('_', '-')}_{model}"


@pytest.mark.parametrize("task,model,mib_names", [
    ("ioi", "/models/gpt2", ("ioi", "gpt2")),
    ("ioi", "/hf/Qwen2.5-0.5B", ("ioi", "qwen2.5")),
    ("ioi", "gemma-2-2b", ("ioi", "gemma2")),
    ("ioi", "/ckpt/Llama-3.1-8B", ("ioi", "llama3")),
])
def test_folders_use_mibs_names(task, model, mib_names):
    folder, notes = mib_folder(task, model, "slug")
    assert f"mib/pgbct_patching_node/{folder}" == run_evaluation_path("mib", "pgbct", *mib_names) and notes == []


def test_names_mib_lacks_keep_jaxtraces_in_one_line_each():
    folder, notes = mib_folder("winobias", "smollm2-135m", "smollm2-135m")
    assert folder == "winobias_smollm2-135m"
    assert len(notes) == 2 and all("\n" not in note and "no MIB name" in note for note in notes)
    assert "winobias" in notes[0] and "smollm2-135m" in notes[1]
    assert mib_folder("ioi", "smollm2-135m", "smollm2-135m") == ("ioi_smollm2-135m", notes[1:])


def test_bad_rankings_and_fractions():
    with pytest.raises(ValueError, match="head_out ranking must be"):
        export.mib_importances(CFG, "head_out", DISTINCT[:3])
    with pytest.raises(ValueError, match="head_out ranking must be"):
        export.mib_importances(CFG, "head_out", [row + [0.0] for row in DISTINCT])
    with pytest.raises(ValueError, match="1 to 9 circuits"):
        export.mib_circuits(CFG, "head_out", DISTINCT, FRACTIONS)


# ---- edge level ----

def edge_top_n(graph: dict, n: int, absolute: bool = False) -> set[str]:
    """apply_topn(n, absolute, level="edge"): the n edges of largest (|)score(|) (asserted free of ties)."""
    scores = {name: edge["score"] for name, edge in graph["edges"].items()}
    assert all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores.values())
    key = {name: abs(s) if absolute else s for name, s in scores.items()}
    ranked = sorted(key, key=lambda name: -key[name])
    assert n == len(ranked) or key[ranked[n - 1]] != key[ranked[n]], "a tie at the cut"
    return set(ranked[:n])


def test_mib_edge_files_hold_the_rankings_circuits(tmp_path):
    cfg = {"n_layers": 3, "n_heads": 4, "d_model": 8}
    all_edges = _eap_edges(3, 4)
    n = len(all_edges)
    rng = np.random.default_rng(0)
    ranking = rng.normal(size=(1, n))
    ranking[0, :5] = 0.0  # ties at zero and a NaN: ranked last, still distinct in the file
    ranking[0, 7] = np.nan
    fractions = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
    write_mib_submission(tmp_path, "eap", "ioi_gpt2", cfg, "edges", ranking, fractions)
    importances = strict_json(tmp_path / "eap_patching_edge" / "ioi_gpt2" / "importances.json")
    assert set(importances) >= {"cfg", "nodes", "edges"} and len(importances["edges"]) == n
    assert all("score" not in node for node in importances["nodes"].values())  # edge level: no node scores
    names = [name for name, _, _ in all_edges]
    values = np.nan_to_num(ranking[0], nan=0.0)
    for k in (1, 10, 40, n // 2):
        expected = {names[i] for i in np.argsort(-values, kind="stable")[:k]}
        assert edge_top_n(importances, k) == expected
    by_magnitude = np.argsort(-np.abs(values), kind="stable")[:10]
    assert edge_top_n(importances, 10, absolute=True) == {names[i] for i in by_magnitude}
    folder = tmp_path / "eap-circuits_patching_edge" / "ioi_gpt2"
    files = sorted(folder.iterdir())
    assert len(files) == 6  # the fractions up to 0.5, no importances beside them
    for f in files:
        graph = strict_json(f)
        p = float(f.stem.removeprefix("circuit_"))
        kept = {name for name, edge in graph["edges"].items() if edge["in_graph"]}
        assert kept == edge_top_n(importances, int(p * n))
        touched = {"input", "logits"} | {end for name, parent, child in all_edges if name in kept
                                         for end in (parent, child)}
        assert {name for name, node in graph["nodes"].items() if node["in_graph"]} == touched
        assert all("score" not in node for node in graph["nodes"].values())
