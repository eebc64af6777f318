"""Build a HF ``tokenizers`` tokenizer from the vocabulary stored in GGUF metadata.

Two families (``tokenizer.ggml.model``):
- "gpt2": byte-level BPE (Radford et al. 2019). Tokens are spelled in the byte-to-unicode alphabet,
  merges are stored; text is first split by the pre-tokenizer regex named by ``tokenizer.ggml.pre``.
- "llama": SentencePiece BPE with byte fallback. No merges are stored, only per-token scores; the
  merge order is recovered from them (the pair whose merged token scores highest merges first),
  spaces become U+2581 and unknown bytes fall back to <0xNN> tokens.
Tokens typed CONTROL (3) become special tokens; USER_DEFINED (4) are matched whole in text.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp uses for a ``tokenizer.ggml.pre`` name."""
    if pre in ("smollm",):  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "falcon3", "dbrx"):
        return _split(_LLAMA3)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split(_QWEN2)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "gpt2", "default", unknown


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split (l, r) of a token t with l and r in
    the vocabulary, ranked by t's score (higher first), ties by t's id, then by the split point."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for t, i in ids.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab, spm_merges(tokens, scores), unk_token=unk, fuse_unk=True,
                                   byte_fallback=True))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok
