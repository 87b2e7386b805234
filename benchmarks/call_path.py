"""How many of the package's files one `trace` call passes through, and how often it goes back to a file it left.

    python benchmarks/call_path.py            # a 1-epoch trace of a tiny random Llama on a task of given sizes

Every Python function call inside `jaxtrace/` is recorded (`sys.setprofile`) while `jaxtrace.trace` runs, as the
sequence of files the calls are in (consecutive calls in one file merged): a reader following the run opens each
file once per entry. Printed: the files entered, the entries, the returns to a file already left and the files
returned to most. Tracing the jitted programs calls the model's Python too, so the count covers what a reader
follows from the run down to the layers.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import jaxtrace
from jaxtrace.core.models import ModelConfig, init_model
from jaxtrace.engine.plan import TaskShape

PACKAGE = str(Path(jaxtrace.__file__).parent)
CONFIG = ModelConfig(model_type="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     d_ff=64, max_positions=64, norm_eps=1e-5, tie_embeddings=False)


def call_path() -> list[str]:
    """The files (relative to the package) of the calls one trace makes, consecutive repeats merged."""
    model = init_model(CONFIG)
    task = TaskShape(pairs=8, prompt_tokens=6).encoded()
    path: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            name = frame.f_code.co_filename[len(PACKAGE) + 1:]
            if not path or path[-1] != name:
                path.append(name)

    sys.setprofile(profile)
    try:
        jaxtrace.trace(model, task, "head_out", jaxtrace.SearchConfig(epochs=1), batch_size=4, progress=False)
    finally:
        sys.setprofile(None)
    return path


def main() -> None:
    path = call_path()
    returns = collections.Counter(name for i, name in enumerate(path) if name in path[:i])
    print(f"{len(set(path))} files entered, {len(path)} entries, {sum(returns.values())} returns to a file already "
          "left")
    print("most returned to: " + ", ".join(f"{name} {n}" for name, n in returns.most_common(6)))


if __name__ == "__main__":
    main()
