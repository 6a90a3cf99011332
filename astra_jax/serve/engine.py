"""The model behind the server: ``Engine``, a small interface, and ``LocalEngine``,
one process running ``astra_jax.run.generate.Generator`` (the CLIs' prefill and
decode) on ``mesh_size`` of its own devices.

``Engine.plan(prompt_len, max_tokens)`` says how a request would run, or raises
``PromptTooLong``; ``Engine.generate(prompt_ids, sampling)`` runs it and
returns a ``Generation``, an iterator of new token ids that also carries its
plan and prefill time.  Calls come one at a time (``serve.scheduler``).  A
multi-process engine (every rank joins the prefill, one decodes), per-request
plans and lost-device handling are meant to be other implementations of this
interface; the HTTP layer knows only these methods.

Bucketing.  The prefill compiles once per prompt length, so prompts are
right-padded to a few lengths (``default_buckets``: multiples of the mesh
size doubling up to the context) and ``warm_up`` compiles each of them, plus
the decode step and the sampling on every device that can hold a prompt's last
token, before the server takes requests.  After that no request compiles
(``compiles_since_warm_up`` counts XLA compiles to prove it).  With the exact
exchange padding changes nothing but speed (attention masks the padded
positions); with ``vq`` which tokens cross the link quantized depends on the
padded length, as it does in the CLI, which pads to the next multiple of the
mesh size only.
"""

from __future__ import annotations

import abc
import dataclasses
import random
import sys
import time
from typing import Any, Callable, Iterator

import jax

from astra_jax.run import generate
from astra_jax.serve import chat as chat_lib
from astra_jax.serve.load import Loaded


class PromptTooLong(ValueError):
  """A prompt (with its reply) that does not fit the model's window."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_tokens: int
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  seed: int | None = None  # None: a fresh one per request
  plan: str | None = None  # a plan the request asked for (None: the engine's choice)


class Generation:
  """One request's new token ids (iterate), with ``plan`` and ``prefill_s``."""

  def __init__(self, tokens: Iterator[int], plan: dict[str, Any], prefill_s: float):
    self._tokens, self.plan, self.prefill_s = tokens, plan, prefill_s

  def __iter__(self):
    return self

  def __next__(self) -> int:
    return next(self._tokens)

  def close(self) -> None:
    """Stops the generation early (the rest of its tokens are not wanted)."""
    close = getattr(self._tokens, "close", None)
    if close is not None:
      close()


class Engine(abc.ABC):
  """A model that turns prompt token ids into new token ids, one request at a time."""

  name: str  # the model id clients ask for
  context: int  # tokens per sequence: prompt + reply
  vocab_size: int
  chat: chat_lib.ChatFormat

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]: ...

  @abc.abstractmethod
  def decode(self, ids: list[int]) -> str: ...

  @abc.abstractmethod
  def describe(self) -> dict[str, Any]:
    """What the engine is (mesh, exchange, ...): /v1/models' ``astra`` field."""

  @abc.abstractmethod
  def plan(self, prompt_len: int, max_tokens: int, force: str | None = None) -> dict[str, Any]:
    """How a request would run (``force``: the plan asked for); PromptTooLong
    when it does not fit, ValueError for a plan it does not have."""

  @abc.abstractmethod
  def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation: ...


def default_buckets(mesh_size: int, context: int, smallest: int = 16) -> list[int]:
  """Padded prompt lengths: the multiple of ``mesh_size`` at or above ``smallest``
  (at most the context), doubled while under the context, and the largest
  multiple of ``mesh_size`` within the context."""
  top = context // mesh_size * mesh_size
  if top == 0:
    raise ValueError(f"the context of {context} tokens is shorter than the mesh of "
                     f"{mesh_size} devices")
  length = min(-(-smallest // mesh_size) * mesh_size, top)
  out = []
  while length < top:
    out.append(length)
    length *= 2
  return out + [top]


def exchange_spec(exchange) -> str:
  """The exchange as a spec string (``exact``, ``vq:groups=32,codebook_size=1024``):
  its name and the options that differ from their defaults (a vq's sizes always)."""
  always = {"groups", "codebook_size"}
  options = [f"{f.name}={getattr(exchange, f.name)}" for f in dataclasses.fields(exchange)
             if f.init and (f.name in always or getattr(exchange, f.name) != f.default)
             and f.name not in ("commitment", "noise_scale", "ema_decay", "dead_threshold")]
  return exchange.name + (":" + ",".join(options) if options else "")


class CompileCounter:
  """Counts XLA backend compiles in this process from its creation on."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


class BucketedEngine(Engine):
  """What every engine here shares: ``loaded``'s tokenizer and window, prompts
  padded to ``buckets`` (multiples of ``multiple``: the devices a prompt is
  split over) and the compile count since warm-up."""

  def __init__(self, loaded: Loaded, *, multiple: int, what: str,
               buckets: list[int] | None, chat: chat_lib.ChatFormat | None):
    self.name, self.context = loaded.name, loaded.context
    self.tokenizer, self.vocab_size = loaded.tokenizer, loaded.model_cfg.vocab_size
    self.chat = chat or chat_lib.ChatFormat(None, "nowhere")
    self.buckets = sorted(buckets or default_buckets(multiple, loaded.context))
    bad = [b for b in self.buckets if b % multiple or not 0 < b <= loaded.context]
    if bad:
      raise ValueError(f"bucket lengths {bad} are not multiples of {what} within the context "
                       f"of {loaded.context} tokens")
    self.compiles = CompileCounter()
    self.compiles_at_warm_up: int | None = None

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text)

  def decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids)

  @property
  def compiles_since_warm_up(self) -> int | None:
    if self.compiles_at_warm_up is None:
      return None
    return self.compiles.count - self.compiles_at_warm_up

  def bucket(self, prompt_len: int) -> int | None:
    return next((b for b in self.buckets if b >= prompt_len), None)

  def fitted(self, prompt_len: int, max_tokens: int, bucket: int | None = None) -> int:
    """The bucket of a prompt (``bucket`` if given); PromptTooLong when the prompt
    and its reply do not fit the window."""
    length = bucket or self.bucket(prompt_len)
    if length is None or prompt_len + max_tokens > self.context:
      raise PromptTooLong(
          f"this model's maximum context length is {self.context} tokens; you requested "
          f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
          "completion); shorten the prompt or lower max_tokens")
    return length


class LocalEngine(BucketedEngine):
  """``loaded``'s model on this process's first ``mesh_size`` devices."""

  def __init__(self, loaded: Loaded, *, mesh_size: int, buckets: list[int] | None = None,
               chat: chat_lib.ChatFormat | None = None):
    super().__init__(loaded, multiple=mesh_size, what=f"the mesh size {mesh_size}",
                     buckets=buckets, chat=chat)
    self.mesh_size = mesh_size
    self.exchange = exchange_spec(loaded.model_cfg.exchange)
    self.generator = generate.Generator(loaded.model, mesh_size=mesh_size,
                                        context=loaded.context)

  def describe(self) -> dict[str, Any]:
    return {"context": self.context, "mesh": self.mesh_size, "exchange": self.exchange,
            "buckets": self.buckets, "chat_template": self.chat.template is not None}

  def plan(self, prompt_len: int, max_tokens: int, force: str | None = None) -> dict[str, Any]:
    if force not in (None, "local"):
      raise ValueError(f"plan {force!r} is not available: this server runs one plan ('local', "
                       "its mesh and exchange); plans are for a multi-rank server")
    length = self.fitted(prompt_len, max_tokens)
    device = generate.decode_device(self.mesh_size, prompt_len, length)
    return {"plan": "local", "mesh": self.mesh_size, "exchange": self.exchange, "bucket": length,
            "decode_device": device.id, "processes": jax.process_count()}

  def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation:
    n = len(prompt_ids)
    plan = self.plan(n, sampling.max_tokens)
    if sampling.max_tokens == 0:
      return Generation(iter(()), plan, 0.0)
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    start = time.perf_counter()
    logits, views = self.generator.prefill_prompt(prompt_ids, sampling.max_tokens,
                                                  plan["bucket"])
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    tokens = self.generator.decode(logits, views, n, sampling.max_tokens,
                                   temperature=sampling.temperature, top_p=sampling.top_p,
                                   key=jax.random.PRNGKey(seed % 2**32))
    return Generation(tokens, plan, prefill_s)

  def warm_up(self, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
              ) -> dict[str, Any]:
    """Compiles every bucket's prefill, and on each device that can decode, the
    decode step and sampling; returns the compile count and seconds per bucket."""
    start, compiles = time.perf_counter(), self.compiles.count
    seconds, lower = {}, 0
    for i, length in enumerate(self.buckets):
      t = time.perf_counter()
      logits, views = self.generator.prefill_prompt([self.generator.pad_id] * length, 0, length)
      block = length // self.mesh_size
      # one prompt length per device that can hold the last token of a prompt in (lower, length]
      ends = sorted({max(lower + 1, d * block + 1) for d in range(lower // block, self.mesh_size)})
      for n in ends:
        samplings = [(0.0, 1.0)] + ([(1.0, 1.0), (1.0, 0.9)] if i == 0 else [])
        for temperature, top_p in samplings:
          list(self.generator.decode(logits, views, n, 2, temperature=temperature,
                                     top_p=top_p, key=jax.random.PRNGKey(0)))
      seconds[length] = round(time.perf_counter() - t, 2)
      log(f"warm-up: bucket {length} tokens ({len(ends)} decoding device(s)) compiled in "
          f"{seconds[length]:.1f} s")
      lower = length
    self.compiles_at_warm_up = self.compiles.count
    return {"compile_s": round(time.perf_counter() - start, 2),
            "compiles": self.compiles.count - compiles, "bucket_s": seconds}
