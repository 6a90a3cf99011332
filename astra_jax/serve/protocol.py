"""The OpenAI HTTP protocol the server speaks, as typed models (after vLLM's
``entrypoints/openai/protocol.py``): requests of ``/v1/completions`` and
``/v1/chat/completions``, their responses and stream chunks, ``/v1/models``,
and the error shape ``{"error": {"message", "type", "param", "code"}}``.

Requests validate strictly (``"5"`` is no integer, ``true`` no number), so a
wrong type is a 400 naming the field.  Fields OpenAI has and this server
cannot honour (``n`` > 1, ``logprobs``, ``echo``, penalties) are refused by
``unsupported``; fields it does not know are ignored, as OpenAI's clients send
some (``user``).  Every response may carry ``astra``: what the server did for
the request (its plan: mesh, exchange, padded length, decoding device) and
how long each part took.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # stop strings per request, as OpenAI


class Request(BaseModel):
  model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Request):
  include_usage: bool = False


class Sampled(Request):
  """What both generation endpoints take."""
  model: str | None = None  # None: the one model served
  max_tokens: int | None = Field(None, ge=0)
  temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = Field(1, ge=1)
  logprobs: Any = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, Any] | None = None
  # an extension: run with this plan (GET /astra/stats lists them) instead of the fastest
  astra_plan: str | None = None

  def stops(self) -> list[str]:
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    return [s for s in stops if s]

  def unsupported(self) -> tuple[str, str] | None:
    """(field, why) of the first option this server cannot honour, or None."""
    if self.n != 1:
      return "n", "this server returns one choice per request; use n=1"
    if self.logprobs not in (None, False):
      return "logprobs", "logprobs are not supported; leave the field out"
    if self.presence_penalty or self.frequency_penalty:
      field = "presence_penalty" if self.presence_penalty else "frequency_penalty"
      return field, "penalties are not supported; leave them at 0"
    if self.logit_bias:
      return "logit_bias", "logit_bias is not supported; leave it out"
    if len(self.stops()) > MAX_STOP:
      return "stop", f"at most {MAX_STOP} stop strings"
    return None


class CompletionRequest(Sampled):
  prompt: str | list[str] | list[int]
  max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
  echo: bool = False
  suffix: str | None = None
  best_of: int | None = None

  def unsupported(self) -> tuple[str, str] | None:
    if self.echo:
      return "echo", "echo is not supported; leave it false"
    if self.suffix:
      return "suffix", "suffix (insertion) is not supported"
    if self.best_of not in (None, 1):
      return "best_of", "best_of is not supported; leave it at 1"
    if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) \
        and len(self.prompt) != 1:
      return "prompt", "one prompt per request (a string, or a list of token ids)"
    return super().unsupported()


class TextPart(Request):
  type: Literal["text"]
  text: str


class ChatMessage(Request):
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[TextPart] | None = None
  name: str | None = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(part.text for part in self.content)
    return self.content or ""


class ChatCompletionRequest(Sampled):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens


# --- responses --------------------------------------------------------------------

class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class Response(BaseModel):
  id: str
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  astra: dict[str, Any] | None = None  # extension: the request's plan and times


class CompletionChoice(BaseModel):
  index: int = 0
  text: str
  finish_reason: Literal["stop", "length"] | None = None
  logprobs: None = None


class Completion(Response):
  object: Literal["text_completion"] = "text_completion"
  choices: list[CompletionChoice]
  usage: Usage | None = None


class AssistantMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class ChatChoice(BaseModel):
  index: int = 0
  message: AssistantMessage
  finish_reason: Literal["stop", "length"] | None = None
  logprobs: None = None


class ChatCompletion(Response):
  object: Literal["chat.completion"] = "chat.completion"
  choices: list[ChatChoice]
  usage: Usage


class Delta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class ChatChunkChoice(BaseModel):
  index: int = 0
  delta: Delta
  finish_reason: Literal["stop", "length"] | None = None
  logprobs: None = None


class ChatCompletionChunk(Response):
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  choices: list[ChatChunkChoice]
  usage: Usage | None = None


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "astra-jax"
  astra: dict[str, Any] | None = None  # extension: context, mesh, exchange, buckets


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ErrorInfo(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorInfo


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"
