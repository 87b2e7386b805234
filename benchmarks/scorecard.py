"""The scorecard's four cells: `jaxtrace compare` in the keep direction (MIB's faithfulness) on SmolLM2-135M and
Gemma-3-270M, each on WinoBias dev and IOI, attention heads (attn_pattern); every method on the same sizes (MIB's
int(p·n) up to 50 %), MIB's exact CPR/CMD per method beside jaxtrace's variant, the budgeted PGB-CT's circuits as
MIB's multiple-circuits submission, faithfulness at each budget and wall time per method.

    python benchmarks/scorecard.py ../shared/data [work folder]

Each cell is one `jaxtrace compare` run in `<work folder>/<cell>` (default /tmp/jaxtrace-scorecard), resumed where
a killed run stopped (its finished methods are kept, a search continues from its last epoch). SCORECARD.md and
scorecard.json (beside this file) are rewritten after every cell from the cells' curve.json.
"""
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CELLS = {  # cell: (model, task options, greedy size, greedy candidates); the cheaper cells first
    "smollm2-ioi": ("smollm2-135m", ["--task", "ioi", "--ioi-prompts", "32"], 27, 32),
    "gemma3-ioi": ("gemma3-270m", ["--task", "ioi", "--ioi-prompts", "32"], 14, 24),
    "gemma3-winobias": ("gemma3-270m", ["--task", "winobias", "--split", "dev"], 14, 24),
    "smollm2-winobias": ("smollm2-135m", ["--task", "winobias", "--split", "dev"], 27, 32),
}
SIZES = {"smollm2-135m": "1,2,5,13,27,54,135", "gemma3-270m": "1,3,7,14,36"}  # MIB's int(p·n) > 0, p <= 0.5


def command(cell: str, data: str, out: Path) -> list[str]:
    model, task, greedy_max, candidates = CELLS[cell]
    data_option = ["--data", data] if "winobias" in task else []
    return ["jaxtrace", "compare", "--model", model, *task, *data_option, "--site", "attn_pattern",
            "--direction", "keep", "--sizes", SIZES[model], "--n-lambdas", "2", "--lambda-range", "0.5,2",
            "--greedy-max", str(greedy_max), "--greedy-candidates", str(candidates), "--samples", "8",
            "--ig-steps", "16", "--mib", "pgbct_budgets", "--no-progress", "--out", str(out)]


def summary(curve: dict, budgets: list[int]) -> dict:
    """A cell's scorecard from its curve.json: per method wall time, MIB's CPR/CMD and jaxtrace's, and at each
    budget k the faithfulness of its most faithful circuit of at most k components; the budgeted PGB-CT's
    multiple-circuits score."""
    faith = curve["faithfulness"]
    methods = {}
    for name, seconds in curve["method_seconds"].items():
        exact, own = faith["mib"].get(name), faith["curves"].get(name)
        by_size = {row["size"]: row[name] for row in curve["faithfulness_rows"] if row.get(name) is not None}
        methods[name] = {"seconds": seconds,
                         "mib_cpr": exact and exact["cpr"], "mib_cmd": exact and exact["cmd"],
                         "cpr": own and own["cpr"], "cmd": own and own["cmd"],
                         "faithfulness": {str(k): max(f for size, f in by_size.items() if size <= k)
                                          for k in budgets if any(size <= k for size in by_size)}}
    return {"n_components": curve["n_components"], "n_pairs": curve["n_pairs"], "effect_all": curve["effect_all"],
            "methods": methods, "mib_circuits": faith["mib_circuits"]}


def _number(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(cells: dict, commands: dict) -> str:
    lines = ["# The scorecard: every method in the keep direction, MIB's scoring", "",
             "`python benchmarks/scorecard.py ../shared/data` on this project's 2-core CPU (float32), one "
             "`jaxtrace compare` per cell (commands below). CPR ↑ / CMD ↓ (MIB): as MIB's `evaluate_area_under_curve` "
             "(sizes int(p·n), an empty circuit f = 0, CPR by the signed ranking, CMD by |score|); '≥ 1': "
             "jaxtrace's variant (at least one component per fraction). pgbct_budgets is scored by its merged "
             "ranking and, as circuits, as MIB's multiple-circuits submission (one circuit per budget). f @k: the "
             "faithfulness of the method's most faithful circuit of at most k components (MIB's sizes).", ""]
    for cell, result in cells.items():
        sizes = sorted({int(s) for m in result["methods"].values() for s in m["faithfulness"]})
        lines += [f"## {cell}: {result['n_components']} heads, {result['n_pairs']} pairs, "
                  f"IE(all) = {result['effect_all']:+.4g}", "", f"`{commands[cell]}`", "",
                  "| method | wall s | CPR ↑ (MIB) | CMD ↓ (MIB) | CPR ≥ 1 | CMD ≥ 1 | "
                  + " | ".join(f"f @{s}" for s in sizes) + " |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(sizes)]
        for name, m in result["methods"].items():
            lines.append(f"| {name} | {m['seconds']:.0f} | {_number(m['mib_cpr'])} | {_number(m['mib_cmd'])} | "
                         f"{_number(m['cpr'])} | {_number(m['cmd'])} | "
                         + " | ".join(_number(m["faithfulness"].get(str(s))) for s in sizes) + " |")
        for name, score in result["mib_circuits"].items():
            lines += ["", f"{name} as MIB's multiple-circuits submission: CPR {score['cpr']:.3f}, CMD "
                      f"{score['cmd']:.3f} (f at 0.1 % … 50 %: " + ", ".join(f"{f:.3f}" for f in
                                                                            score["faithfulness"]) + ")."]
        lines.append("")
    return "\n".join(lines)


def main(data: str, work: Path) -> None:
    cells, commands = {}, {}
    for cell in CELLS:
        out = work / cell
        args = command(cell, data, out)
        commands[cell] = shlex.join(args)
        finished = out / "report.md"
        if not finished.exists():
            began = time.perf_counter()
            resume = ["--resume"] if (out / "run.json").exists() else []
            print(f"{cell}: {commands[cell]}", flush=True)
            subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:], *resume], check=True)
            print(f"{cell}: {time.perf_counter() - began:.0f} s", flush=True)
        budgets = [int(k) for k in SIZES[CELLS[cell][0]].split(",")]
        cells[cell] = summary(json.loads((out / "curve.json").read_text()), budgets)
        (HERE / "scorecard.json").write_text(json.dumps({"cells": cells, "commands": commands}, indent=1) + "\n")
        (HERE / "SCORECARD.md").write_text(markdown(cells, commands))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/jaxtrace-scorecard"))
