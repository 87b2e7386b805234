"""EAP-IG / MIB graph JSON export of circuits, on hand-built circuits of a tiny config (no models)."""

import dataclasses
import json
import math

import pytest

from jaxtrace.core.models import ModelConfig
from jaxtrace.io import export
from jaxtrace.io.export import EXPORT_FORMATS, to_eap_graph, write_eap_graph

L, H, D, D_FF = 2, 3, 4, 5
HEAD_Z = [[0.9, 0.7, 0.1], [0.2, 0.3, 0.8]]


def model_config(n_layers=L, n_heads=H, d_model=D) -> dict:
    return dataclasses.asdict(ModelConfig("llama", vocab_size=16, d_model=d_model, n_layers=n_layers,
                                          n_heads=n_heads, n_kv_heads=1, head_dim=2, d_ff=D_FF, max_positions=32,
                                          norm_eps=1e-6, tie_embeddings=True))


def make_circuit(site="head_out", selected=((0, 0), (0, 1), (1, 2)), z=None) -> dict:
    """A circuit.json record (what `jaxtrace.Circuit.to_dict` writes)."""
    width = {"attn_pattern": H, "head_out": H, "mlp_out": D, "mlp_hidden": D_FF}[site]
    if z is None:
        z = HEAD_Z if width == H else [[0.1 * (i + 1) / width for i in range(width)] for _ in range(L)]
    return {"model": "tiny", "task": "winobias", "site": site, "method": "pgbct", "metric": "probability_ratio",
            "model_config": model_config(), "effect": 0.1, "effect_all": 0.2, "effect_none": 0.0, "n_pairs": 4,
            "seconds": 1.0, "selected": [list(pair) for pair in selected], "n_selected": len(selected),
            "n_components": L * width, "z": z}


def expected_edge_count(n_layers: int, n_heads: int) -> int:
    """Edges of EAP-IG's Graph.from_model with parallel_attn_mlp=False.

    Before layer l the residual stream holds r_l = 1 + l*(H+1) nodes (input, then H heads and 1 MLP per layer).
    Layer l adds r_l * 3H edges into the q/k/v of its heads and r_l + H edges into its MLP; the logits get
    r_L edges:  E = sum_l [(3H+1) r_l + H] + r_L = (3H+1)(L + (H+1) L(L-1)/2) + L H + 1 + L(H+1).
    """
    return ((3 * n_heads + 1) * (n_layers + (n_heads + 1) * n_layers * (n_layers - 1) // 2)
            + n_layers * n_heads + 1 + n_layers * (n_heads + 1))


def from_model_names(cfg: dict) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Node names and {edge name: (parent, child)} as EAP-IG's Graph.from_model builds them (re-implemented)."""
    nodes, edges, residual = ["input"], {}, ["input"]
    for layer in range(cfg["n_layers"]):
        heads = [f"a{layer}.h{h}" for h in range(cfg["n_heads"])]
        mlp = f"m{layer}"
        nodes += heads + [mlp]
        assert not cfg["parallel_attn_mlp"]
        for node in residual:
            for head in heads:
                for letter in "qkv":
                    edges[f"{node}->{head}<{letter}>"] = (node, head)
        residual += heads
        for node in residual:
            edges[f"{node}->{mlp}"] = (node, mlp)
        residual.append(mlp)
    for node in residual:
        edges[f"{node}->logits"] = (node, "logits")
    return nodes + ["logits"], edges


def eap_from_json(path) -> dict:
    """EAP-IG's Graph.from_json parsing (src/eap/graph.py) on plain dicts: the loaded node/edge state."""
    with open(path) as f:
        d = json.load(f)
        assert all(k in d.keys() for k in ["cfg", "nodes", "edges"]), "Bad input JSON format - Missing keys"
    cfg = d["cfg"]
    assert {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"} <= set(cfg)  # what from_model reads
    node_names, edge_names = from_model_names(cfg)
    nodes = {name: {"in_graph": False, "score": math.nan} for name in node_names}
    nodes["logits"]["in_graph"] = True  # LogitNode.in_graph is always True
    edges = {name: {"score": 0.0, "in_graph": False} for name in edge_names}
    for name, node_dict in d["nodes"].items():
        if name == "logits":
            continue
        nodes[name]["in_graph"] = node_dict["in_graph"]  # KeyError on an unknown node, as g.nodes[name]
        if "score" in node_dict:
            nodes[name]["score"] = node_dict["score"]
    for name, info in d["edges"].items():
        edges[name]["score"] = info["score"]  # KeyError on an unknown edge, as g.edges[name]
        edges[name]["in_graph"] = info["in_graph"]
    return {"nodes": nodes, "edges": edges}


def test_nodes_and_edges_match_eap_from_model():
    graph = to_eap_graph(make_circuit())
    node_names, edge_names = from_model_names(graph["cfg"])
    assert graph["cfg"] == {"n_layers": L, "n_heads": H, "parallel_attn_mlp": False, "d_model": D}
    assert list(graph["nodes"]) == node_names
    assert len(node_names) == 1 + L * (H + 1) + 1 == 10
    assert list(graph["edges"]) == list(edge_names)
    assert len(graph["edges"]) == expected_edge_count(L, H) == 75
    assert len(to_eap_graph({**make_circuit(), "model_config": model_config(30, 9, 576),
                             "z": [[0.0] * 9] * 30, "selected": []})["edges"]) == expected_edge_count(30, 9)
    assert "input->a1.h0<q>" in graph["edges"] and "a0.h1->m1" in graph["edges"]
    assert "m1->a0.h0<q>" not in graph["edges"] and "a0.h1->a0.h2<k>" not in graph["edges"]
    assert all(set(e) == {"score", "in_graph"} and e["score"] == 0.0 and isinstance(e["in_graph"], bool)
               for e in graph["edges"].values())


@pytest.mark.parametrize("site", ["attn_pattern", "head_out"])
def test_head_site_nodes(site):
    nodes = to_eap_graph(make_circuit(site))["nodes"]
    assert nodes["input"] == {"in_graph": True} and nodes["logits"] == {"in_graph": True}
    in_heads = {name for name, node in nodes.items() if name.startswith("a") and node["in_graph"]}
    assert in_heads == {"a0.h0", "a0.h1", "a1.h2"}
    assert all(nodes[f"a{l}.h{h}"]["score"] == HEAD_Z[l][h] for l in range(L) for h in range(H))
    assert nodes["m0"] == nodes["m1"] == {"in_graph": True}  # untraced: live, unscored


def test_empty_circuit_keeps_input_and_logits():
    graph = to_eap_graph(make_circuit(selected=()))
    assert graph["nodes"]["input"]["in_graph"] and graph["nodes"]["logits"]["in_graph"]
    assert not any(graph["nodes"][f"a{l}.h{h}"]["in_graph"] for l in range(L) for h in range(H))
    assert graph["edges"]["input->logits"]["in_graph"] and graph["edges"]["input->m0"]["in_graph"]


def test_edges_follow_endpoints():
    edges = to_eap_graph(make_circuit())["edges"]
    for qkv in "qkv":
        assert edges[f"a0.h1->a1.h2<{qkv}>"]["in_graph"]  # both selected
        assert edges[f"input->a1.h2<{qkv}>"]["in_graph"]
        assert not edges[f"a0.h2->a1.h2<{qkv}>"]["in_graph"]  # unselected parent
        assert not edges[f"a0.h0->a1.h0<{qkv}>"]["in_graph"]  # unselected child
    assert edges["a0.h0->m0"]["in_graph"] and edges["a1.h2->logits"]["in_graph"]
    assert not edges["a1.h1->logits"]["in_graph"] and not edges["a0.h2->m1"]["in_graph"]


def test_graph_is_a_fixed_point_of_eap_prune():
    """Every in-graph edge joins in-graph nodes; every in-graph node has in-graph edges in (except input) and out."""
    graph = to_eap_graph(make_circuit())
    _, edge_names = from_model_names(graph["cfg"])
    nodes, edges = graph["nodes"], graph["edges"]
    kept = [edge_names[name] for name, e in edges.items() if e["in_graph"]]
    assert all(nodes[p]["in_graph"] and nodes[c]["in_graph"] for p, c in kept)
    for name, node in nodes.items():
        if node["in_graph"]:
            assert name == "input" or any(c == name for _, c in kept)
            assert name == "logits" or any(p == name for p, _ in kept)


@pytest.mark.parametrize("site,width", [("mlp_out", D), ("mlp_hidden", D_FF)])
def test_mlp_sites_map_units_to_blocks(site, width):
    z = [[0.1] * width, [0.2] * width]
    z[1][2], z[1][width - 1] = 0.9, 0.6
    graph = to_eap_graph(make_circuit(site, selected=[(1, 2), (1, width - 1)], z=z))
    nodes, edges = graph["nodes"], graph["edges"]
    assert nodes["m0"] == {"in_graph": False, "score": 0.1}
    assert nodes["m1"] == {"in_graph": True, "score": 0.9}  # max of the block's z
    assert all(nodes[f"a{l}.h{h}"] == {"in_graph": True} for l in range(L) for h in range(H))  # untraced
    assert edges["m1->logits"]["in_graph"] and edges["a1.h0->m1"]["in_graph"]
    assert not edges["m0->m1"]["in_graph"] and not edges["m0->a1.h0<v>"]["in_graph"]
    assert graph["jaxtrace"] == {"model": "tiny", "task": "winobias", "site": site,
                                 "selected": [[1, 2], [1, width - 1]], "mlp_block_score": "max"}


def test_node_threshold_reproduces_threshold_selection():
    """With selected = {z >= t}, EAP-IG's node-level threshold t on the scores gives back the in-graph nodes."""
    t = 0.5
    for site, z in [("head_out", HEAD_Z), ("mlp_out", [[0.3, 0.1, 0.2, 0.4], [0.1, 0.7, 0.5, 0.2]])]:
        selected = [(l, i) for l in range(L) for i in range(len(z[l])) if z[l][i] >= t]
        nodes = to_eap_graph(make_circuit(site, selected, z))["nodes"]
        assert all((node["score"] >= t) == node["in_graph"] for node in nodes.values() if "score" in node)


def test_write_round_trips_through_eap_from_json(tmp_path):
    circuit = make_circuit()
    path = tmp_path / "graph.json"
    write_eap_graph(circuit, path)
    assert EXPORT_FORMATS["eap"] is write_eap_graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.json"]  # no temp file left
    written = json.loads(path.read_text())
    assert written == to_eap_graph(circuit)
    loaded = eap_from_json(path)
    in_graph = {name: node["in_graph"] for name, node in written["nodes"].items()}
    assert {name: node["in_graph"] for name, node in loaded["nodes"].items()} == in_graph
    assert loaded["edges"] == written["edges"]
    assert math.isnan(loaded["nodes"]["input"]["score"]) and loaded["nodes"]["a1.h2"]["score"] == HEAD_Z[1][2]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "graph.json"
    path.write_text("old")

    class FullDisk:  # a file that takes part of the text, then fails
        def __init__(self, name, mode):
            self.file = open(name, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:7])
            raise OSError("disk full")

    monkeypatch.setattr(export, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="disk full"):
        write_eap_graph(make_circuit(), path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["graph.json"]


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("selected"), "missing required keys"),
    (lambda c: c.pop("z"), "missing required keys"),
    (lambda c: c["model_config"].pop("n_heads"), "model_config is missing"),
    (lambda c: c.update(site="resid"), "unknown site"),
    (lambda c: c.update(selected=[[2, 0]]), "out of range"),
    (lambda c: c.update(selected=[[0, 3]]), "out of range"),
    (lambda c: c.update(selected=[[0, -1]]), "out of range"),
    (lambda c: c.update(selected=[[0, 1.5]]), "pair of ints"),
    (lambda c: c.update(selected=[[0]]), "pair of ints"),
    (lambda c: c.update(z=HEAD_Z[:1]), "z must be"),
    (lambda c: c.update(z=[[0.1, 0.2, math.nan], [0.1, 0.2, 0.3]]), "non-finite"),
])
def test_invalid_circuits(change, message, tmp_path):
    circuit = make_circuit()
    change(circuit)
    with pytest.raises(ValueError, match=message):
        to_eap_graph(circuit)
    with pytest.raises(ValueError, match=message):
        write_eap_graph(circuit, tmp_path / "graph.json")
    assert not list(tmp_path.iterdir())


def test_mlp_index_range_uses_the_site_width():
    to_eap_graph(make_circuit("mlp_hidden", selected=[(0, D_FF - 1)]))
    with pytest.raises(ValueError, match="out of range"):
        to_eap_graph(make_circuit("mlp_out", selected=[(0, D)]))
