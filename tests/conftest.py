"""Shared fixtures: tiny random-weight models of each supported family, a tiny character-level
tokenizer (a real ``PreTrainedTokenizerFast`` that saves and loads offline), HF folders built
from them, an isolated lowbit cache, and deterministic text."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

VOCAB = 256  # model vocabulary; the character tokenizer below uses fewer ids
HIDDEN = 64
LAYERS = 2


_WORDS = (
    "the of and to in is for that with as on be by this are from or an it not which can at "
    "value function object class return module attribute statement expression name type list "
    "string number call argument default method instance loop while if else try except raise"
).split()


def tiny_config(family: str = "llama", **overrides: Any):  # type: ignore[no-untyped-def]
    """A transformers config of ``family`` with hidden 64, 2 layers, vocab 256."""
    import transformers as tf

    ids = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    llama_like = dict(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, **ids,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**llama_like)
    elif family == "mistral":
        cfg = tf.MistralConfig(**llama_like, sliding_window=None)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**llama_like)
    elif family == "phi3":
        cfg = tf.Phi3Config(**llama_like)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**llama_like, head_dim=16)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**llama_like, head_dim=16)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**llama_like, head_dim=16)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=256, **ids)
    elif family == "mixtral":  # the MoE families as their released models are (renormalized experts or not)
        cfg = tf.MixtralConfig(**{**llama_like, "intermediate_size": 96}, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**llama_like, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    elif family == "olmoe":  # OLMoE has no grouped-query attention
        cfg = tf.OlmoeConfig(**{**llama_like, "intermediate_size": 64, "num_key_value_heads": 4}, num_experts=4,
                             num_experts_per_tok=2)
    elif family in ("opt", "opt-post-ln"):  # post-LN: opt-350m's layout, each norm after its sub-layer
        cfg = tf.OPTConfig(do_layer_norm_before=family == "opt",
            hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=256, word_embed_proj_dim=HIDDEN, **ids,
        )
    else:
        raise ValueError(family)
    rope = overrides.pop("rope_scaling", None)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if rope is not None:  # rope scaling goes through the constructor, which validates and standardizes it
        fields = {k: v for k, v in cfg.to_dict().items() if k not in ("rope_parameters", "rope_scaling")}
        cfg = type(cfg)(**fields, rope_parameters={"rope_theta": cfg.rope_parameters["rope_theta"], **rope})
    return cfg


def build_tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-weight causal LM of ``family`` in eval mode.

    Weights are drawn with std 0.1 (instead of the init's 0.02) and biases made non-zero, so
    that quantization errors and bias handling visibly change the logits.
    """
    from transformers import AutoModelForCausalLM

    from lowbit.models.loaded import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def make_char_tokenizer():  # type: ignore[no-untyped-def]
    """A character-level fast tokenizer: printable ASCII, tab and newline; ids 0 (<unk>), 1 (<eos>)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for ch in [chr(i) for i in range(32, 127)] + ["\n", "\t"]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_byte_level_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE (GPT-2 style pre-tokenizer): ids 0 <unk>, 1 <eos>, the 256 byte symbols,
    then one merge (" t", id 258); what the GGUF writer accepts as a "gpt-2" tokenizer (llama.cpp
    refuses a BPE vocabulary without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # its order is random per call
        vocab[ch] = len(vocab)
    vocab["\u0120t"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_sentencepiece_tokenizer(folder: Path, dummy_prefix: bool = True, vocab_size: int = 400):  # type: ignore[no-untyped-def]
    """A SentencePiece BPE model with byte fallback, trained (in ``folder``, one thread, so always
    the same) on lines of ``pydoc_data.topics``, and the fast tokenizer Hugging Face's converter
    makes of it: the Llama 2 / Mistral layout (``dummy_prefix``: Metaspace prepending ``▁`` to the
    text) or Gemma's (spaces escaped by the normalizer, nothing prepended). ids 0 <unk>, 1 <s>,
    2 </s>, then the 256 byte pieces. Returns ``(fast tokenizer, SentencePieceProcessor)``."""
    import sentencepiece as spm
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    lines = [ln for t in sorted(topics)[:60] for ln in topics[t].splitlines() if ln.strip()]
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spm"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # the converter's merges: every split of a piece into two pieces, in the order of the merged piece
    merges = sorted(((left, piece[len(left):], i) for piece, i in vocab.items() if not sp.is_byte(i)
                     for left in (piece[:k] for k in range(1, len(piece))) if left in vocab and piece[len(left):] in vocab),
                    key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    if dummy_prefix:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return fast, sp


class CharTokenizerStub:
    """Minimal tokenizer protocol that ``lowbit.evaluation.tokenize`` needs: one id per character."""

    def __init__(self, vocab: int = VOCAB) -> None:
        self.vocab = vocab
        self.calls = 0

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        self.calls += 1
        return {"input_ids": [ord(c) % self.vocab for c in text]}


def sample_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic English-like ASCII text of about ``n_chars`` characters."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_model(family="llama", seed=0, **config_overrides)``."""
    return build_tiny_model


@pytest.fixture(scope="session")
def char_tokenizer():  # type: ignore[no-untyped-def]
    return make_char_tokenizer()


@pytest.fixture
def tokenizer_stub() -> CharTokenizerStub:
    return CharTokenizerStub()


@pytest.fixture
def text_factory() -> Callable[..., str]:
    return sample_text


@pytest.fixture
def hf_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: save a tiny model plus the character tokenizer as an HF folder and return it.

    ``hf_folder(family="llama", name="model", mutate=None, **config_overrides)``; ``mutate``
    is called on the model before saving (e.g. to plant a NaN).
    """

    def make(family: str = "llama", name: str = "model", mutate: Callable | None = None, seed: int = 0,
             **overrides: Any) -> Path:
        model = build_tiny_model(family, seed=seed, **overrides)
        if mutate is not None:
            with torch.no_grad():
                mutate(model)
        folder = tmp_path / name
        model.save_pretrained(folder)
        make_char_tokenizer().save_pretrained(folder)
        return folder

    return make


@pytest.fixture
def lowbit_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LOWBIT_CACHE for this test."""
    cache = tmp_path / "lowbit-cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    return cache



def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, Any]:
    """A valid tiny Llama GGUF (F32 tensors, a character vocabulary of 64 tokens) that
    transformers can load. Returns the tensors written, by GGUF name."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    V, H, I, L, NH, NKV = 64, 32, 64, 1, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_dimension_count(H // NH)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(i) for i in range(33, 33 + V - 3)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * V)
    w.add_token_types([2, 3, 3] + [1] * (V - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    tensors: dict[str, Any] = {}

    def t(name: str, shape: tuple[int, ...]) -> None:
        tensors[name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        w.add_tensor(name, tensors[name])

    t("token_embd.weight", (V, H))
    t("output_norm.weight", (H,))
    t("output.weight", (V, H))
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", (H,))
        t(f"blk.{i}.ffn_norm.weight", (H,))
        t(f"blk.{i}.attn_q.weight", (H, H))
        t(f"blk.{i}.attn_k.weight", (H * NKV // NH, H))
        t(f"blk.{i}.attn_v.weight", (H * NKV // NH, H))
        t(f"blk.{i}.attn_output.weight", (H, H))
        t(f"blk.{i}.ffn_gate.weight", (I, H))
        t(f"blk.{i}.ffn_up.weight", (I, H))
        t(f"blk.{i}.ffn_down.weight", (H, I))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_gguf(name="tiny.gguf", truncate_to=None)`` writes a tiny Llama GGUF
    (optionally cut to its first ``truncate_to`` bytes) and returns its path."""

    def make(name: str = "tiny.gguf", truncate_to: int | None = None) -> Path:
        path = tmp_path / "gguf" / name
        path.parent.mkdir(exist_ok=True)
        write_tiny_gguf(path)
        if truncate_to is not None:
            data = path.read_bytes()
            path.write_bytes(data[: truncate_to if truncate_to >= 0 else len(data) + truncate_to])
        return path

    return make
