"""A Hugging Face fast tokenizer as GGUF metadata, as llama.cpp's converter writes it.

Two kinds, told apart by the ``tokenizer.json`` model:

* **byte-level BPE** (GPT-2, Llama 3, Qwen, SmolLM): ``tokenizer.ggml.model = gpt2``, the vocabulary,
  the merges and llama.cpp's name for the pre-tokenizer (its regular expressions are built into
  llama.cpp and keyed by that name, so an unknown one is refused);
* **SentencePiece BPE** (Llama 2, Mistral, Mixtral, Gemma, Phi-3: BPE with byte fallback on text
  whose spaces are escaped as ``▁``): ``tokenizer.ggml.model = llama``, each piece with a score and
  a type, and whether a ``▁`` is prepended to the text. llama.cpp's SentencePiece tokenizer merges
  the adjacent pair whose merged piece scores highest (leftmost first), which is BPE's rule when a
  piece's score orders it as its first merge ranks: the score of a piece is minus the rank of the
  first merge that makes it (0 for pieces no merge makes: characters, bytes, control tokens).
  The converter reads the scores from ``tokenizer.model``; a fast tokenizer has none, and these
  give the same merges.

Unigram tokenizers (T5's) and other models are refused with the model's name.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lowbit.errors import LowbitError

# HF tokenizer.json pre-tokenizer (as canonical JSON) -> llama.cpp's pre-tokenizer name.
_PRE_TOKENIZERS = {
    json.dumps({"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel", "use_regex": True},
               sort_keys=True): "gpt-2",
    json.dumps({"pretokenizers": [{"individual_digits": True, "type": "Digits"},
                                  {"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel",
                                   "use_regex": True}], "type": "Sequence"}, sort_keys=True): "smollm",
    json.dumps({"pretokenizers": [{"behavior": "Isolated", "invert": False, "pattern": {"Regex": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")}, "type": "Split"},
        {"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel", "use_regex": False}], "type": "Sequence"},
        sort_keys=True): "qwen2",
}

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's escaped space
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_tokenizer(w: Any, tokenizer: object, n_vocab: int) -> None:
    """Write ``tokenizer`` (a fast tokenizer) into the GGUF writer ``w``, its vocabulary padded
    with unused tokens to the model's ``n_vocab`` embedding rows (llama.cpp checks the two agree);
    LowbitError for a tokenizer llama.cpp cannot represent."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("the GGUF writer needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise LowbitError(f"the GGUF writer handles BPE tokenizers (byte-level or SentencePiece), not {model['type']}")
    if model.get("byte_fallback"):
        _add_sentencepiece(w, spec, n_vocab)
    else:
        _add_byte_level(w, spec, n_vocab)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            add(int(tid))
    # llama.cpp adds BOS and EOS only when told; the HF tokenizer's own post-processor decides here
    probe = tokenizer("a")["input_ids"]  # type: ignore[operator]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    w.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    if bool(probe) and eos is not None and probe[-1] == eos:
        w.add_add_eos_token(True)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)


def _vocabulary(spec: dict, n_vocab: int) -> tuple[list[str], dict[int, dict]]:
    """Every token's text by id (``[PADi]`` for ids no token has, up to ``n_vocab``) and the added
    tokens by id."""
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab.values()) + 1
    if n > n_vocab:
        raise LowbitError(f"the tokenizer has {n} tokens but the model only {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    for text, i in vocab.items():
        tokens[i] = text
    return tokens, added


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]  # type: ignore[misc]


def _add_byte_level(w: Any, spec: dict, n_vocab: int) -> None:
    pre_key = json.dumps(spec.get("pre_tokenizer"), sort_keys=True)
    pre = _PRE_TOKENIZERS.get(pre_key)
    if pre is None:
        raise LowbitError(f"the GGUF writer does not know this pre-tokenizer: {pre_key}")
    tokens, added = _vocabulary(spec, n_vocab)
    named = set(spec["model"]["vocab"].values()) | set(added)
    types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL if i in named else UNUSED
             for i in range(n_vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in _merges(spec["model"])])


def space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer (``tokenizer.json`` as a dict) prepends ``▁`` to
    the text, as SentencePiece's ``add_dummy_prefix``; LowbitError when its spaces are not
    escaped as ``▁`` the way llama.cpp's SentencePiece tokenizer escapes them."""
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if pre is not None:
        if pre.get("type") != "Metaspace" or pre.get("replacement") != SPACE or pre.get("split", False) or norm:
            raise LowbitError(f"the GGUF writer does not know this SentencePiece pre-tokenizer: "
                              f"{json.dumps(pre, sort_keys=True)} (normalizer {json.dumps(norm, sort_keys=True)})")
        return pre.get("prepend_scheme", "always") in ("first", "always")
    steps = (norm.get("normalizers") if norm and norm.get("type") == "Sequence" else [norm] if norm else [])
    kinds = [(s.get("type"), s.get("prepend"), (s.get("pattern") or {}).get("String"), s.get("content")) for s in steps]
    escapes = ("Replace", None, " ", SPACE)
    if kinds in ([escapes], [("Prepend", SPACE, None, None), escapes]):
        return len(kinds) == 2
    raise LowbitError(f"the GGUF writer does not know this SentencePiece normalizer: {json.dumps(norm, sort_keys=True)}")


def _add_sentencepiece(w: Any, spec: dict, n_vocab: int) -> None:
    model = spec["model"]
    prefix = space_prefix(spec)
    tokens, added = _vocabulary(spec, n_vocab)
    vocab = model["vocab"]
    scores = [0.0] * n_vocab
    for rank in range(len(merges := _merges(model)) - 1, -1, -1):  # backwards: a piece keeps its first merge's rank
        piece = merges[rank][0] + merges[rank][1]
        if piece in vocab:
            scores[vocab[piece]] = -float(rank)
    named = set(vocab.values())
    types = []
    for i, text in enumerate(tokens):
        if i in added:
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
            scores[i] = -1000.0  # as the converter scores added tokens
        elif text == model.get("unk_token"):
            types.append(UNKNOWN)
        elif i not in named:
            types.append(UNUSED)
            scores[i] = -1000.0
        else:
            types.append(BYTE if _BYTE_PIECE.fullmatch(text) else NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(prefix)
