"""Tokenizers built from GGUF metadata: ids identical to HF's on a varied text set, exact round trips,
chat templates, and streaming detokenization that never emits broken UTF-8."""

from __future__ import annotations

import pytest

from loom.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer
from loom.tokenizer.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  ",
    "runs   of     spaces\n\n\nand\tnewlines\r\n\ttabs",
    "café naïve résumé Ångström façade",
    "Ünïcödé ŝtrïñgs with ÄÖÜ äöü ß",
    "你好，世界！日本語のテキストと한국어",
    "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷",
    "digits 1234567890 3.14159 1,000,000 -42 0x1F",
    "it's they're we've I'm you'll he'd IT'S",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>plain text<|im_end|> and <not_special>",
    "code: def f(x):\n    return x ** 2  # square\n",
    "mixed123abc 12ab 1a2b3c x=1+2*3",
    "\u00a0non-breaking\u200bzero-width\u2028line-sep",
    "a" * 300,
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok(smollm_path) -> Tokenizer:
    return load_tokenizer(smollm_path)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf(tok, smollm_hf_tokenizer, text):
    assert tok.encode(text) == smollm_hf_tokenizer(text, add_special_tokens=True).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_encode_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens(tok):
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, 2], skip_special_tokens=True) == ""
    assert tok.vocab_size == 49152


def test_chat_template_matches_hf(tok, smollm_hf_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            want = smollm_hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == want
        ids = smollm_hf_tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert tok.encode_chat(msgs) == list(ids)


def test_chat_template_errors(tok):
    with pytest.raises(ChatTemplateError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    t = Tokenizer(tok.backend, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatTemplateError, match="only user turns"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("text", [t for t in TEXTS if t] + ["🙂" * 5 + "é" * 3 + "你好" * 4])
def test_incremental_detokenizer_never_breaks_utf8(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok.decode)
    pieces = [d.step([t]) for t in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_incremental_detokenizer_with_prompt_context(tok):
    prompt = tok.encode("The capital of France is")
    out = tok.encode(" Paris, and the capital of Japan is Tokyo 🙂.", add_special_tokens=False)
    d = IncrementalDetokenizer(tok.decode, prompt)
    text = "".join(d.step([t]) for t in out) + d.flush()
    assert text == " Paris, and the capital of Japan is Tokyo 🙂."


# SentencePiece (llama-style) vocabularies --------------------------------------------------------

def spm_metadata() -> dict:
    pieces = ["\u2581the", "\u2581a", "\u2581to", "\u2581of", "th", "he", "in", "er", "an", "\u2581t", "\u2581c",
              "\u2581cat", "\u2581sat", "at", "\u2581on", "on", "\u2581m", "\u2581mat", "\u2581h", "\u2581he",
              "ll", "\u2581hell", "\u2581hello", "el", "lo", "\u2581w", "or", "\u2581wor", "\u2581world", "ld"]
    chars = sorted(set("".join(pieces) + "abcdefghijklmnopqrstuvwxyzTHE,.!?\u2581"))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(chars))
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + \
             [-1000.0 - i for i in range(len(chars))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


SPM_TEXTS = ["the cat sat on the mat", "hello world", " hello  world!", "The THE tHe", "naïve 🙂 ok",
             "hello\nworld", "unknownzzz"]


def test_spm_matches_hf_gguf_conversion(tmp_path):
    import gguf
    from transformers import AutoTokenizer

    meta = spm_metadata()
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_tokenizer(str(tmp_path / "spm.gguf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text).input_ids, text
        assert ids[0] == 1  # BOS added
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        if not text.startswith(" "):  # SentencePiece folds a leading space into its dummy prefix
            assert ours.decode(ids, skip_special_tokens=True) == text
    assert ours.encode("naïve")[1:] != [0]  # unknown characters fall back to bytes, not <unk>


def test_a_folder_tokenizer_never_truncates_or_pads(tmp_path):
    """A tokenizer.json saved with truncation (max 8) and padding still encodes every token of a long prompt."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from loom.tokenizer import tokenizer_from_folder

    words = [f"w{i}" for i in range(40)]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]", "[PAD]"])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.enable_truncation(8)
    backend.enable_padding(pad_id=41, pad_token="[PAD]", length=16)
    backend.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_from_folder(str(tmp_path)).encode(" ".join(words), add_special_tokens=False) == list(range(40))
