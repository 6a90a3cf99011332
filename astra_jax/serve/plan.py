"""Which plan a request runs with: the fastest predicted, by the project's latency
model, among one device and the sequence-parallel plans the server has.

A plan is one device (rank 0 alone, the whole prompt) or the live ranks
streaming forward exact K/V (``exact``) or ASTRA codes (``G=32``, ...).  The
server measures what the model needs when it starts (``GroupEngine.warm_up``):

  - the link, from rank 0 to each other rank (``Link``: a small message for
    the latency, a large one for the rate), over the control channel;
  - per bucket, rank 0's prefill alone (``one``) and rank 0's own block of
    each plan (``block``): its compute, since rank 0 never waits in a
    forward-streamed prefill.

A plan's predicted time to first token is then
``netsim.pipeline.streaming_prefill`` (layers of compute, one message per
layer per later rank at the link's rate plus its latency) plus the plan's
fixed cost per request (the control round trip, handing the request and the
first token between threads and processes, the host transport's calls):
calibrated at warm-up as the median, over the buckets, of the measured time
to first token minus the schedule's (``calibrate``), one round trip of the
link before that.  One device's is its measured time to first token.  Plans past
the quality budget (``max_loss``: perplexity increase over one device, in
percent, measured at start) are never chosen.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from astra_jax.netsim import pipeline

ONE = "one-device"
MARGIN = 0.1  # a plan over several ranks must be predicted this much faster than one device


@dataclasses.dataclass(frozen=True)
class Link:
  """Rank 0 to the other ranks: ``latency_s`` one way, ``mbit`` per second."""
  latency_s: float
  mbit: float

  def seconds(self, nbytes: float) -> float:
    return nbytes * 8 / (self.mbit * 1e6)

  def as_dict(self) -> dict[str, float]:
    return {"latency_ms": round(self.latency_s * 1e3, 3), "mbit": round(self.mbit, 2)}


def link_from_probe(small_rtt_s: float, big_rtt_s: float, big_bytes: int) -> Link:
  """The link from two round trips: a tiny message's and one carrying
  ``big_bytes`` more (the answers are tiny both times)."""
  latency = max(small_rtt_s / 2, 0.0)
  extra = max(big_rtt_s - small_rtt_s, 1e-6)
  return Link(latency, big_bytes * 8 / extra / 1e6)


@dataclasses.dataclass
class Planner:
  """The measured costs and the model over them.

  ``message_bytes[label]``: bytes of one layer's message per token of a
  block (K and V: exact floats or packed codes); ``one[bucket]``: rank 0's
  whole-prompt prefill, seconds; ``block[(label, ranks, bucket)]``: rank 0's
  block of that plan, seconds; ``loss[label]``: perplexity increase over one
  device, percent (None: not measured).
  """

  layers: int
  message_bytes: dict[str, int]
  link: Link | None = None
  one: dict[int, float] = dataclasses.field(default_factory=dict)
  block: dict[tuple[str, int, int], float] = dataclasses.field(default_factory=dict)
  loss: dict[str, float | None] = dataclasses.field(default_factory=dict)
  max_loss: float | None = None
  # measured time to first token by (label, ranks, bucket), and the fixed cost
  # per request by (label, ranks) that ``calibrate`` derives from it
  ttft: dict[tuple[str, int, int], float] = dataclasses.field(default_factory=dict)
  overhead: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)

  def allowed(self, label: str) -> bool:
    if label == ONE or self.max_loss is None:
      return True
    loss = self.loss.get(label)
    return loss is not None and loss <= self.max_loss

  def predict(self, label: str, ranks: int, bucket: int) -> float | None:
    """Seconds to the first token (None: not measured)."""
    if label == ONE or ranks == 1:
      return self.one.get(bucket)
    compute = self.block.get((label, ranks, bucket))
    if compute is None or self.link is None:
      return None
    fixed = self.overhead.get((label, ranks), 2 * self.link.latency_s)
    return self._schedule_s(label, ranks, bucket, compute) + fixed

  def _schedule_s(self, label: str, ranks: int, bucket: int, compute: float) -> float:
    message = self.message_bytes[label] * (bucket // ranks)
    return pipeline.streaming_prefill(
        layers=self.layers, layer_compute_s=compute / self.layers,
        message_s=self.link.seconds(message), latency_s=self.link.latency_s,
        mesh_size=ranks).total_s

  def calibrate(self) -> None:
    """Each plan's fixed cost per request from the measured times to first token."""
    by_plan: dict[tuple[str, int], list[float]] = {}
    for (label, ranks, bucket), measured in self.ttft.items():
      compute = self.block.get((label, ranks, bucket))
      if ranks > 1 and compute is not None and self.link is not None:
        by_plan.setdefault((label, ranks), []).append(
            measured - self._schedule_s(label, ranks, bucket, compute))
    self.overhead = {k: max(statistics.median(v), 0.0) for k, v in by_plan.items()}

  def choose(self, candidates: list[tuple[str, int, int]]) -> tuple[tuple[str, int, int],
                                                                    dict[str, Any]]:
    """The fastest allowed of ``candidates`` ((label, ranks, bucket)), a plan
    over several ranks only when predicted ``MARGIN`` faster than one device,
    and every candidate's prediction (seconds, None if unknown; one device
    when nothing is known)."""
    predicted = {f"{label}@{ranks}": self.predict(label, ranks, bucket)
                 for label, ranks, bucket in candidates}
    best, best_s = None, math.inf
    for (label, ranks, bucket), s in zip(candidates, predicted.values()):
      if s is not None and ranks > 1:
        s /= 1 - MARGIN  # errors in the model must not make a request slower than one device
      if s is not None and s < best_s and self.allowed(label):
        best, best_s = (label, ranks, bucket), s
    if best is None:
      best = next(c for c in candidates if c[0] == ONE)
    return best, {k: (None if v is None else round(v, 4)) for k, v in predicted.items()}
