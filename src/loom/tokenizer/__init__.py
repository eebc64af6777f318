"""Tokenizer: text <-> token ids, special tokens, chat templates, streaming detokenization.

Built on HF ``tokenizers`` from either GGUF metadata or a ``tokenizer.json`` folder.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from tokenizers import Tokenizer as Backend
from tokenizers import processors

from loom.errors import InvalidPromptError
from loom.tokenizer.chat_template import BUILTIN_TEMPLATES, END_OF_TURN_TOKENS, ChatTemplateError, render_chat
from loom.tokenizer.detokenizer import IncrementalDetokenizer
from loom.tokenizer.gguf_vocab import tokenizer_from_gguf

__all__ = ["Tokenizer", "IncrementalDetokenizer", "ChatTemplateError", "load_tokenizer"]


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the model's special tokens and chat template."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = (),
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        if self.add_bos:
            bos = backend.id_to_token(bos_token_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_token_id)])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str:
        return self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; InvalidPromptError if it is not valid Unicode (a lone surrogate)."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidPromptError(f"the text is not valid Unicode (lone surrogate {text[e.start]!a} at "
                                         f"character {e.start})") from None
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def config(self, model_max_length: int | None = None) -> dict[str, Any]:
        """The contents of an HF ``tokenizer_config.json`` for this tokenizer (with the tokenizer.json
        ``to_json`` gives, what ``AutoTokenizer.from_pretrained`` loads)."""
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token or None,
                               "eos_token": self.eos_token or None, "pad_token": None,
                               "add_bos_token": self.add_bos, "add_eos_token": False}
        if model_max_length is not None:
            cfg["model_max_length"] = model_max_length
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    def to_json(self) -> str:
        """The backend as a ``tokenizer.json`` document."""
        return self.backend.to_str()

    def save(self, folder: str) -> None:
        """tokenizer.json + tokenizer_config.json as HF writes them (what ``tokenizer_from_folder`` reads)."""
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(self.config(), f, indent=2)

    def token_bytes_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (for logprob displays)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        # The template writes BOS itself where the model wants it, as HF's apply_chat_template assumes.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra),
                           add_special_tokens=False)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.decode, prompt_ids)


def gguf_stop_ids(meta: dict[str, Any]) -> list[int]:
    """The token ids that end generation: EOS, EOT, and the end-of-turn control tokens the vocabulary holds
    (``END_OF_TURN_TOKENS``; Gemma's <end_of_turn> is neither its EOS nor recorded as EOT)."""
    stop = [meta["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in meta else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in stop:
        stop.append(eot)
    tokens, types = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.token_type") or []
    if len(types) == len(tokens):
        wanted = set(END_OF_TURN_TOKENS)
        stop += [i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3 and t in wanted and i not in stop]
    return stop


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    backend = tokenizer_from_gguf(meta)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    template = meta.get("tokenizer.chat_template") or BUILTIN_TEMPLATES.get(meta.get("general.architecture"))
    return Tokenizer(backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=gguf_stop_ids(meta),
                     add_bos=bool(add_bos), chat_template=template)


def _token_text(x: Any) -> str | None:
    if isinstance(x, dict):
        return x.get("content")
    return x


def tokenizer_from_folder(folder: str, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja) as HF writes them."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no tokenizer.json")
    backend = Backend.from_file(path)
    # A tokenizer.json may carry the truncation / padding its trainer used; loom counts a prompt's tokens
    # itself (a too-long prompt is an error, never silently cut), so neither applies here.
    backend.no_truncation()
    backend.no_padding()
    cfg: dict[str, Any] = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    template = cfg.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    if isinstance(template, list):  # named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    bos = _token_text(cfg.get("bos_token"))
    eos = _token_text(cfg.get("eos_token"))
    bos_id = backend.token_to_id(bos) if bos else None
    eos_ids = list(eos_token_ids)
    if eos and backend.token_to_id(eos) is not None and backend.token_to_id(eos) not in eos_ids:
        eos_ids.insert(0, backend.token_to_id(eos))
    # tokenizer.json's own post-processor already adds BOS where the model wants it.
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos=False, chat_template=template)


def load_tokenizer(path: str, gguf_metadata: dict[str, Any] | None = None,
                   eos_token_ids: Sequence[int] = ()) -> Tokenizer:
    if gguf_metadata is not None:
        return tokenizer_from_gguf_metadata(gguf_metadata)
    if os.path.isdir(path):
        return tokenizer_from_folder(path, eos_token_ids)
    from loom.weights.gguf import GGUFFile

    g = GGUFFile(path)
    try:
        return tokenizer_from_gguf_metadata(g.metadata)
    finally:
        g.close()
