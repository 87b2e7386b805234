"""A corpus of malformed inputs, each run through the command line in-process: every one gives exit status 2 and
exactly one line `jaxtrace: error: ...` on stderr naming the offending file or option (never a traceback, never the
CLI's catch-all summary of an unexpected exception), and leaves earlier results as they were."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import jaxtrace.engine.loop
import jaxtrace.io.files
from conftest import SHARED, build_hf_model
from jaxtrace.cli import main

DATA = SHARED / "data"
PAIRS = [{"base": f"The {a} said that", "counterfactual": f"The {b} said that", "targets": [" she", " he"],
          "label": a} for a, b in (("nurse", "man"), ("doctor", "woman"), ("teacher", "man"), ("engineer", "woman"))]
# The CLI's last-resort summary of an exception it did not expect: "SomeError: ...".
CATCH_ALL = re.compile(r"[A-Z]\w*(Error|Exception|Interrupt)\b")


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # not what the test printed before (e.g. transformers' progress bars)
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_error(capsys, *argv, names=(), code=2) -> str:
    """Run the CLI; check the exit status and the single error line naming each of `names`; return the line."""
    status, out, err = run(capsys, *argv)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert status == code and len(lines) == 1, err
    prefix = "jaxtrace: error: " if code == 2 else "jaxtrace: "
    assert lines[0].startswith(prefix), lines[0]
    assert not CATCH_ALL.match(lines[0].removeprefix(prefix)), f"the CLI's catch-all answered: {lines[0]}"
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    record_message(lines[0])
    return lines[0]


def record_message(line: str) -> None:
    """With JAXTRACE_MESSAGES=FILE, append the test's name and the one line it checked to FILE (the corpus's
    messages, for a report)."""
    if os.environ.get("JAXTRACE_MESSAGES"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(os.environ["JAXTRACE_MESSAGES"], "a") as file:
            file.write(f"{test}\t{line}\n")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def save_with_gpt2_tokenizer(model, folder: Path) -> Path:
    from transformers import GPT2Tokenizer

    model.save_pretrained(folder)
    GPT2Tokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def gpt2_dir(tiny_gpt2) -> Path:
    return tiny_gpt2[0]


def trace_args(model, pairs, out, *more):
    return ["trace", "--model", model, "--task", "custom", "--data", pairs, "--site", "head_out", "--epochs", "1",
            "--batch-size", "2", "--out", out, "--no-progress", *more]


@pytest.fixture(scope="module")
def finished(gpt2_dir, pairs, tmp_path_factory) -> Path:
    """A finished trace's result folder (circuit.json, checkpoints/1, z/, ...)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in trace_args(gpt2_dir, pairs, out)]) == 0
    assert (out / "circuit.json").is_file()
    return out


def copy_model(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------------------------
# Model folders


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


MODEL_CASES = {
    "truncated safetensors": (lambda f: _truncate(f / "model.safetensors", 0.5), ["model.safetensors", "truncated"]),
    "header-only safetensors": (lambda f: _truncate(f / "model.safetensors", 0.001), ["model.safetensors"]),
    "empty safetensors": (lambda f: (f / "model.safetensors").write_bytes(b""), ["model.safetensors", "empty"]),
    "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), ["config.json", "JSON object"]),
    "config lacks a key": (lambda f: edit_config(f, n_embd=None), ["config.json", "missing key 'n_embd'"]),
    "string for a number": (lambda f: edit_config(f, n_embd="32"), ["config.json", "'n_embd'", "integer"]),
    "hidden not divisible by heads": (lambda f: edit_config(f, n_head=5), ["config.json", "not divisible"]),
    "config invalid JSON": (lambda f: (f / "config.json").write_text('{"model_type": "gpt2",'),
                            ["config.json", "not valid JSON"]),
    "index invalid JSON": (lambda f: (f / "model.safetensors.index.json").write_text("{oops"),
                           ["model.safetensors.index.json", "not valid JSON"]),
    "index without weight_map": (lambda f: (f / "model.safetensors.index.json").write_text('{"metadata": {}}'),
                                 ["model.safetensors.index.json", "weight_map"]),
    "tokenizer.json invalid JSON": (lambda f: (f / "tokenizer.json").write_text('{"version": '),
                                    ["tokenizer.json", "not valid JSON"]),
    "tokenizer_config.json invalid JSON": (lambda f: (f / "tokenizer_config.json").write_text("{,}"),
                                           ["tokenizer_config.json", "not valid JSON"]),
    "tokenizer_config.json a list": (lambda f: (f / "tokenizer_config.json").write_text("[]"),
                                     ["tokenizer_config.json", "JSON object"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_malformed_model_folder(case, gpt2_dir, tmp_path, capsys):
    folder = copy_model(gpt2_dir, tmp_path)
    damage, names = MODEL_CASES[case]
    damage(folder)
    expect_error(capsys, "info", "--model", folder, names=names)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    build_hf_model("llama").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("changes,names", [
    (dict(num_key_value_heads=3), ["num_attention_heads=4 is not a multiple of num_key_value_heads=3"]),
    (dict(num_attention_heads=5, num_key_value_heads=1, head_dim=None),
     ["hidden_size=32 is not divisible by num_attention_heads=5"]),
    (dict(rms_norm_eps="small"), ["'rms_norm_eps'"]),
    (dict(hidden_act="swiglu"), ["unsupported activation 'swiglu'"]),
])
def test_inconsistent_llama_config(changes, names, llama_dir, tmp_path, capsys):
    folder = copy_model(llama_dir, tmp_path)
    edit_config(folder, **changes)
    expect_error(capsys, "info", "--model", folder, names=[folder / "config.json", *names])


# ---------------------------------------------------------------------------------------------------------------
# GGUF files


def test_truncated_gguf(tmp_path, capsys):
    """The SmolLM2 GGUF cut inside its metadata (a 1 MB partial download)."""
    from jaxtrace.io.loading import resolve_model_path

    path = tmp_path / "cut.gguf"
    with open(resolve_model_path("smollm2-135m"), "rb") as f:
        path.write_bytes(f.read(1_000_000))
    expect_error(capsys, "info", "--model", path, names=[path, "is truncated"])


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_gguf_cut_inside_its_tensors(cut, tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((96, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[:-cut])
    expect_error(capsys, "info", "--model", path, names=[path, "is truncated"])


@pytest.mark.parametrize("content,names", [(b"PK\x03\x04 a zip file", ["not a GGUF file"]), (b"", ["empty"])])
def test_not_a_gguf_file(content, names, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    expect_error(capsys, "info", "--model", path, names=[path, *names])


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers and models that do not fit the task


def evaluate_args(model, task, data, *more):
    return ["evaluate", "--model", model, "--task", task, "--data", data, "--site", "head_out", "--select", "0.0",
            *more]


def test_missing_tokenizer_folder(gpt2_dir, pairs, tmp_path, capsys):
    expect_error(capsys, *evaluate_args(gpt2_dir, "custom", pairs, "--tokenizer", tmp_path / "nowhere"),
                 names=[tmp_path / "nowhere"])


def test_tokenizer_folder_without_tokenizer(gpt2_dir, pairs, tmp_path, capsys):
    expect_error(capsys, *evaluate_args(gpt2_dir, "custom", pairs, "--tokenizer", tmp_path),
                 names=[tmp_path, "no tokenizer files"])


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory) -> Path:
    """A vocabulary-96 GPT-2 saved with the real GPT-2 tokenizer (ids up to 50256)."""
    return save_with_gpt2_tokenizer(build_hf_model("gpt2"), tmp_path_factory.mktemp("small_vocab"))


def test_tokenizer_of_another_model_is_refused(small_vocab_dir, pairs, capsys):
    import jaxtrace
    from jaxtrace.engine.objective import check_task_fits
    from jaxtrace.tasks import build_task

    model, tokenizer = jaxtrace.load_model(small_vocab_dir)
    with pytest.raises(ValueError, match="outside the 96-token vocabulary"):
        check_task_fits(build_task("custom", pairs, tokenizer), model.config)
    expect_error(capsys, *evaluate_args(small_vocab_dir, "custom", pairs),
                 names=[small_vocab_dir, "does not belong", "--tokenizer"])


def test_prompts_longer_than_the_positions(tmp_path, capsys):
    folder = save_with_gpt2_tokenizer(build_hf_model("gpt2", n_positions=8, vocab_size=50257), tmp_path / "short")
    long = write_jsonl(tmp_path / "long.jsonl", [
        PAIRS[0], {**PAIRS[1], "base": "Yesterday, the doctor in the big hospital said that",
                   "counterfactual": "Yesterday, the woman in the big hospital said that", "label": "long one"}])
    expect_error(capsys, *evaluate_args(folder, "custom", long), names=["long one", "8 positions", folder])


# ---------------------------------------------------------------------------------------------------------------
# Data files


def _spoil_line(path: Path, number: int) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = lines[number - 1][:4] + b"\xff\xfe" + lines[number - 1][4:]
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("task,file,line", [
    ("winobias", "winobias/pro_stereotyped_type1.txt.dev", 7),
    ("winobias", "winobias/female_occupations.txt", 3),
    ("winogender", "winogender/winogender_templates_structurefilter.tsv", 5),
    ("professions", "professions/templates.txt", 2),
])
def test_non_utf8_data_file(task, file, line, gpt2_dir, tmp_path, capsys):
    data = Path(shutil.copytree(DATA, tmp_path / "data"))
    _spoil_line(data / file, line)
    expect_error(capsys, *evaluate_args(gpt2_dir, task, data), names=[f"{data / file}:{line}", "UTF-8"])


CUSTOM_CASES = {
    "non-UTF-8 bytes": (b'{"base": "The nurse said that", "counterfactual": "The man\xff said that"}\n', 1, "UTF-8"),
    "a list, not an object": (json.dumps(PAIRS[0]) + "\n[1, 2]\n", 2, "JSON object"),
    "invalid JSON": (json.dumps(PAIRS[0]) + '\n{"base": \n', 2, "invalid JSON"),
    "empty base prompt": (json.dumps({**PAIRS[0], "base": ""}) + "\n", 1, "base prompt is empty"),
    "blank counterfactual": (json.dumps({**PAIRS[0], "counterfactual": "  "}) + "\n", 1, "counterfactual prompt"),
}


@pytest.mark.parametrize("case", list(CUSTOM_CASES))
def test_malformed_custom_jsonl(case, gpt2_dir, tmp_path, capsys):
    content, line, what = CUSTOM_CASES[case]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    expect_error(capsys, *evaluate_args(gpt2_dir, "custom", path), names=[f"{path}:{line}", what])


def test_empty_custom_jsonl(gpt2_dir, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n\n")
    expect_error(capsys, *evaluate_args(gpt2_dir, "custom", path), names=[path, "empty"])


def test_every_dropped_winobias_line_is_reported(gpt2_dir, tmp_path, capsys):
    """A line whose brackets were removed is dropped by the reference's rules, like the 38 dev pairs the reference
    itself drops: the task keeps the other pairs, and every dropped line pair is reported (the loader's `dropped`,
    printed by the CLI) with its file, line numbers and reason."""
    from jaxtrace.tasks import load_winobias

    data = Path(shutil.copytree(DATA / "winobias", tmp_path / "winobias"))
    path = data / "pro_stereotyped_type1.txt.dev"
    lines = path.read_text().splitlines()
    assert lines[4].startswith("5 [The mover]")  # lines 5-6: the first pair the reference keeps
    lines[4] = lines[4].replace("[", "").replace("]", "")
    path.write_text("\n".join(lines) + "\n")
    pairs = load_winobias(data)
    assert len(pairs) == 159 and len(pairs.dropped) == 39
    assert pairs.dropped[1] == (f"{path}:3-4", "the two lines' text before the pronoun differs")
    # The CLI prints them all as it loads the task (here before refusing --select, so that nothing is compiled).
    _, out, err = run(capsys, *[a for a in evaluate_args(gpt2_dir, "winobias", data) if a != "0.0"], "9.9")
    assert "Traceback" not in out + err and "--select" in err
    assert "skipped    39 line pairs of the data" in out
    assert f"{path}:5-6: line 5 has 0 '[' (expected 2" in out
    assert f"{path}:1-2: the pronouns are of different kinds" in out  # one of the reference's own 38
    reported = [line for line in out.splitlines() if line.startswith(f"           {path}:")]
    assert len(reported) == 39


# ---------------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("option,value", [
    ("--max-components", "-1"), ("--lr", "nan"), ("--lambda1", "inf"), ("--lambda2", "-0.5"), ("--epochs", "0"),
    ("--batch-size", "0"), ("--epochs", "1.5"), ("--threshold", "0"), ("--memory-gb", "nan"), ("--mesh", "data=3"),
    ("--site", "residual"),
])
def test_bad_trace_option(option, value, gpt2_dir, pairs, finished, capsys):
    before = snapshot(finished)
    args = [a for a in trace_args(gpt2_dir, pairs, finished, "--resume") if a not in ("--epochs", "1")]
    expect_error(capsys, *args, option, value, names=[option])
    assert snapshot(finished) == before


@pytest.mark.parametrize("select", ["3-7", "1.2.3", ",", "99.0", "0.4"])
def test_bad_select(select, gpt2_dir, pairs, capsys):
    expect_error(capsys, *[a for a in evaluate_args(gpt2_dir, "custom", pairs) if a not in ("--select", "0.0")],
                 "--select", select, names=["--select", select])


@pytest.mark.parametrize("sizes", ["0,-1", "a,b", ""])
def test_bad_compare_sizes(sizes, gpt2_dir, pairs, finished, capsys):
    before = snapshot(finished)
    expect_error(capsys, "compare", "--model", gpt2_dir, "--task", "custom", "--data", pairs, "--out", finished,
                 "--sizes", sizes, names=["--sizes"])
    assert snapshot(finished) == before


def test_greedy_candidates_fewer_than_its_size_refused_before_any_work(gpt2_dir, pairs, tmp_path, capsys):
    expect_error(capsys, "compare", "--model", gpt2_dir, "--task", "custom", "--data", pairs, "--out",
                 tmp_path / "report", "--sizes", "2,5", "--greedy-candidates", "3", names=["--greedy-candidates 3"])
    assert not (tmp_path / "report").exists()


CIRCUIT_FILES = {
    "a JSON list": ("[1, 2, 3]", "not a jaxtrace circuit"),
    "an object missing keys": ('{"site": "head_out", "method": "pgbct"}', "missing required keys"),
    "invalid JSON": ('{"site": "head_out",', "not valid JSON"),
    "not UTF-8": (b'{"site": "\xff"}', "not valid JSON"),
}


@pytest.mark.parametrize("command", ["evaluate", "export"])
@pytest.mark.parametrize("case", list(CIRCUIT_FILES))
def test_not_a_circuit_file(command, case, tmp_path, capsys):
    content, what = CIRCUIT_FILES[case]
    path = tmp_path / "circuit.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    more = ["--out", tmp_path / "graph.json"] if command == "export" else []
    expect_error(capsys, command, "--circuit", path, *more, names=[path, what])
    assert not (tmp_path / "graph.json").exists()


def test_missing_circuit_file(tmp_path, capsys):
    expect_error(capsys, "export", "--circuit", tmp_path / "none.json", "--out", tmp_path / "g.json",
                 names=[tmp_path / "none.json", "not found"])


# ---------------------------------------------------------------------------------------------------------------
# Output folders and files


def test_out_is_a_file_or_under_one(gpt2_dir, pairs, finished, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    expect_error(capsys, *trace_args(gpt2_dir, pairs, blocker), names=["--out", blocker, "is a file"])
    expect_error(capsys, *trace_args(gpt2_dir, pairs, blocker / "run"), names=["--out", blocker, "is a file"])
    assert blocker.read_text() == "not a folder"
    expect_error(capsys, "export", "--circuit", finished / "circuit.json", "--out", blocker / "graph.json",
                 names=[blocker, "not a folder"])
    expect_error(capsys, "export", "--circuit", finished / "circuit.json", "--out", tmp_path,
                 names=[tmp_path, "is a folder"])


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only file systems: root ignores permission bits, so opening a file for writing inside them
    fails with EROFS instead (`read_only(folder)`)."""
    import os

    real_open, folders = os.open, []

    def read_only_open(path, flags, *args, **kwargs):
        if any(str(path).startswith(str(f)) for f in folders) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    return folders.append


def test_read_only_out(gpt2_dir, pairs, tmp_path, read_only, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    read_only(out)
    expect_error(capsys, *trace_args(gpt2_dir, pairs, out), names=["--out", out, "Read-only file system"])
    assert list(out.iterdir()) == []


def test_read_only_result_folder(tmp_path, monkeypatch, read_only):
    """The result folder itself says so too (the CLI checks before loading the model; a library caller may not)."""
    from jaxtrace.io import results

    monkeypatch.setattr(results, "check_out", lambda path: path)
    out = tmp_path / "ro"
    out.mkdir()
    read_only(out)
    with pytest.raises(results.ResultFolderError, match=f"--out {out}: cannot write to the folder \\(Read-only"):
        with results.ResultFolder(out, {"kind": "test"}):
            pass
    assert list(out.iterdir()) == []


def test_disk_full_while_staging_results(gpt2_dir, pairs, finished, tmp_path, monkeypatch, capsys):
    """A result file that cannot be written leaves the folder as it was (here a finished run, re-reported)."""
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(out)
    real = jaxtrace.io.files.atomic_path

    def full_disk(path):
        if ".staging" in Path(path).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(jaxtrace.io.files, "atomic_path", full_disk)
    line = expect_error(capsys, *trace_args(gpt2_dir, pairs, out, "--resume"),
                        names=[out / "examples.csv", "No space left on device", f"{out} is unchanged"])
    assert "--resume" in line
    assert snapshot(out) == before  # circuit.json as it was, no lock, no .staging


def test_disk_full_while_writing_in_place(gpt2_dir, pairs, finished, tmp_path, monkeypatch, capsys):
    """Orbax's z/ is written in place, after the old circuit.json is removed: a failure there leaves a folder that
    does not look finished, and --resume then writes the results again."""
    import orbax.checkpoint as ocp

    out = Path(shutil.copytree(finished, tmp_path / "run"))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full_disk)
    expect_error(capsys, *trace_args(gpt2_dir, pairs, out, "--resume"),
                 names=[f"cannot write {out / 'z'}", "No space left on device", f"{out} holds no finished result"])
    assert not (out / "circuit.json").exists() and not (out / ".jaxtrace.lock").exists()
    assert not (out / ".staging").exists()
    monkeypatch.undo()
    assert main([str(a) for a in trace_args(gpt2_dir, pairs, out, "--resume")]) == 0
    assert (out / "circuit.json").read_bytes() == (finished / "circuit.json").read_bytes()


def test_ctrl_c_during_a_trace(gpt2_dir, pairs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxtrace.engine.loop, "stacked_inputs", interrupted)
    line = expect_error(capsys, *trace_args(gpt2_dir, pairs, out), code=130)
    assert line == "jaxtrace: interrupted; resume with --resume"
    assert not (out / ".jaxtrace.lock").exists() and not (out / "circuit.json").exists()


def test_corrupted_checkpoint_on_resume(gpt2_dir, pairs, finished, tmp_path, capsys):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    for file in (out / "checkpoints" / "1").rglob("*"):
        if file.is_file() and "state" in file.relative_to(out).parts:
            file.write_bytes(b"\x00garbage")
    before = snapshot(out)
    expect_error(capsys, *trace_args(gpt2_dir, pairs, out, "--resume"),
                 names=[out / "checkpoints" / "1", "cannot be read"])
    assert snapshot(out) == before  # circuit.json and everything else as they were; no lock left


def test_checkpoint_save_failure(gpt2_dir, pairs, tmp_path, monkeypatch, capsys):
    """Orbax writes asynchronously: an error (here asyncio's CancelledError, not an Exception) surfaces when the
    epoch's save is waited for, and again when the manager closes."""
    import asyncio

    import orbax.checkpoint as ocp

    def fail(*args, **kwargs):
        raise asyncio.CancelledError()

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", fail)
    out = tmp_path / "run"
    expect_error(capsys, *trace_args(gpt2_dir, pairs, out), names=["cannot save checkpoint", out / "checkpoints"])
    assert not (out / ".jaxtrace.lock").exists() and not (out / "circuit.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Help


@pytest.mark.parametrize("command", ["info", "trace", "demo", "baseline", "compare", "evaluate", "sweep", "export"])
def test_help(command, capsys):
    code, out, err = run(capsys, command, "--help")
    assert code == 0 and not err
    options = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", out, re.MULTILINE))
    assert ("--task" in options) == (command in ("trace", "demo", "baseline", "compare", "evaluate"))
    assert ("--out" in options) == (command not in ("info", "evaluate"))
    assert command != "sweep" or {"--tasks", "--models"} <= options
