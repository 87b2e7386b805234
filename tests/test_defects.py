"""Issue 23: defects of result folders, caches and checks, each run through the command line in-process like
test_malformed.py (exit status, the one line naming the file or option, no traceback, earlier results unchanged)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtrace.cli import main
from jaxtrace.io.results import LOCK, FolderBusyError, ResultFolder
from test_malformed import (expect_error, finished, gpt2_dir, pairs, record_message, run, snapshot,  # noqa: F401
                            trace_args)


def sweep_args(model, pairs, out, epochs, *more):
    return ["sweep", "--models", model, "--tasks", "custom", "--data", pairs, "--site", "head_out", "--epochs",
            epochs, "--batch-size", "2", "--out", out, "--no-progress", *more]


# ---------------------------------------------------------------------------------------------------------------
# 1. A sweep rerun with other --epochs


def test_sweep_rerun_with_more_epochs_extends_its_pairs(gpt2_dir, pairs, tmp_path, capsys):
    out = tmp_path / "sweep"
    pair = out / gpt2_dir.name / "custom"
    code, _, err = run(capsys, *sweep_args(gpt2_dir, pairs, out, 1))
    assert code == 0, err
    assert len(json.loads((pair / "circuit.json").read_text())["history"]) == 1
    code, _, err = run(capsys, *sweep_args(gpt2_dir, pairs, out, 2))
    assert code == 0, err
    circuit = json.loads((pair / "circuit.json").read_text())
    manifest = json.loads((out / "sweep.json").read_text())
    assert [row["epoch"] for row in circuit["history"]] == [1, 2] and circuit["search"]["epochs"] == 2
    assert manifest["search"]["epochs"] == 2
    assert [(p["status"], p["epochs"]) for p in manifest["pairs"]] == [("done", 2)]
    # Fewer epochs than the pairs ran: refused, nothing changed.
    before = snapshot(out)
    expect_error(capsys, *sweep_args(gpt2_dir, pairs, out, 1),
                 names=["--epochs 1", "the 2 epochs", pair / "circuit.json"])
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------------------------
# 2. The converted-model cache


def test_a_changed_converted_model_cache_entry_is_converted_again(tmp_path, monkeypatch, caplog):
    """A GGUF is converted once into the cache (keyed by the GGUF's SHA-256, which is what the run identity hashes):
    an entry whose tensors changed since is not used but converted again, with one line saying so."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file, save_file

    import jaxtrace
    from jaxtrace.io.loading import _converted_path
    from test_gguf import gguf_tensors, tiny_model, write_gguf

    monkeypatch.setenv("JAXTRACE_CACHE", str(tmp_path / "cache"))
    add_token_list = gguf.GGUFWriter.add_token_list  # and BPE merges: a tokenizer the converted entry holds
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_list", lambda w, tokens: (
        add_token_list(w, ["t", "1", "t1", *tokens[3:]]), w.add_token_merges(["t 1"])))
    model = tiny_model("llama", tie_word_embeddings=False)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", model.config, gguf_tensors(model, "llama"))
    first = jaxtrace.load_model(path)[0]
    entry = _converted_path(path)
    assert (entry / "model.safetensors").is_file() and (entry / "sha256.json").is_file()
    # The entry as written is used as it is (no conversion, no message).
    caplog.clear()
    assert np.array_equal(np.asarray(jaxtrace.load_model(path)[0].embed_tokens[...]), np.asarray(first.embed_tokens[...]))
    assert not caplog.records
    # Its tensors replaced by others of the same shapes (same size): converted again, said in one line.
    tensors = load_file(entry / "model.safetensors")
    save_file({k: np.ascontiguousarray(v[::-1]) for k, v in tensors.items()}, entry / "model.safetensors",
              metadata={"source": path.name})
    caplog.clear()
    again = jaxtrace.load_model(path)[0]
    assert np.array_equal(np.asarray(again.embed_tokens[...]), np.asarray(first.embed_tokens[...]))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert str(entry) in messages[0] and "model.safetensors differs" in messages[0]
    assert f"converting {path} again" in messages[0]
    assert np.array_equal(load_file(entry / "model.safetensors")["model.embed_tokens.weight"],
                          tensors["model.embed_tokens.weight"])  # the entry is whole again


def test_an_unwritable_converted_model_cache_is_one_line(tmp_path, monkeypatch, caplog):
    """A cache whose converted/ cannot be made (a file in its place): the GGUF loads, converted anew each time, and
    each load says so in one line naming the folder."""
    import gguf
    import numpy as np

    import jaxtrace
    from test_gguf import gguf_tensors, tiny_model, write_gguf

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "converted").write_text("")
    monkeypatch.setenv("JAXTRACE_CACHE", str(tmp_path / "cache"))
    add_token_list = gguf.GGUFWriter.add_token_list  # and BPE merges: a tokenizer the GGUF holds
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_list", lambda w, tokens: (
        add_token_list(w, ["t", "1", "t1", *tokens[3:]]), w.add_token_merges(["t 1"])))
    model = tiny_model("llama", tie_word_embeddings=False)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", model.config, gguf_tensors(model, "llama"))
    loaded = []
    for _ in range(2):
        caplog.clear()
        loaded.append(np.asarray(jaxtrace.load_model(path)[0].embed_tokens[...]))
        assert [r.getMessage() for r in caplog.records] == [
            f"converted-model cache {tmp_path / 'cache' / 'converted'} cannot be written (Not a directory): "
            f"{path} is converted again at every load"]
        record_message(caplog.records[0].getMessage())
    assert np.array_equal(*loaded)


# ---------------------------------------------------------------------------------------------------------------
# 3. evaluate --circuit on a model other than the circuit's


def test_evaluate_refuses_a_model_other_than_the_circuits(gpt2_dir, pairs, tmp_path, capsys):
    from conftest import build_hf_model
    from test_malformed import save_with_gpt2_tokenizer

    model = Path(shutil.copytree(gpt2_dir, tmp_path / "model"))
    out = tmp_path / "run"
    assert main([str(a) for a in trace_args(model, pairs, out)]) == 0
    circuit = out / "circuit.json"
    before = snapshot(out)
    code, stdout, err = run(capsys, "evaluate", "--circuit", circuit)
    assert code == 0 and "effect" in stdout, err
    # Another model of another shape, named with --model, or in the circuit's own model folder.
    deeper = save_with_gpt2_tokenizer(build_hf_model("gpt2", n_layer=3, vocab_size=50257), tmp_path / "deeper")
    line = expect_error(capsys, "evaluate", "--circuit", circuit, "--model", deeper,
                        names=[f"{circuit} was traced on a model with n_layers 2; --model {deeper} has 3"])
    for file in model.iterdir():
        file.unlink()
    for file in deeper.iterdir():
        shutil.copy(file, model / file.name)
    expect_error(capsys, "evaluate", "--circuit", circuit,
                 names=[f"{circuit} was traced on a model with n_layers 2; its model {model} has 3"])
    # The folder's weights replaced by others of the same shape: their digest is not the run's.
    for file in model.iterdir():
        file.unlink()
    save_with_gpt2_tokenizer(build_hf_model("gpt2", seed=5, vocab_size=50257), model)
    expect_error(capsys, "evaluate", "--circuit", circuit,
                 names=[f"its model {model}: its weights differ from the run's ({out / 'run.json'} records sha256"])
    assert snapshot(out) == before
    assert line.count("\n") == 0


# ---------------------------------------------------------------------------------------------------------------
# 4. The weights digest cache


def test_weights_replaced_with_the_old_mtime_are_not_the_runs(gpt2_dir, pairs, tmp_path, monkeypatch, capsys):
    """Bytes of the same size written in place (same inode), the old mtime restored (`cp -p`): the digest
    remembered for the file's path, size and mtime is not reused (its ctime changed), and --resume is refused."""
    import os

    from conftest import build_hf_model

    monkeypatch.setenv("JAXTRACE_CACHE", str(tmp_path / "cache"))
    model = Path(shutil.copytree(gpt2_dir, tmp_path / "model"))
    out = tmp_path / "run"
    assert main([str(a) for a in trace_args(model, pairs, out)]) == 0
    weights = model / "model.safetensors"
    stat = weights.stat()
    other = tmp_path / "other"
    build_hf_model("gpt2", seed=5, vocab_size=50257).save_pretrained(other)
    data = (other / "model.safetensors").read_bytes()
    assert len(data) == stat.st_size and data != weights.read_bytes()
    with open(weights, "r+b") as f:
        f.write(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns, weights.stat().st_ino) == (
        stat.st_size, stat.st_mtime_ns, stat.st_ino)
    before = snapshot(out)
    expect_error(capsys, *trace_args(model, pairs, out, "--resume"),
                 names=[f"cannot resume {out}", "model.weights"])
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------------------------
# 5. --overwrite keeps the earlier result until the new one is published


def nan_model(folder: Path, tmp_path: Path) -> Path:
    """A copy of the model folder whose final norm is NaN: it loads, and every effect is NaN."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    model = Path(shutil.copytree(folder, tmp_path / "nan-model"))
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("ln_f.weight"))
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_a_failed_overwrite_leaves_the_earlier_result(gpt2_dir, pairs, finished, tmp_path, capsys):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(out)
    bad = nan_model(gpt2_dir, tmp_path)
    line = expect_error(capsys, *trace_args(bad, pairs, out, "--overwrite"), names=["not finite"])
    assert snapshot(out) == before, line  # circuit.json, checkpoints, run.json: the earlier run, whole
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in finished.iterdir())
    # Interrupted too.
    import jaxtrace.engine.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jaxtrace.engine.loop, "stacked_inputs", interrupted)
        expect_error(capsys, *trace_args(gpt2_dir, pairs, out, "--overwrite", "--lambda1", "0.5"), code=130)
    assert snapshot(out) == before
    # An overwrite that ends well replaces it, and leaves nothing set aside.
    code, _, err = run(capsys, *trace_args(gpt2_dir, pairs, out, "--overwrite", "--lambda1", "0.5"))
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["identity"]["settings"]["lambda1"] == 0.5
    assert not (out / ".replaced").exists() and not (out / ".jaxtrace.lock").exists()


def test_a_killed_overwrite_keeps_the_run_it_replaced(tmp_path):
    """A run killed while it overwrites leaves the run it replaced in .replaced/: the next --overwrite keeps that one
    (not the killed run's start) until it ends, and puts it back if it fails."""
    out = tmp_path / "run"
    with ResultFolder(out, {"run": 1}) as folder:
        (folder.path / "circuit.json").write_text("first")
    folder = ResultFolder(out, {"run": 2}, overwrite=True).__enter__()  # killed: never exits
    (out / "checkpoints").mkdir()
    (out / ".jaxtrace.lock").unlink()
    assert (out / ".replaced" / "circuit.json").read_text() == "first" and not (out / "circuit.json").exists()
    with pytest.raises(RuntimeError):
        with ResultFolder(out, {"run": 3}, overwrite=True):
            assert not (out / "checkpoints").exists()
            raise RuntimeError("failed")
    assert (out / "circuit.json").read_text() == "first" and not (out / ".replaced").exists()
    assert json.loads((out / "run.json").read_text()) == {"identity": {"run": 1}}
    del folder


# ---------------------------------------------------------------------------------------------------------------
# 6. A folder holding only a run's identity


def interrupt_before_the_first_checkpoint(patch) -> None:
    import jaxtrace.engine.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    patch.setattr(jaxtrace.engine.loop, "stacked_inputs", interrupted)


@pytest.mark.parametrize("again", ["plain", "--resume"])
def test_a_run_that_ended_before_its_first_checkpoint_starts_again(again, gpt2_dir, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_before_the_first_checkpoint(patch)
        expect_error(capsys, *trace_args(gpt2_dir, pairs, out), code=130)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "run.json"]
    # Another run is refused, naming what differs; the folder is left as it was.
    before = snapshot(out)
    expect_error(capsys, *trace_args(gpt2_dir, pairs, out, "--lambda1", "0.7"),
                 names=[f"{out} holds the start of a different run", "settings.lambda1 0.5 -> 0.7", "--overwrite"])
    assert snapshot(out) == before
    # The same run starts afresh, resumed or not.
    code, _, err = run(capsys, *trace_args(gpt2_dir, pairs, out, *([again] if again != "plain" else [])))
    assert code == 0, err
    assert len(json.loads((out / "circuit.json").read_text())["history"]) == 1


def test_resume_into_an_empty_folder_is_refused_and_leaves_it_empty(gpt2_dir, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    expect_error(capsys, *trace_args(gpt2_dir, pairs, out, "--resume"),
                 names=[f"no checkpoint to resume from in {out / 'checkpoints'}", "run without --resume"])
    assert list(out.iterdir()) == []
    code, _, err = run(capsys, *trace_args(gpt2_dir, pairs, out))
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------------------
# 7. Data files with a UTF-8 byte-order mark


def test_data_files_with_a_byte_order_mark(gpt2_dir, pairs, tmp_path, capsys):
    """Every file of the WinoBias folder (and a custom JSONL file) written with a BOM first, as some editors do,
    reads as the same data: the same pairs, the same dropped lines and reasons, no error."""
    from test_malformed import DATA, evaluate_args

    from jaxtrace.tasks import load_winobias

    data = Path(shutil.copytree(DATA / "winobias", tmp_path / "winobias"))
    for file in data.iterdir():
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    plain, marked = load_winobias(DATA / "winobias"), load_winobias(data)
    assert list(marked) == list(plain)
    assert [(where.replace(str(data), "D"), why) for where, why in marked.dropped] == [
        (where.replace(str(DATA / "winobias"), "D"), why) for where, why in plain.dropped]
    custom = tmp_path / "pairs.jsonl"
    custom.write_bytes(b"\xef\xbb\xbf" + pairs.read_bytes())
    code, out, err = run(capsys, *evaluate_args(gpt2_dir, "custom", custom))
    assert code == 0 and "effect" in out, err


# ---------------------------------------------------------------------------------------------------------------
# 8. Permissions of published files


def test_published_files_get_the_users_permissions(gpt2_dir, pairs, tmp_path, capsys):
    """Files written through the atomic writer are created like any other file of the user (0666 less the umask),
    not with a temporary file's 0600."""
    import os
    import stat

    from jaxtrace.io.files import write_text

    out = tmp_path / "run"
    umask = os.umask(0o002)
    try:
        code, _, err = run(capsys, *trace_args(gpt2_dir, pairs, out))
        assert code == 0, err
        os.umask(0o077)
        write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file() and p.name[0] != "."}
    assert {"circuit.json", "run.json", "examples.csv", "log.csv", "z_map.png"} <= set(modes)
    assert modes == {name: 0o664 for name in modes}
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


# ---------------------------------------------------------------------------------------------------------------
# 9. What the task leaves out: one line, the list in the result folder, all of it with --verbose


def test_skipped_pairs_are_one_line_and_a_file(gpt2_dir, tmp_path, capsys):
    import csv

    from test_malformed import DATA

    from jaxtrace.tasks import load_winobias

    dropped = load_winobias(DATA / "winobias").dropped
    assert len(dropped) == 38

    def trace(out, *more):
        return run(capsys, "trace", "--model", gpt2_dir, "--task", "winobias", "--data", DATA, "--site", "head_out",
                   "--epochs", "1", "--batch-size", "64", "--out", out, "--no-progress", *more)

    out = tmp_path / "run"
    code, stdout, err = trace(out)
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("skipped")]
    assert lines == [f"skipped    38 line pairs of the data (reference's rules): listed in {out / 'skipped.csv'} "
                     "with the results (--verbose prints them)"]
    assert not [line for line in stdout.splitlines() if str(DATA) in line and "skipped" not in line]
    with open(out / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"] + ":" + r["lines"], r["reason"]) for r in rows] == list(dropped)
    assert rows[0]["file"].endswith(".dev") and "-" in rows[0]["lines"]
    # --verbose prints them all, as before.
    code, stdout, err = trace(tmp_path / "verbose", "--verbose")
    assert code == 0, err
    assert "skipped    38 line pairs of the data (the reference's rules):" in stdout
    assert sum(line.startswith(f"           {where}: ") for line in stdout.splitlines() for where, _ in dropped) == 38


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2", "--process-id", "5"], "--process-id 5 is outside 0..1 (--num-processes 2)"),
    (["--num-processes", "0"], "--num-processes must be >= 1, got 0"),
    (["--num-processes", "2", "--process-id", "1"], "needs --coordinator host:port"),
    (["--process-id", "3"], "needs --coordinator host:port"),
    (["--process-id", "-1"], "--process-id must be >= 0, got -1"),
    (["--coordinator-timeout", "0"], "--coordinator-timeout must be a positive number of seconds, got 0"),
])
def test_impossible_multi_process_flags_are_refused(flags, message, tmp_path, capsys, monkeypatch):
    """Multi-process flags that cannot describe a run were ignored by a single-process run: now one line, before
    any model is loaded (the model folder does not even exist)."""
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    assert main(["trace", "--model", str(tmp_path / "no-model"), "--task", "ioi", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxtrace: error: ") and message in err, err
    assert not out.exists()


def cli_process(*argv, tmp_path: Path, code: str | None = None) -> subprocess.CompletedProcess:
    """The command line in a process of its own (what it prints at exit and from other threads included); `code`:
    Python run before it (a fault to inject)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "JAXTRACE_CACHE": str(tmp_path / "cache")}
    for name in ("XLA_FLAGS", "JAXTRACE_DEBUG", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    program = f"{code or ''}\nimport sys\nfrom jaxtrace.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", program, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=300)


def one_error_line(done: subprocess.CompletedProcess, *names) -> str:
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("jaxtrace: error: "), done.stderr[-3000:]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    record_message(lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# 10. Weights that are not finite


@pytest.mark.parametrize("command", ["info", "trace", "evaluate"])
def test_weights_that_are_not_finite_are_named(command, gpt2_dir, pairs, tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from test_malformed import evaluate_args

    model = Path(shutil.copytree(gpt2_dir, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"
    tensors[name][0, :3] = [np.nan, np.inf, -np.inf]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    argv = {"info": ["info", "--model", model], "trace": trace_args(model, pairs, out),
            "evaluate": evaluate_args(model, "custom", pairs)}[command]
    expect_error(capsys, *argv, names=[f"{model}: tensor '{name}' is not finite: 3 of its 3,072 values are NaN or "
                                       "infinite"])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 11. plan stays abstract whatever the sizes


def test_a_plan_of_any_size_allocates_no_task(tmp_path, capsys):
    """10^9 pairs of 200 tokens (their token arrays alone would take 3 TiB): a plan that says it does not fit."""
    from jaxtrace.engine.plan import PlanReport

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                  "n_positions": 256}))
    code, stdout, err = run(capsys, "plan", "--model", config, "--pairs", 10**9, "--prompt-tokens", 200, "--site",
                            "head_out", "--device-memory-gb", 0.01, "--json")
    assert code == 0, err
    report = PlanReport.from_dict(json.loads(stdout.splitlines()[-1]))
    assert report.pairs == 10**9 and report.packed["training_rows"] == 32  # one pair a row, as in the run
    assert report.fits == {"training": False, "evaluation": False}
    assert not report.cached and report.cache_host_bytes > 10**9 * 200 * 4


# ---------------------------------------------------------------------------------------------------------------
# 12. A coordinator whose peers never arrive


@pytest.mark.parametrize("process", [0, 1])
def test_a_process_whose_peers_never_arrive_ends_in_one_line(process, tmp_path):
    """It says what it waits for, and after --coordinator-timeout ends with one line and status 2 (JAX aborts with a
    C++ stack at its own deadline). The model is not read before the processes have joined."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    done = cli_process("trace", "--model", tmp_path / "no-model", "--task", "ioi", "--out", out, "--coordinator",
                       f"localhost:{port}", "--num-processes", 2, "--process-id", process, "--coordinator-timeout", 2,
                       tmp_path=tmp_path)
    waits = f"process {process} waits at coordinator localhost:{port} for all 2 processes to join"
    assert f"{waits} (--coordinator-timeout 2 s)" in done.stdout
    one_error_line(done, f"process {process} waited 2 s at coordinator localhost:{port} for all 2 processes to join, "
                         "and not all did (--coordinator-timeout 2)", "the same --coordinator and --num-processes")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 13. Checkpoint faults: the one line, not Orbax's and asyncio's tracebacks from other threads


def test_a_damaged_latest_checkpoint_is_one_line(gpt2_dir, pairs, finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    for file in (out / "checkpoints" / "1" / "state" / "d").iterdir():  # the arrays' data, cut short
        file.write_bytes(file.read_bytes()[:20])
    before = snapshot(out)
    done = cli_process(*trace_args(gpt2_dir, pairs, out, "--resume"), tmp_path=tmp_path)
    one_error_line(done, f"checkpoint {out / 'checkpoints' / '1'} cannot be read", "--overwrite")
    assert snapshot(out) == before


NO_SPACE_IN_BACKGROUND = """
import errno
from orbax.checkpoint._src.serialization import ocdbt_utils

async def no_space(*args, **kwargs):  # in Orbax's background save thread
    raise OSError(errno.ENOSPC, "No space left on device")

ocdbt_utils.merge_ocdbt_per_process_files = no_space
"""


def test_a_full_disk_during_a_checkpoint_save_is_one_line(gpt2_dir, pairs, tmp_path):
    out = tmp_path / "run"
    done = cli_process(*trace_args(gpt2_dir, pairs, out), tmp_path=tmp_path, code=NO_SPACE_IN_BACKGROUND)
    one_error_line(done, f"cannot save checkpoint {out / 'checkpoints' / '1'}", "No space left on device")
    assert not (out / "circuit.json").exists() and not (out / ".jaxtrace.lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# Corpus: stale, garbage and foreign-host lock files


@pytest.mark.parametrize("content, taken_over, names", [
    ("{host} 999999999", True, []),                                   # a process of this host that is gone
    ("\x00\xff garbage that names no process", False, ["another process"]),
    ("", False, ["another process"]),
    ("node-17.cluster 4242", False, ["process 4242 on node-17.cluster"]),  # alive or not, it cannot be checked
])
def test_lock_files_left_behind(content, taken_over, names, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(content.format(host=socket.gethostname()), errors="surrogateescape")
    if taken_over:
        with ResultFolder(out, {"kind": "test"}):
            assert (out / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}"
        assert not (out / LOCK).exists()
        return
    with pytest.raises(FolderBusyError) as error:
        ResultFolder(out, {"kind": "test"}).__enter__()
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names)
    assert f"lock {out / LOCK}" in message and "remove the lock" in message
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing else written


# ---------------------------------------------------------------------------------------------------------------
# Corpus: resuming across the options that change what a run computes


@pytest.mark.parametrize("flags, field", [
    (["--dtype", "bfloat16"], "dtype"),
    (["--warm-start", "atp"], "settings.warm_start None -> 'atp'"),
    (["--scale", "none"], "settings.scale 'effect' -> 'none'"),
    (["--direction", "keep"], "settings.direction 'patch' -> 'keep'"),
])
def test_a_resume_with_another_computation_is_refused_naming_it(flags, field, gpt2_dir, pairs, finished, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    expect_error(capsys, *trace_args(gpt2_dir, pairs, out, "--resume", *flags), names=[f"cannot resume {out}", field])
    assert snapshot(out) == before


def test_a_resume_across_attention_forms_is_refused_naming_it(gpt2_dir, pairs, tmp_path, capsys):
    """attn_pattern computed in the explicit form, resumed in the fused one: refused naming the field; `auto`,
    which resolves to the form the run used, resumes."""
    out = tmp_path / "run"
    args = [*trace_args(gpt2_dir, pairs, out)[:-1], "--site", "attn_pattern", "--no-progress"]
    assert run(capsys, *args, "--attention", "explicit")[0] == 0
    before = snapshot(out)
    expect_error(capsys, *args, "--resume", "--attention", "fused",
                 names=[f"cannot resume {out}", "objective.attention 'explicit' -> 'fused'"])
    assert snapshot(out) == before
    code, _, err = run(capsys, *args, "--resume", "--attention", "auto", "--epochs", "2")
    assert code == 0, err
    assert len(json.loads((out / "circuit.json").read_text())["history"]) == 2


def test_a_resume_of_an_early_stopped_run(gpt2_dir, pairs, tmp_path, capsys):
    """A run that stopped early stays stopped when resumed with more --epochs (the same circuit and history);
    resuming it with another --patience is another run, refused naming the field."""
    out = tmp_path / "run"
    args = [*trace_args(gpt2_dir, pairs, out)[:-1], "--scale", "none", "--lambda1", "0.05", "--lambda2", "0.05",
            "--schedule", "exp", "--no-progress"]
    assert run(capsys, *args, "--epochs", "12")[0] == 0
    stopped = json.loads((out / "circuit.json").read_text())
    assert len(stopped["history"]) < 12
    assert run(capsys, *args, "--epochs", "14", "--resume")[0] == 0
    resumed = json.loads((out / "circuit.json").read_text())
    assert (resumed["selected"], resumed["history"]) == (stopped["selected"], stopped["history"])
    before = snapshot(out)
    expect_error(capsys, *args, "--epochs", "14", "--patience", "0", "--resume",
                 names=[f"cannot resume {out}", "settings.patience 2 -> 0"])
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------------------------
# Corpus: a damaged or unwritable compiled-program cache


def test_a_damaged_compiled_program_cache_is_one_line(gpt2_dir, pairs, tmp_path):
    """Every compiled program in the user cache overwritten with garbage: the run compiles them again and finds the
    same circuit, saying so in one line naming the cache (JAX warns twice a line for every entry, on every run)."""
    every_program = ("import functools, jaxtrace.io.cache as cache\n"  # kept however fast it compiled
                     "cache.enable_compilation_cache = functools.partial(cache.enable_compilation_cache, "
                     "min_seconds=0)")
    first = cli_process(*trace_args(gpt2_dir, pairs, tmp_path / "first"), tmp_path=tmp_path, code=every_program)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "cache" / "compile"
    entries = [path for path in folder.iterdir() if path.is_file()]
    assert entries
    for entry in entries:
        entry.write_bytes(b"\0garbage" * (entry.stat().st_size // 8 + 1))
    again = cli_process(*trace_args(gpt2_dir, pairs, tmp_path / "again"), tmp_path=tmp_path, code=every_program)
    assert again.returncode == 0 and again.stderr == "", again.stderr[-3000:]
    notes = [line for line in again.stdout.splitlines() if "compiled-program cache" in line]
    assert len(notes) == 1 and notes[0].startswith(f"compiled-program cache {folder}: an entry cannot be read (")
    assert notes[0].endswith(f"its program was compiled again (remove {folder} to rebuild the cache)")
    record_message(notes[0])
    selected = [json.loads((tmp_path / run / "circuit.json").read_text())["selected"] for run in ("first", "again")]
    assert selected[0] == selected[1]


def test_an_unwritable_compiled_program_cache_is_one_line(gpt2_dir, pairs, tmp_path, monkeypatch, capsys):
    """A cache folder whose compile/ cannot be made (a file in its place): the run goes on without the cache, and
    one line says so."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "compile").write_text("")
    monkeypatch.setenv("JAXTRACE_CACHE", str(tmp_path / "cache"))
    code, out, err = run(capsys, *trace_args(gpt2_dir, pairs, tmp_path / "run"))
    assert code == 0 and err == ""
    notes = [line for line in out.splitlines() if "compiled-program cache" in line]
    assert notes == [f"compiled-program cache {tmp_path / 'cache' / 'compile'} cannot be written (File exists): "
                     "every program is compiled anew (--no-compile-cache says the same without this line)"]
    record_message(notes[0])
    assert (tmp_path / "run" / "circuit.json").exists()
