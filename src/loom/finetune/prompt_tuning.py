"""Prompt tuning: a trainable soft prompt on a frozen model, saved in PEFT's prompt-tuning format.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning") learns N
"virtual token" embeddings P (N x hidden) and prepends them to every sequence's token embeddings; nothing
else trains. As in PEFT and HF, the virtual tokens take positions 0..N-1 and the text follows from N, and
the last virtual token predicts the first text token (its label, and every virtual token's, is ignored).

P starts as PEFT starts it: "random" draws N(0, 1) (an ``nn.Embedding``'s own initialization), "sample_vocab"
takes the embeddings of N token ids drawn uniformly from the vocabulary, "text" the embeddings of the
tokenized ``init_text`` (special tokens included, as ``tokenizer(text)`` gives them) repeated or cut to N.

A soft prompt enters the model through ``Transformer.forward(inputs_embeds=...)``: its rows stand where
``embed_tokens`` rows would, so position tables and the residual rotation apply to them as to tokens. (In
transformers 5, Gemma's sqrt(hidden) scale is part of its embedding module, so PEFT's soft prompts there
live in the scaled space and are not scaled again; loom has no such scale.)

PEFT's folder is ``adapter_config.json`` (``peft_type: PROMPT_TUNING``, ``num_virtual_tokens``,
``token_dim``, ...) plus ``adapter_model.safetensors`` holding one tensor, ``prompt_embeddings`` [N, token_dim].
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from loom.finetune.train import IGNORE
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError
from loom.weights.lora import CONFIG_FILE, read_adapter_config, read_adapter_tensors

if TYPE_CHECKING:
    from loom.tokenizer import Tokenizer

INITS = ("random", "text", "sample_vocab")
KEY = "prompt_embeddings"  # the one tensor of PEFT's prompt-tuning adapter
Sequences = Union[torch.Tensor, Sequence[torch.Tensor]]  # [B, T], or B 1-D sequences


@dataclass
class PromptTuningConfig:
    """How many virtual tokens, and how they start (PEFT's ``prompt_tuning_init``, lower-cased)."""

    num_virtual_tokens: int = 20
    init: str = "random"  # "random", "text" or "sample_vocab"
    init_text: Optional[str] = None  # for init "text" (PEFT's prompt_tuning_init_text)
    seed: int = 0  # the draws of "random" and "sample_vocab"

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError('init "text" needs init_text')


class SoftPrompt(nn.Module):
    """The trainable virtual-token embeddings [N, hidden], kept in fp32 and cast to the model's dtype at use."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(embeddings.detach().float().clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """The embeddings in ``like``'s dtype and device (token embeddings they are concatenated with)."""
        return self.weight.to(device=like.device, dtype=like.dtype)


def initial_embeddings(model: Transformer, config: PromptTuningConfig,
                       tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """P's starting value [N, hidden] in fp32, drawn as PEFT draws it (see the module docstring): with
    ``torch.manual_seed(config.seed)`` before ``get_peft_model``, PEFT's draws are these."""
    n, table = config.num_virtual_tokens, model.embed_tokens
    gen = torch.Generator().manual_seed(config.seed)
    # PEFT builds its nn.Embedding (a N(0, 1) draw) before sampling ids: the same seed gives the same ids
    drawn = torch.randn(n, table.embedding_dim, generator=gen)
    if config.init == "random":
        return drawn
    if config.init == "sample_vocab":
        ids = torch.randint(0, table.num_embeddings, (n,), generator=gen)
    else:
        if tokenizer is None:
            raise ValueError('init "text" needs the model\'s tokenizer')
        text_ids = tokenizer.encode(config.init_text)
        if not text_ids:
            raise ValueError(f"init_text {config.init_text!r} tokenizes to nothing")
        ids = torch.tensor((text_ids * math.ceil(n / len(text_ids)))[:n])
    with torch.no_grad():
        return table(ids.to(model.device)).float().cpu()


def prompted_hidden(model: Transformer, prompt: SoftPrompt, input_ids: Sequences) -> tuple[torch.Tensor, list[int]]:
    """Hidden states of the sequences with the soft prompt before each, as one flat batch: [sum(N + T_i),
    hidden] and the lengths N + T_i (each sequence attends causally over its own virtual tokens and text)."""
    seqs = [torch.as_tensor(s) for s in input_ids]
    lengths = [len(s) for s in seqs]
    tokens = model.token_embeddings(torch.cat(seqs).to(model.device))
    virtual = prompt(tokens)
    rows = []
    for piece in tokens.split(lengths):
        rows += [virtual, piece]
    total = [prompt.num_virtual_tokens + t for t in lengths]
    return model(None, AttentionMetadata.uncached(total), inputs_embeds=torch.cat(rows)), total


def prompt_logits(model: Transformer, prompt: SoftPrompt, input_ids: Sequences) -> torch.Tensor:
    """Logits for every position, virtual ones included, as PEFT returns them: [sum(N + T_i), vocab]."""
    hidden, _ = prompted_hidden(model, prompt, input_ids)
    return model.compute_logits(hidden)


def prompt_lm_loss(model: Transformer, prompt: SoftPrompt, input_ids: Sequences,
                   labels: Sequences | None = None) -> torch.Tensor:
    """PEFT's prompt-tuning loss: mean cross-entropy over every text token (labels default to the inputs;
    IGNORE where not trained), the first predicted from the last virtual token; the virtual tokens' labels
    are ignored. Only the rows that predict a token reach the output layer."""
    seqs = list(input_ids)
    labs = seqs if labels is None else list(labels)
    hidden, total = prompted_hidden(model, prompt, seqs)
    n, start, rows = prompt.num_virtual_tokens, 0, []
    for length in total:
        rows.append(hidden[start + n - 1:start + length - 1])
        start += length
    predicted = model.compute_logits(torch.cat(rows)).float()
    targets = torch.cat([torch.as_tensor(lab) for lab in labs]).to(predicted.device)
    return F.cross_entropy(predicted, targets, ignore_index=IGNORE)


@torch.no_grad()
def generate_greedy(model: Transformer, prompt: SoftPrompt, ids: Sequence[int], max_new_tokens: int,
                    eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``ids`` behind the soft prompt on the module path, with a contiguous KV cache
    (the virtual tokens are prefilled with the text, then one token a step); the new ids only."""
    from loom.engine.kv_cache import KVCache

    n, dev = prompt.num_virtual_tokens + len(ids), model.device
    capacity = n + max_new_tokens
    if capacity > model.config.max_position_embeddings:
        raise ValueError(f"{prompt.num_virtual_tokens} virtual + {len(ids)} prompt + {max_new_tokens} new tokens "
                         f"exceed the model's context of {model.config.max_position_embeddings}")
    caches = KVCache(model.config, 1, capacity, model.dtype, device=dev).layers()
    table = torch.zeros(1, 1, dtype=torch.long, device=dev)
    tokens = model.token_embeddings(torch.tensor(list(ids), dtype=torch.long, device=dev))
    embeds = torch.cat([prompt(tokens), tokens])
    positions = torch.arange(n, device=dev)
    meta = AttentionMetadata(positions, [0, n], [n], positions, table)
    logits = model.compute_logits(model(None, meta, caches, inputs_embeds=embeds)[-1:])
    out: list[int] = []
    for p in range(n, capacity):
        out.append(int(logits[0].argmax()))
        if out[-1] in eos_token_ids or len(out) == max_new_tokens:
            break
        at = torch.tensor([p], device=dev)
        meta = AttentionMetadata(at, [0, 1], [p + 1], at, table)
        logits = model.compute_logits(model(torch.tensor(out[-1:], device=dev), meta, caches))
    return out


@dataclass
class SoftPromptModel:
    """A frozen Transformer and the soft prompt trained (or loaded) for it."""

    model: Transformer
    prompt: SoftPrompt
    config: PromptTuningConfig

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: the virtual-token embeddings alone."""
        return [self.prompt.weight]

    def loss(self, model: Transformer, input_ids: Sequences, labels: Sequences | None = None) -> torch.Tensor:
        """``prompt_lm_loss`` with this prompt, in the (model, input_ids, labels) form of train()'s loss_fn."""
        return prompt_lm_loss(model, self.prompt, input_ids, labels)

    def logits(self, input_ids: Sequences) -> torch.Tensor:
        return prompt_logits(self.model, self.prompt, input_ids)

    def generate_greedy(self, ids: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
        return generate_greedy(self.model, self.prompt, ids, max_new_tokens, eos_token_ids)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {KEY: self.prompt.weight.detach().float().cpu().contiguous()}

    def save(self, folder: str | os.PathLike[str], base_model: str | None = None,
             tokenizer_name_or_path: str | None = None) -> None:
        """PEFT's prompt-tuning folder. PEFT refuses a "TEXT" config without a tokenizer, so that defaults
        to ``base_model`` (whose tokenizer the init text was encoded with)."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        c = self.model.config
        text = self.config.init == "text"
        cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
               "num_virtual_tokens": self.prompt.num_virtual_tokens, "token_dim": self.prompt.weight.shape[1],
               "num_transformer_submodules": 1, "num_attention_heads": c.num_heads, "num_layers": c.num_layers,
               "prompt_tuning_init": self.config.init.upper(),
               "prompt_tuning_init_text": self.config.init_text if text else None,
               "tokenizer_name_or_path": (tokenizer_name_or_path or base_model) if text else tokenizer_name_or_path,
               "tokenizer_kwargs": None, "base_model_name_or_path": base_model, "revision": None,
               "inference_mode": True, "modules_to_save": None, "auto_mapping": None}
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        save_file(self.peft_state_dict(), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def attach_prompt_tuning(model: Transformer, config: PromptTuningConfig,
                         tokenizer: Tokenizer | None = None) -> SoftPromptModel:
    """Freeze ``model`` and give it a trainable soft prompt (``tokenizer`` for init "text"); the model is
    not changed otherwise: the prompt enters through ``SoftPromptModel.loss`` / ``logits``."""
    model.requires_grad_(False)
    return SoftPromptModel(model, SoftPrompt(initial_embeddings(model, config, tokenizer)), config)


def read_prompt_tuning(folder: str | os.PathLike[str], hidden_size: int | None = None) -> tuple[PromptTuningConfig,
                                                                                               torch.Tensor]:
    """A PEFT prompt-tuning folder's config and ``prompt_embeddings`` [N, token_dim] (fp32); WeightsError
    naming the file and tensor for what does not fit (``hidden_size``: the base model's)."""
    folder = os.fspath(folder)
    path, raw = read_adapter_config(folder)
    if not isinstance(raw, dict) or raw.get("peft_type") != "PROMPT_TUNING":
        found = raw.get("peft_type") if isinstance(raw, dict) else raw
        raise WeightsError(path, f"peft_type {found!r} is not PROMPT_TUNING"
                                 + (" (a LoRA adapter loads with lora=)" if found == "LORA" else ""))
    if raw.get("task_type", "CAUSAL_LM") != "CAUSAL_LM" or raw.get("num_transformer_submodules", 1) != 1:
        raise WeightsError(path, f"task_type {raw.get('task_type')!r} with {raw.get('num_transformer_submodules')} "
                                 "transformer submodules: loom runs decoder-only (CAUSAL_LM) soft prompts")
    try:
        n, dim = int(raw["num_virtual_tokens"]), int(raw["token_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(path, f"num_virtual_tokens and token_dim must be numbers: {e}") from None
    if hidden_size is not None and dim != hidden_size:
        raise WeightsError(path, f"token_dim {dim} but the base model's hidden size is {hidden_size} "
                                 "(an adapter for another model?)")
    init = str(raw.get("prompt_tuning_init") or "RANDOM").lower()
    try:
        config = PromptTuningConfig(n, init, raw.get("prompt_tuning_init_text") or None)
    except ValueError as e:
        raise WeightsError(path, str(e)) from None
    weights, tensors = read_adapter_tensors(folder)
    if KEY not in tensors:
        raise WeightsError(weights, f"no {KEY} tensor (PEFT's prompt-tuning weights)", tensor=KEY)
    extra = sorted(set(tensors) - {KEY})
    if extra:
        raise WeightsError(weights, f"holds {len(extra)} tensors besides {KEY} (modules_to_save?), which loom "
                                    "does not load", tensor=extra[0])
    t = tensors[KEY]
    if not t.is_floating_point() or tuple(t.shape) != (n, dim):
        raise WeightsError(weights, f"{t.dtype} {tuple(t.shape)}, but the config says {n} virtual tokens of "
                                    f"token_dim {dim} (a float [{n}, {dim}])", tensor=KEY)
    return config, t.float()


def load_prompt_tuning(folder: str | os.PathLike[str], model: Transformer) -> SoftPromptModel:
    """A PEFT (or loom-saved) prompt-tuning adapter on ``model``, ready for ``logits`` and ``generate_greedy``
    (or to train on)."""
    config, embeddings = read_prompt_tuning(folder, model.config.hidden_size)
    model.requires_grad_(False)
    return SoftPromptModel(model, SoftPrompt(embeddings), config)
