"""Requests to the engine, first come first served, one generation at a time.

``Scheduler.submit`` admits a request or raises ``Busy`` when ``max_queue``
requests already wait (besides the one running); admitted requests run in
arrival order on one worker thread, each alone from its prompt to its last
token, so no two are ever mixed.  The worker turns tokens into text
(``serve.text.TextStream``: stop strings, end-of-text) and hands each piece
to the request's asyncio queue as it comes; a request whose client went away
is cancelled and stops at its next token (or never starts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, AsyncIterator

from astra_jax.serve.engine import Engine, Sampling
from astra_jax.serve.text import TextStream


class Busy(RuntimeError):
  """The queue is full."""


@dataclasses.dataclass
class Piece:
  """Text of the reply as it grows (``text`` may be empty in the last piece)."""
  text: str


@dataclasses.dataclass
class Done:
  finish_reason: str  # "stop" | "length"
  completion_tokens: int
  stats: dict[str, Any]  # the plan and the times (the response's ``astra`` field)


@dataclasses.dataclass
class Failed:
  error: BaseException


class Job:
  """One admitted request: read its events with ``async for``."""

  def __init__(self, prompt_ids: list[int], sampling: Sampling, stops: list[str],
               plan: dict[str, Any], loop: asyncio.AbstractEventLoop):
    self.prompt_ids, self.sampling, self.stops, self.plan = prompt_ids, sampling, stops, plan
    self.submitted = time.perf_counter()
    self.cancelled = threading.Event()
    self._loop = loop
    self._events: asyncio.Queue = asyncio.Queue()

  def cancel(self) -> None:
    self.cancelled.set()

  def emit(self, event) -> None:  # from the worker thread
    self._loop.call_soon_threadsafe(self._events.put_nowait, event)

  async def events(self) -> AsyncIterator[Piece | Done | Failed]:
    while True:
      event = await self._events.get()
      yield event
      if isinstance(event, (Done, Failed)):
        return


class Scheduler:
  def __init__(self, engine: Engine, max_queue: int):
    self.engine, self.max_queue = engine, max_queue
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
    self._lock = threading.Lock()
    self.pending = 0  # admitted and not finished: the running one and those waiting
    self.finished = 0  # requests done (answered, failed or cancelled)
    self._running: Job | None = None

  @property
  def waiting(self) -> int:
    return max(self.pending - 1, 0)

  def submit(self, prompt_ids: list[int], sampling: Sampling, stops: list[str],
             plan: dict[str, Any]) -> Job:
    """Busy when ``max_queue`` requests already wait; else the queued job
    (``plan``: the engine's, which the response reports before generation)."""
    with self._lock:
      if self.pending > self.max_queue:
        raise Busy(f"the server is busy: {self.pending - 1} request(s) already wait behind "
                   f"the one running (--max-queue {self.max_queue}); retry later")
      self.pending += 1
    job = Job(prompt_ids, sampling, stops, plan, asyncio.get_running_loop())
    self._worker.submit(self._run, job)
    return job

  def call_soon(self, fn) -> None:
    """Runs ``fn`` on the engine's thread after the requests already admitted
    (the multi-rank engine warms up a rank that joined again)."""
    self._worker.submit(fn)

  def shutdown(self) -> None:
    """Drops the waiting requests and stops the running one at its next token."""
    self._worker.shutdown(wait=False, cancel_futures=True)
    running = self._running
    if running is not None:
      running.cancel()

  def _run(self, job: Job) -> None:
    self._running = job
    try:
      if not job.cancelled.is_set():
        job.emit(self._generate(job))
    except BaseException as e:  # noqa: BLE001 (the request fails, the server goes on)
      job.emit(Failed(e))
    finally:
      self._running = None
      with self._lock:
        self.pending -= 1
        self.finished += 1

  def _generate(self, job: Job) -> Done:
    engine = self.engine
    started = time.perf_counter()
    text = TextStream(engine.decode, stops=job.stops, eos_ids=engine.chat.end_ids)
    generation = engine.generate(job.prompt_ids, job.sampling)
    first = None
    finish = "length"
    try:
      for token in generation:
        first = first or time.perf_counter()
        piece, ended = text.push(token)
        if piece:
          job.emit(Piece(piece))
        if ended:
          finish = "stop"
          break
        if job.cancelled.is_set():
          break
      else:
        rest = text.finish()
        if rest:
          job.emit(Piece(rest))
    finally:
      generation.close()
    end = time.perf_counter()
    tokens = len(text.ids)
    stats = {"plan": generation.plan, "queue_s": round(started - job.submitted, 4),
             "prefill_s": round(generation.prefill_s, 4),
             "first_token_s": round((first or end) - started, 4),
             "decode_tokens_per_s": (round((tokens - 1) / (end - first), 2)
                                     if first and tokens > 1 and end > first else None)}
    return Done(finish, tokens, stats)
