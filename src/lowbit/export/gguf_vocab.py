"""Tokenizer -> GGUF vocabulary metadata (``tokenizer.ggml.*``) that llama.cpp tokenizes with.

Two tokenizer families of Hugging Face ``tokenizers`` (fast tokenizers) are converted, following
the GGUF spec (ggml ``docs/gguf.md``, "Tokenizer") and what llama.cpp's loader expects:

* WordPiece (BERT): ``tokenizer.ggml.model = "bert"``. llama.cpp's WPM tokenizer marks word starts
  with U+2581 instead of marking continuations with ``##``, so a token ``w`` is written ``"▁w"``,
  ``##w`` is written ``w`` and bracketed specials (``[CLS]``) stay as they are. ``[CLS]`` is BOS,
  ``[SEP]`` is EOS/SEP, both added around each input.
* Byte-level BPE (GPT-2 style, as Llama 3 uses): ``tokenizer.ggml.model = "gpt2"``, the vocabulary
  in the byte-to-unicode alphabet as stored in ``tokenizer.json``, and ``merges`` ("a b" strings).

Token types: CONTROL for special tokens, UNKNOWN for the unknown token, NORMAL otherwise. Other
tokenizers (SentencePiece/Unigram, slow tokenizers) raise ``ValueError`` naming the tokenizer.
"""
from __future__ import annotations

import json

__all__ = ["write_vocab", "vocab_kind"]


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(f"tokenizer: cannot convert {type(tokenizer).__name__} to a GGUF vocabulary; pass a fast "
                         "(Hugging Face `tokenizers`) WordPiece or byte-level BPE tokenizer")
    return json.loads(backend.to_str())


def vocab_kind(tokenizer) -> str:
    """``"bert"`` (WordPiece) or ``"gpt2"`` (byte-level BPE); ``ValueError`` for anything else."""
    tj = _tokenizer_json(tokenizer)
    model = tj.get("model") or {}
    kind = model.get("type")
    if kind == "WordPiece":
        return "bert"
    pre = json.dumps(tj.get("pre_tokenizer"))
    if kind == "BPE" and "ByteLevel" in pre:
        return "gpt2"
    raise ValueError(f"tokenizer: cannot convert {type(tokenizer).__name__} (a {kind} model, pre-tokenizer "
                     f"{(tj.get('pre_tokenizer') or {}).get('type')}) to GGUF; lowbit writes WordPiece (BERT) and "
                     "byte-level BPE (GPT-2/Llama 3 style) vocabularies")


def _ordered(vocab: dict[str, int], added: list[dict], arg: str) -> list[str]:
    table = dict(vocab)
    for a in added:
        table[a["content"]] = a["id"]
    n = max(table.values()) + 1
    tokens = [None] * n
    for tok, i in table.items():
        tokens[i] = tok
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"{arg}: the vocabulary has no token for ids {missing[:5]}; GGUF needs ids 0..{n - 1}")
    return tokens


def write_vocab(writer, tokenizer, vocab_size: int | None = None) -> int:
    """Add the vocabulary of ``tokenizer`` to a ``gguf.GGUFWriter``; returns its size.

    ``vocab_size`` (the model's embedding rows) must equal the number of tokens.
    """
    import gguf

    kind = vocab_kind(tokenizer)
    tj = _tokenizer_json(tokenizer)
    model = tj["model"]
    added = tj.get("added_tokens") or []
    tokens = _ordered(model["vocab"], added, "tokenizer")
    if vocab_size is not None and len(tokens) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model's embedding has {vocab_size} rows; pass "
                         "the tokenizer the model was trained with")
    special = {a["content"] for a in added if a.get("special")} | set(getattr(tokenizer, "all_special_tokens", []))
    unk = getattr(tokenizer, "unk_token", None)
    types = [gguf.TokenType.UNKNOWN if t == unk else gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
             for t in tokens]
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre("default")
    if kind == "bert":
        def phantom(t: str) -> str:
            if t.startswith("[") and t.endswith("]"):
                return t
            return t[2:] if t.startswith("##") else "\u2581" + t
        writer.add_token_list([phantom(t) for t in tokens])
    else:
        writer.add_token_list(tokens)
        merges = model.get("merges") or []
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([int(t) for t in types])
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("cls", "sep", "bos", "eos", "unk", "pad", "mask")}
    if kind == "bert":
        ids["bos"] = ids["cls"] if ids["bos"] is None else ids["bos"]
        ids["eos"] = ids["sep"] if ids["eos"] is None else ids["eos"]
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(True)
    for k in ("bos", "eos", "unk", "sep", "pad", "mask"):
        if ids[k] is not None:
            getattr(writer, f"add_{k}_token_id")(int(ids[k]))
    return len(tokens)
