"""A checkpoint's conversation format: its chat template (jinja2) and the tokens
that end a reply.

The template is the model's own: a GGUF file's ``tokenizer.chat_template``, or
a transformers folder's (``tokenizer_config.json``'s ``chat_template``, or
``chat_template.jinja`` / ``chat_template.json`` beside it).  It renders as
transformers' ``apply_chat_template`` does: a sandboxed jinja2 environment with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson`` and
``strftime_now``, given ``messages``, ``add_generation_prompt=True`` and the
special tokens' texts.  A model without one (a run trained here) has none, and
the chat endpoint says so.

A reply ends at the end-of-text token: GGUF ``tokenizer.ggml.eos_token_id``
(and ``eot_token_id``); a folder's ``eos_token_id`` in config.json or
generation_config.json, or its ``tokenizer_config.json`` ``eos_token``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any

from astra_jax.io import pretrained


class ChatTemplateError(ValueError):
  """Messages the template cannot render (the template's own message)."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  template: str | None  # jinja2 source; None: the model has no chat template
  origin: str  # where the template was looked for
  bos_token: str = ""
  eos_token: str = ""
  end_ids: tuple[int, ...] = ()  # tokens that end a reply

  def render(self, messages: list[dict[str, Any]]) -> str:
    """The prompt text of ``messages`` (role/content dicts), ending where the
    assistant's reply starts.  ChatTemplateError when the template refuses them."""
    if self.template is None:
      raise ChatTemplateError(f"the model has no chat template (looked in {self.origin})")
    import jinja2
    try:
      return _compile(self.template).render(
          messages=messages, add_generation_prompt=True, tools=None, documents=None,
          bos_token=self.bos_token, eos_token=self.eos_token)
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from None


def _compile(template: str):
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None


def for_checkpoint(spec: str | None, tokenizer) -> ChatFormat:
  """The chat format of pretrained model ``spec`` (gguf:PATH, hf:DIR, a bundled
  name), or an empty one for a run folder (``spec`` None)."""
  if spec is None:
    return ChatFormat(None, "a training run folder, which holds no chat template")
  source = pretrained.parse(spec)
  if source.scheme == "gguf":
    return _from_gguf(source)
  return _from_folder(source.path, tokenizer)


def _from_gguf(source) -> ChatFormat:
  meta = pretrained.gguf_metadata(source)
  tokens = meta.get("tokenizer.ggml.tokens") or []

  def token(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else None

  bos, eos, eot = token("bos_token_id"), token("eos_token_id"), token("eot_token_id")
  return ChatFormat(meta.get("tokenizer.chat_template"),
                    f"{source.path}'s tokenizer.chat_template",
                    bos_token=bos[1] if bos else "", eos_token=eos[1] if eos else "",
                    end_ids=tuple(sorted({t[0] for t in (eos, eot) if t})))


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_text(value) -> str:
  if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
    value = value.get("content")
  return value if isinstance(value, str) else ""


def _from_folder(folder: str, tokenizer) -> ChatFormat:
  config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: the default one
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  jinja_file = os.path.join(folder, "chat_template.jinja")
  if template is None and os.path.isfile(jinja_file):
    with open(jinja_file) as f:
      template = f.read()
  if template is None:
    template = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
  bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
  ends = set()
  for name in ("config.json", "generation_config.json"):
    value = _read_json(os.path.join(folder, name)).get("eos_token_id")
    ends.update(value if isinstance(value, list) else [] if value is None else [value])
  if eos:
    ids = tokenizer.encode(eos)
    if len(ids) == 1:  # a real token of the vocabulary, not text spelling its name
      ends.add(ids[0])
  return ChatFormat(template if isinstance(template, str) else None,
                    f"{folder}: tokenizer_config.json, chat_template.jinja, chat_template.json",
                    bos_token=bos, eos_token=eos, end_ids=tuple(sorted(int(i) for i in ends)))
