"""Training examples from files: plain text packed into fixed windows, or chat conversations (JSON lines of
``{"messages": [...]}``) through the model's chat template with the loss on the assistant's tokens only."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Iterator

import torch

from loom.finetune.train import IGNORE
from loom.tokenizer import Tokenizer


@dataclass
class Example:
    """One training sequence and its labels (IGNORE where not trained)."""

    ids: list[int]
    labels: list[int]


def text_examples(text: str, tokenizer: Tokenizer, length: int) -> list[Example]:
    """The text's tokens cut into consecutive windows of ``length`` (the last partial one dropped)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [Example(ids[i:i + length], ids[i:i + length]) for i in range(0, len(ids) - length + 1, length)]


def chat_example(messages: list[dict], tokenizer: Tokenizer, length: int) -> Example:
    """A conversation through the chat template; labels on each assistant turn's tokens (found as what the
    turn adds to the rendered conversation before it), truncated to ``length``."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.encode_chat(messages[:k], add_generation_prompt=True) if k else []
        upto = tokenizer.encode_chat(messages[:k + 1], add_generation_prompt=False)
        if upto[:len(before)] != before or ids[:len(upto)] != upto:
            raise ValueError("the chat template does not render a conversation as the sum of its turns; "
                             "train on plain text instead")
        labels[len(before):len(upto)] = upto[len(before):]
    return Example(ids[:length], labels[:length])


def read_examples(path: str, tokenizer: Tokenizer, length: int) -> list[Example]:
    """``.jsonl`` files: one conversation per line; anything else: plain text."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return text_examples(f.read(), tokenizer, length)
        out = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    messages = json.loads(line)["messages"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected {{\"messages\": [...]}}: {e}") from None
                out.append(chat_example(messages, tokenizer, length))
        return out


def split(examples: list[Example], eval_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held out), shuffled by ``seed``; at least one of each when there are two or more."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction))) if eval_fraction > 0 else 0
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def train_and_held_out(data: str, tokenizer: Tokenizer, length: int, batch_size: int, eval_data: str | None = None,
                       eval_fraction: float = 0.1, seed: int = 0, skip_tokens: int = 0
                       ) -> tuple[list[Example], list[Example]]:
    """A run's (training, held-out) examples: ``data`` in windows (a text's first ``skip_tokens`` tokens
    left out), held out either ``eval_data`` or ``eval_fraction`` of them; at least a batch to train on."""
    import math

    examples = read_examples(data, tokenizer, length)
    if skip_tokens:
        if data.endswith(".jsonl"):
            raise ValueError("skip_tokens applies to a text, not to chat examples")
        examples = examples[math.ceil(skip_tokens / length):]
    if eval_data:
        train_set, eval_set = examples, read_examples(eval_data, tokenizer, length)
    else:
        train_set, eval_set = split(examples, eval_fraction, seed)
    if len(train_set) < batch_size:
        raise ValueError(f"{data} holds {len(train_set)} training examples of {length} tokens, "
                         f"fewer than a batch of {batch_size}")
    return train_set, eval_set


def batches(examples: list[Example], batch_size: int, seed: int = 0) -> Iterator[list[Example]]:
    """Batches of ``batch_size`` examples, reshuffled every epoch, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]


def as_tensors(batch: list[Example]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A batch as ``lm_loss`` takes it: each example's ids and labels (lengths may differ)."""
    return [torch.tensor(e.ids) for e in batch], [torch.tensor(e.labels) for e in batch]
