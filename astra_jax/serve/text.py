"""Token ids -> the text a client sees, piece by piece: incremental decoding that
never splits a UTF-8 character, end-of-text tokens, and stop strings.

``TextStream.push(token)`` returns the text that may be shown now and whether
the reply is over.  Text that could be the start of a stop string is held back
until it is known not to be one; a stop string ends the reply and is not part
of it (OpenAI's ``stop``); so does an end-of-text token (``eos_ids``), which
adds no text.  ``finish()`` releases what is held when generation stops for
another reason (``max_tokens``).
"""

from __future__ import annotations

from typing import Callable, Iterable

REPLACEMENT = "\ufffd"  # what a byte-level decoder writes for a partial character


class TextStream:
  def __init__(self, decode: Callable[[list[int]], str], *, stops: Iterable[str] = (),
               eos_ids: Iterable[int] = ()):
    self._decode = decode
    self.stops = [s for s in stops if s]
    self.eos_ids = frozenset(eos_ids)
    self.ids: list[int] = []  # every generated token, end-of-text included
    self.text = ""  # the reply so far (what has been returned)
    self.finish_reason: str | None = None  # "stop" once a stop string or EOS ended it

  def push(self, token: int) -> tuple[str, bool]:
    """(text to show now, whether the reply ended with this token)."""
    if self.finish_reason is not None:
      raise ValueError("the reply has ended; push no more tokens")
    self.ids.append(token)
    if token in self.eos_ids:
      self.finish_reason = "stop"
      return self._emit(self._full(self.ids[:-1]), final=True), True
    full = self._full(self.ids)
    if full.endswith(REPLACEMENT):  # a character still incomplete: wait for its bytes
      return "", False
    cut = self._first_stop(full)
    if cut is not None:
      self.finish_reason = "stop"
      return self._emit(full[:cut], final=True), True
    return self._emit(full, final=False), False

  def finish(self) -> str:
    """What is still held back, once no more tokens come (e.g. max_tokens)."""
    if self.finish_reason is not None:
      return ""
    return self._emit(self._full(self.ids), final=True)

  def _full(self, ids: list[int]) -> str:
    return self._decode(ids) if ids else ""

  def _first_stop(self, full: str) -> int | None:
    # a stop string may only be new where the text changed (and just before it)
    start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
    hits = [i for i in (full.find(s, start) for s in self.stops) if i >= 0]
    return min(hits) if hits else None

  def _emit(self, full: str, *, final: bool) -> str:
    """The part of ``full`` not yet returned, less (unless ``final``) a tail that
    may still grow into a stop string."""
    keep = len(full) if final else len(full) - self._held(full)
    keep = max(keep, len(self.text))
    piece = full[len(self.text):keep]
    self.text += piece
    return piece

  def _held(self, full: str) -> int:
    """Length of the longest tail of ``full`` that a stop string starts with."""
    longest = 0
    for stop in self.stops:
      for n in range(min(len(stop) - 1, len(full)), longest, -1):
        if full.endswith(stop[:n]):
          longest = n
          break
    return longest
