"""Training data: text packed into windows, chat conversations labelled on the assistant's tokens only."""

from __future__ import annotations

import json

import pytest

from loom.finetune.data import IGNORE, chat_example, read_examples, split, text_examples

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye!"},
        {"role": "assistant", "content": "Goodbye."}]


def test_text_is_packed_into_whole_windows(smollm):
    tok = smollm.tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = tok.encode(text, add_special_tokens=False)
    examples = text_examples(text, tok, 16)
    assert len(examples) == len(ids) // 16 and [t for e in examples for t in e.ids] == ids[:16 * len(examples)]
    assert all(e.labels == e.ids for e in examples)


def test_chat_labels_are_the_assistant_turns(smollm):
    tok = smollm.tokenizer
    example = chat_example(CHAT, tok, 1000)
    labelled = [t for t, lab in zip(example.ids, example.labels) if lab != IGNORE]
    text = tok.decode(labelled)
    assert "Hello." in text and "Goodbye." in text and "Hi!" not in text and "Bye!" not in text
    assert "Be brief" not in text
    assert example.ids == tok.encode_chat(CHAT, add_generation_prompt=False)
    assert len(chat_example(CHAT, tok, 10).ids) == 10


def test_jsonl_files_and_errors(smollm, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(3)) + "\n")
    assert len(read_examples(str(path), smollm.tokenizer, 512)) == 3
    path.write_text('{"text": "no messages"}\n')
    with pytest.raises(ValueError, match="chats.jsonl:1"):
        read_examples(str(path), smollm.tokenizer, 512)


def test_split_holds_out_a_fraction():
    train, held = split(list(range(20)), 0.1)
    assert len(held) == 2 and sorted(train + held) == list(range(20))
    assert split([1, 2], 0.5) == ([2], [1]) or len(split([1, 2], 0.5)[1]) == 1
