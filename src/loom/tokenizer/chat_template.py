"""Chat templates: the Jinja2 programs HF and GGUF files ship to turn messages into a prompt.

Rendered in a sandbox with the same switches and helpers transformers provides
(trim_blocks, lstrip_blocks, ``raise_exception``, ``strftime_now``, ``tojson``), so templates
written for HF render identically here.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loom.errors import InvalidRequestError


class ChatTemplateError(InvalidRequestError):
    """The messages cannot be rendered (bad messages, or the template refused them): a bad request
    (a ValueError), whose field at fault is "messages"."""

    param = "messages"


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from None


# Gemma's turn format, for Gemma GGUF files that carry no template (as the Q4_K_M 270M file on PyPI):
#   <bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n{text}<end_of_turn>\n ...
# A system message has no turn of its own: it opens the first user turn. Content is a string or a list of
# text parts; the assistant's role is "model".
GEMMA_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(prefix='') -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set ns.prefix = (messages[0]['content'] if messages[0]['content'] is string else
    messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n\n')) + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Gemma turns must alternate user / assistant (after an optional system message)') -}}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- set text = message['content'] if message['content'] is string else
    message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
{{- '<start_of_turn>' + role + '\n' + (ns.prefix if loop.first else '') + text | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\n' -}}
{%- endif -%}"""

# Templates for architectures whose files may ship none, by GGUF general.architecture.
BUILTIN_TEMPLATES = {"gemma3": GEMMA_TEMPLATE}

# Control tokens that end a turn in the chat formats loom knows: a GGUF's vocabulary holding one as a
# control token stops generation there too (llama.cpp treats them as end of generation the same way).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role'")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **extra)
    except ChatTemplateError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja errors, and what the template's own code raises on odd input
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
