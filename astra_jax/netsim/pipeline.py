"""The forward-streaming schedule of a causal prefill, modelled (issue 28's plan).

In a causal model device i attends to its own block and to devices j < i
only.  With the all-gather exchange (``latency.prefill_latency``) every layer
is a barrier: each device waits until every block of the layer has crossed.
Streamed forward instead, device j sends each layer's K/V (codes) point to
point to every later device as soon as they are computed and goes on; device
i waits at layer l only for the messages of devices j < i of that layer.

The model walks that schedule, message by message, on switched full-duplex
links: a message from j to i occupies j's uplink and i's downlink for
``message_s`` (its bytes over the bandwidth) and arrives ``latency_s`` (the
per-message latency: software and propagation, which do not hold the link)
after that; a link carries one message at a time, in the order they were sent.  Per layer
and device: the K/V are ready ``kv_fraction`` of the layer's compute after
it starts; attention and the rest (the other 1 - kv_fraction) start when the
K/V are ready and every earlier device's message of the layer has arrived.

  ready(i, l)   = start(i, l) + kv_fraction * c
  arrive(j->i, l) = max(ready(j, l), uplink j free, downlink i free) + m + a
  end(i, l)     = max(ready(i, l), arrive(j->i, l) for j < i) + (1 - kv_fraction) * c
  start(i, l+1) = end(i, l)

On a ``shared`` medium (Wi-Fi, a hub) every message occupies the one
medium instead of a pair of links.  Device 0 never waits; the prefill ends
when the last device ends.  When
(P - 1) m <= c the link hides behind compute after the first layer and the
prefill takes about L c plus one layer of link; when it is slower, the
links set the pace: device 0's uplink and the last device's downlink each
carry P - 1 messages a layer, about L (P - 1) m plus the pipeline's fill.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from astra_jax.netsim import latency


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The modelled timeline: ``end[i]`` when device i finished its last layer,
  ``waited[i]`` the seconds it spent waiting for messages, ``messages`` sent
  (all forward: from a device to a later one)."""

  end: tuple[float, ...]
  waited: tuple[float, ...]
  messages: int

  @property
  def total_s(self) -> float:
    return max(self.end)


def streaming_prefill(*, layers: int, layer_compute_s: float, message_s: float,
                      mesh_size: int, kv_fraction: float = 0.3,
                      embed_s: float = 0.0, head_s: float = 0.0,
                      shared: bool = False, latency_s: float = 0.0) -> Schedule:
  """Walks the forward-streaming schedule (module docstring); every device
  computes ``layer_compute_s`` per layer on its own block."""
  if layers < 1 or mesh_size < 1:
    raise ValueError(f"need layers >= 1 and mesh_size >= 1, got {layers} and {mesh_size}")
  if not 0 <= kv_fraction <= 1:
    raise ValueError(f"kv_fraction must be in [0, 1], got {kv_fraction}")
  if layer_compute_s < 0 or message_s < 0 or latency_s < 0:
    raise ValueError("compute and message times must be >= 0 s")
  c, m = layer_compute_s, message_s
  start = [embed_s] * mesh_size
  waited = [0.0] * mesh_size
  up = [0.0] * mesh_size  # when each device's uplink is next free
  down = [0.0] * mesh_size  # ... and its downlink
  messages = 0
  for _ in range(layers):
    ready = [s + kv_fraction * c for s in start]
    arrive = [[] for _ in range(mesh_size)]
    # messages leave in the order their K/V became ready (ties: lower sender,
    # then the nearer receiver first)
    for j in sorted(range(mesh_size), key=lambda d: (ready[d], d)):
      for i in range(j + 1, mesh_size):
        if shared:  # one medium: every link is the same one
          begin = max(ready[j], up[0])
          up[0] = begin + m
        else:
          begin = max(ready[j], up[j], down[i])
          up[j] = down[i] = begin + m
        arrive[i].append(begin + m + latency_s)
        messages += 1
    for i in range(mesh_size):
      go = max([ready[i], *arrive[i]])
      waited[i] += go - ready[i]
      start[i] = go + (1 - kv_fraction) * c
  return Schedule(tuple(s + head_s for s in start), tuple(waited), messages)


def all_gather_prefill(*, layers: int, layer_compute_s: float, message_s: float,
                       mesh_size: int, embed_s: float = 0.0, head_s: float = 0.0) -> float:
  """The barrier schedule in the same terms, for comparison: every layer ends
  when the slowest downlink has received the other P - 1 blocks, (P - 1) m
  after the layer's compute (``latency.prefill_latency`` with no overlap)."""
  link = (mesh_size - 1) * message_s if mesh_size > 1 else 0.0
  return embed_s + layers * (layer_compute_s + link) + head_s


def streaming_latency(*, layers: int, layer_compute_s: float,
                      layer_transfers: Sequence[latency.Transfer], mesh_size: int,
                      network: latency.Network, embed_s: float = 0.0, head_s: float = 0.0,
                      kv_fraction: float = 0.3) -> latency.Latency:
  """``latency.prefill_latency``'s answer for the stream exchange: the same
  inputs (per-layer compute, the layer's collectives as the in-process
  program has them: P - 1 one-way shifts of one block each), walked as the
  streamed schedule.  A message takes its block's bytes at the link's rate
  (the collective-permute efficiency, if measured), then arrives the
  per-message latency later; the tbf bucket is not credited.  ``compute_s`` is the last
  device's compute, ``comm_s`` what it waited, ``hidden_s`` the rest of its
  messages' link time."""
  if mesh_size == 1:
    return latency.prefill_latency(layers=layers, layer_compute_s=layer_compute_s,
                                   layer_transfers=(), mesh_size=1, network=network,
                                   embed_s=embed_s, head_s=head_s)
  shifts = [t for t in layer_transfers if t.kind.removesuffix("-start") == "collective-permute"]
  if not shifts or len(shifts) != len(layer_transfers):
    raise ValueError("a streamed layer moves its block by one-way shifts (collective-permute) "
                     f"only; got {[t.kind for t in layer_transfers]}")
  count = sum(t.count for t in shifts)
  block = sum(t.operand_bytes for t in shifts) / count
  # one message: its bytes cross one link (or the shared medium) once
  efficiency = dict(network.link_efficiency).get("collective-permute", 1.0)
  message_s = network.trace.transfer_seconds(0.0, block / efficiency)
  schedule = streaming_prefill(layers=layers, layer_compute_s=layer_compute_s,
                               message_s=message_s, latency_s=network.message_latency_s,
                               mesh_size=mesh_size,
                               kv_fraction=kv_fraction, embed_s=embed_s, head_s=head_s,
                               shared=network.topology == "shared")
  compute = embed_s + layers * layer_compute_s + head_s
  waited = schedule.waited[-1]
  inbound = (mesh_size - 1) * layers * (message_s + network.message_latency_s)
  return latency.Latency(compute, waited, max(0.0, inbound - waited))
