"""PGB-CT on several device meshes, run in a subprocess that sees 8 simulated CPU devices (see test_parallel.py).

    python mesh_worker.py MODEL_FOLDER DATA_FOLDER CHECKPOINT_FOLDER OUT_JSON

Writes, per mesh, every step's loss, the final z and mask, the integrated-gradient scores, how a parameter and a
batch are laid out; and the z of a run checkpointed for one epoch on data=8 and resumed for the rest on
data=2 x model=4.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxtrace  # noqa: E402
from jaxtrace.engine import mesh as parallel  # noqa: E402
from jaxtrace.engine.attribution import integrated_gradients  # noqa: E402
from jaxtrace.io.checkpoints import EpochCheckpoints  # noqa: E402
from jaxtrace.engine.objective import build_objective  # noqa: E402
from jaxtrace.core.search import SearchConfig  # noqa: E402
from jaxtrace.engine.loop import initial_state, run_search  # noqa: E402
from jaxtrace.tasks import encode_pairs, load_pairs  # noqa: E402

MESHES = [None, "data=8", "data=4,model=2", "data=2,model=4"]
CONFIG = SearchConfig(epochs=3, lambda1=0.01, lambda2=0.01)
BATCH = 16


def layout(array: jax.Array) -> dict:
    """The partition spec of an array and how many distinct shards it has."""
    spec = getattr(array.sharding, "spec", None)
    shards = {tuple((s.start, s.stop) for s in shard.index) for shard in array.addressable_shards}
    return {"spec": str(spec), "distinct_shards": len(shards)}


def main(folder: str, data: str, checkpoint_dir: str, out: str) -> None:
    model, tokenizer = jaxtrace.load_model(folder)
    task = encode_pairs(load_pairs("winobias", data)[:48], tokenizer)
    results = {"devices": jax.device_count(), "runs": {}}
    for spec in MESHES:
        mesh = None if spec is None else parallel.parse_mesh(spec)
        objective = build_objective(model, task, "attn_pattern", BATCH, mesh=mesh)
        result = run_search(objective, CONFIG)
        query = nnx.to_pure_dict(objective.params)["blocks"]["q"]  # [L, D, H, Dh]
        batch, _ = objective.batcher.put(objective.inputs(np.arange(BATCH)))
        results["runs"][str(spec)] = {
            "loss": [row.loss for row in result.steps], "z": result.z.tolist(), "mask": result.mask.tolist(),
            "ig": integrated_gradients(objective, 2).tolist(), "query": layout(query),
            "batch_tokens": layout(batch.rows.tokens)}
    first = build_objective(model, task, "attn_pattern", BATCH, mesh=parallel.parse_mesh("data=8"))
    checkpoints = EpochCheckpoints(checkpoint_dir)
    run_search(first, CONFIG.replace(epochs=1), on_epoch=checkpoints.save)
    second = build_objective(model, task, "attn_pattern", BATCH, mesh=parallel.parse_mesh("data=2,model=4"))
    start = checkpoints.restore(initial_state(second, [CONFIG]))
    resumed = run_search(second, CONFIG, start=start)
    checkpoints.close()
    results["resumed"] = {"z": resumed.z.tolist(), "mask": resumed.mask.tolist()}
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
