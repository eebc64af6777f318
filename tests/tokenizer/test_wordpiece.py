"""BERT's WordPiece tokenizer: from tokenizer.json and, for folders without one, from vocab.txt, the same ids
as transformers' BertTokenizer; padding and truncation settings in a tokenizer.json are switched off."""

from __future__ import annotations

import os
import shutil

import pytest

from loom.default_model import default_embedding_model_path
from loom.tokenizer import Tokenizer
from loom.tokenizer.wordpiece import encoder_tokenizer, wordpiece_from_vocab
from tests.embedding_texts import TEXTS


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    return default_embedding_model_path()


def test_tokenizer_json_and_vocab_txt_agree_with_transformers(minilm_dir):
    from transformers import BertTokenizer

    reference = BertTokenizer(os.path.join(minilm_dir, "vocab.txt"), do_lower_case=True)
    from_json = encoder_tokenizer(minilm_dir)
    from_vocab = Tokenizer(wordpiece_from_vocab(os.path.join(minilm_dir, "vocab.txt")))
    for text in TEXTS + ["", "x" * 300, "[MASK] [PAD] [UNK]"]:
        want = reference(text)["input_ids"]
        assert from_json.encode(text) == want, text
        assert from_vocab.encode(text) == want, text


def test_no_padding_or_truncation_from_tokenizer_json(minilm_dir):
    # the package's tokenizer.json pads to 128 and truncates at 128: neither may happen silently
    tok = encoder_tokenizer(minilm_dir)
    assert len(tok.encode("hi")) == 3
    assert len(tok.encode("word " * 400)) == 402


def test_a_folder_with_only_vocab_txt(minilm_dir, tmp_path):
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    cased = encoder_tokenizer(str(tmp_path))
    assert cased.decode(cased.encode("Hello")) != "hello"  # no lowercasing: 'H' is unknown to an uncased vocab
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"special token '\[CLS\]' is not in the vocabulary"):
        encoder_tokenizer(str(tmp_path))
    os.remove(tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        encoder_tokenizer(str(tmp_path))
