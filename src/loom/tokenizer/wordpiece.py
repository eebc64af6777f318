"""The WordPiece tokenizer of BERT-style encoders (Wu et al. 2016; Devlin et al. 2019), from a folder's
tokenizer.json or, for older checkpoints, its vocab.txt.

BERT's pipeline: normalize (clean control characters, pad CJK characters with spaces, lowercase and strip
accents when uncased), split on whitespace and punctuation, then greedily match the longest vocabulary
pieces of each word ("##" marks a piece inside a word), and wrap the text as ``[CLS] ... [SEP]``.

The tokenizer.json of a sentence-transformers model may carry padding (to 128) and truncation settings;
they are switched off here: loom pads its own batches and refuses (or, when asked, truncates) too-long
inputs itself, so no input is cut short silently.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from loom.tokenizer import Tokenizer, tokenizer_from_folder


def _config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected an object of tokenizer settings")
    return cfg


def wordpiece_from_vocab(vocab_path: str, lowercase: bool = True, strip_accents: bool | None = None,
                         tokenize_chinese_chars: bool = True, cls: str = "[CLS]", sep: str = "[SEP]",
                         unk: str = "[UNK]") -> Backend:
    """A BERT tokenizer from a vocab.txt (one piece a line; its line number is its id), equal to what
    transformers' BertTokenizerFast builds from the same file and settings."""
    with open(vocab_path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    for token in (cls, sep, unk):
        if token not in vocab:
            raise ValueError(f"{vocab_path}: the special token {token!r} is not in the vocabulary")
    backend = Backend(WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    backend.decoder = decoders.WordPiece(prefix="##")
    # as transformers registers them: special tokens written in the text stay whole
    backend.add_special_tokens([t for t in ("[PAD]", unk, cls, sep, "[MASK]") if t in vocab])
    return backend


def encoder_tokenizer(folder: str) -> Tokenizer:
    """The tokenizer of an encoder folder: tokenizer.json if there is one, else vocab.txt with the settings
    of tokenizer_config.json (do_lower_case, strip_accents, tokenize_chinese_chars); without padding or
    truncation."""
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        tokenizer = tokenizer_from_folder(folder)
    else:
        vocab = os.path.join(folder, "vocab.txt")
        if not os.path.exists(vocab):
            raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")
        cfg = _config(folder)
        backend = wordpiece_from_vocab(vocab, lowercase=bool(cfg.get("do_lower_case", True)),
                                       strip_accents=cfg.get("strip_accents"),
                                       tokenize_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)))
        tokenizer = Tokenizer(backend)
    tokenizer.backend.no_padding()
    tokenizer.backend.no_truncation()
    return tokenizer
