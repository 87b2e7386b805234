"""The tokenizer a GGUF file describes, built from its own metadata with `gguf` and `tokenizers` (no torch).

Reproduces transformers' GGUF tokenizer conversion (v5, `integrations/gguf/gguf_tokenizer_mapping.py`) for the two
`tokenizer.ggml.model` kinds jaxtrace's models use:

- `gpt2`: byte-level BPE. Vocabulary spelled in GPT-2's byte alphabet, the file's merges, `ByteLevel` pre-tokenizer
  and decoder, or the split regex that `tokenizer.ggml.pre` names (`llama-bpe`, `qwen2`, ...) before `ByteLevel`.
- `llama`: sentencepiece-style BPE with byte fallback (`▁` for a space, `<0x..>` byte tokens). Merges come from
  the file, or are rebuilt from the vocabulary ranked by `tokenizer.ggml.scores`. The `gemma*` architectures use
  Gemma's shape: spaces become `▁` in a normalizer, no prefix space, all-space tokens respelled as `▁`s, merges
  ranked by file order. Others use Llama's: a `Metaspace` pre-tokenizer that prefixes the first word.

Control tokens become special added tokens, user-defined ones plain added tokens; bos/eos/unk/pad name the tokens
at the file's ids; BOS is prepended when `tokenizer.ggml.add_bos_token` says so (default on for `llama`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)

# Special tokens the transformers class a builder goes through registers by default (GPT2Tokenizer, GemmaTokenizer,
# LlamaTokenizer); transformers adds them even when the vocabulary lacks them, here only tokens the vocabulary has.
_BUILDER_SPECIALS = {
    "gpt2": ("<|endoftext|>",),
    "gemma": ("<bos>", "<eos>", "<unk>", "<pad>", "<mask>"),
    "llama": ("<s>", "</s>", "<unk>"),
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the regex that splits text before byte-level BPE (other names keep GPT-2's own split).
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def tokenizer_from_gguf(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer of the GGUF file at `path`, as transformers' `AutoTokenizer(..., gguf_file=...)` builds it.

    Raises ValueError naming the file for a tokenizer model other than gpt2/llama or missing tokenizer metadata.
    """
    from jaxtrace.io.loading.gguf import open_gguf

    path = Path(path)
    reader = open_gguf(path)
    meta = {key: _get(reader, f"tokenizer.ggml.{key}") for key in (
        "model", "pre", "tokens", "merges", "scores", "token_type", "bos_token_id", "eos_token_id",
        "padding_token_id", "unknown_token_id", "add_bos_token", "add_eos_token")}
    arch = _get(reader, "general.architecture")
    model, tokens = meta["model"], meta["tokens"]
    if model is None or not tokens:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise ValueError(f"{path}: missing GGUF tokenizer metadata {missing!r}")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(f"{path}: unsupported GGUF tokenizer model {model!r}; "
                         f"supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}")

    gemma = model == "llama" and arch in _GEMMA_ARCHITECTURES
    if meta["merges"] is None and meta["scores"] is None and not gemma:
        raise ValueError(f"{path}: missing GGUF tokenizer metadata 'tokenizer.ggml.merges' (nor 'scores' to rebuild "
                         "them from)")
    if model == "gpt2":
        backend, builder = _byte_level(tokens, _merges(tokens, meta["merges"], meta["scores"])), "gpt2"
    elif gemma:
        backend, builder = _gemma(tokens, meta["merges"]), "gemma"
    else:
        backend, builder = _sentencepiece(tokens, _merges(tokens, meta["merges"], meta["scores"])), "llama"
    _add_file_tokens(backend, tokens, meta["token_type"] or (), byte_level=model == "gpt2", builder=builder)
    if (split := PRE_TOKENIZER_SPLITS.get(meta["pre"])) is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def named(key: str) -> str | None:
        token_id = meta[key]
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} {token_id} is outside the vocabulary ({len(tokens)})")
        return tokens[token_id]

    kwargs: dict[str, Any] = dict(
        bos_token=named("bos_token_id"), eos_token=named("eos_token_id"), unk_token=named("unknown_token_id"),
        pad_token=named("padding_token_id"), name_or_path=str(path.parent), local_files_only=True)
    if arch in _GEMMA_ARCHITECTURES:  # transformers goes through GemmaTokenizer: its mask token and left padding
        kwargs.update(mask_token="<mask>", padding_side="left")
    if meta["add_bos_token"] is not None:
        kwargs["add_bos_token"] = bool(meta["add_bos_token"])
    elif model == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        kwargs["add_bos_token"] = True
    if meta["add_eos_token"] is not None:
        kwargs["add_eos_token"] = bool(meta["add_eos_token"])
    if (template := _get(reader, "tokenizer.chat_template")) is not None:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _get(reader: gguf.GGUFReader, key: str) -> Any:
    """A metadata value (scalar, string or list), or None when the key is absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (as `transformers.convert_slow_tokenizer.bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges(tokens: list[str], merges: list[str] | None, scores: list[float] | None) -> list[tuple[str, str]]:
    """The file's merges, or those its vocabulary implies, ranked by score."""
    if merges is not None:
        return [tuple(m.split(" ")) for m in merges]
    return _generate_merges({token: index for index, token in enumerate(tokens)}, dict(zip(tokens, scores)))


def _byte_level(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """GPT-2-style byte-level BPE; a token not written in the byte alphabet is respelled into it."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _gemma(tokens: list[str], merges: list[str] | None) -> Tokenizer:
    """Gemma's sentencepiece BPE. All-space tokens ("  ") are respelled "▁▁", as the normalizer writes spaces; merges
    missing from the file are rebuilt from the vocabulary in file order (Gemma's scores do not follow merge order)."""
    respelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(respelled)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    else:
        pairs = _generate_merges(vocab, {token: -index for index, token in enumerate(respelled)})
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    return tok


def _sentencepiece(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """Llama's sentencepiece BPE: `Metaspace` prefixes the first word with `▁` (whatever
    `tokenizer.ggml.add_space_prefix` says, as in transformers)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best score first (ties: longer left, then longer right
    part first, then token order); as `transformers.tokenization_utils_base.generate_merges` with `vocab_scores`."""
    merges = []
    for merge, score in scores.items():
        local = [(merge[:i], merge[i:]) for i in range(1, len(merge)) if merge[:i] in vocab and merge[i:] in vocab]
        if len(local) > 1:
            local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((score, left, right) for left, right in local)
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in merges]


def _add_file_tokens(tok: Tokenizer, tokens: list[str], token_types: list[int], byte_level: bool,
                     builder: str) -> None:
    """Added tokens: the builder class's default specials, then control tokens (special; in a byte-level vocabulary
    only those written in the byte alphabet, others are llama.cpp mislabels), then user-defined tokens (plain)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tok.add_tokens([AddedToken(t, special=True) for t in _BUILDER_SPECIALS[builder] if t in vocab])
    spelled = set(_bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(token, normalized=False, special=True)
               for token, kind in zip(tokens, token_types)
               if kind == _CONTROL and (spelled is None or set(token) <= spelled)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab(with_added_tokens=True)
    user_defined = [AddedToken(token, normalized=False, special=False)
                    for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED and token in vocab]
    if user_defined:
        tok.add_tokens(user_defined)
