"""Prefill latency of a sequence-parallel forward on P devices: compute + communication.

Pure Python (no JAX): the inputs are per-layer compute seconds (measured on
this host, or ``roofline_seconds`` of ``astra_jax.netsim.flops`` counts on a device
profile) and per-layer collectives (kind, count, operand bytes per device, read
from the compiled program by ``astra_jax.netsim.traffic``).  One device's latency:

  latency = embed + sum over layers [compute_layer + sum over collectives comm(c)]
            + head + sum over final collectives comm(c)

with no overlap of compute and communication (every layer waits for its K/V),
unless a layer can overlap part of its compute with its own transfers: with
``layer_overlap_s`` = o seconds of a layer's compute c that need nothing from
the transfers (an exchange with ``overlap=true``: the local block's
attention), the layer's transfers start once the other c - o seconds are done
and the layer ends when both they and the o seconds are:

  layer = compute_layer + max(0, sum over collectives comm(c) - o),   o <= compute_layer

(o = 0 is the formula above).  Only a layer's own transfers overlap; the
final collectives (after the head) do not.  ``Latency.comm_s`` is then the
communication left exposed, and ``hidden_s`` what ran under compute.

A collective's time is its bytes on the bottleneck link divided by the
bandwidth, plus a fixed per-message latency alpha for each collective op:

  comm(c) = wire_bytes(c) * 8 / (B * e(c)) + alpha * count(c)

where e(c), the link efficiency of the collective's kind, is 1 unless given
(``Network.link_efficiency``): TCP collectives on a real link reach only part
of its rate, and ``infer.lab.model_check`` measures that part per kind with
``infer.lab.collective_time`` on the shaped testbed.

A link may also have a token bucket in front of it (Linux ``tbf``, the
testbed's shaper; ``Network.burst_bytes`` = its depth b): while the link is
idle the bucket refills at the bandwidth, up to b, and the first bytes of the
next transfer leave at once against it, so a collective that starts with a
level of l tokens takes

  comm(c) = max(0, wire_bytes(c) - l) * 8 / (B * e(c)) + alpha * count(c)

(l = b after a long enough pause; b = 0, the default, is the formula above).
Between layers the bucket refills during compute, which is what lets a
message of a few tens of KB cross a 10 Mbit/s tbf link faster than its bits
divided by the rate.

``wire_bytes`` depends on the topology (s = operand bytes per device, P devices):

  switched  full-duplex point-to-point links through a switch, B per direction
            per device.  Devices send concurrently; a device's downlink is the
            bottleneck.  all-gather: it receives the other P-1 shards, (P-1) s.
            all-reduce (ring): 2 (P-1)/P s.  reduce-scatter, all-to-all:
            (P-1)/P s.  collective-permute: s.
  shared    one half-duplex medium (Wi-Fi, a hub) of bandwidth B for all P
            devices; transmissions serialize and every device hears each one.
            all-gather: each device broadcasts its shard once, P s.  all-reduce:
            each broadcasts its buffer, everyone sums, P s.  reduce-scatter,
            all-to-all: (P-1) s.  collective-permute: P s.

The default is ``switched``: it is the usual set-up for devices on one LAN
(an Ethernet switch) and the kinder of the two to the exchanges that send the
most, so it does not overstate what compression buys.

A bandwidth trace (piecewise-constant Mbit/s over time) models a dynamic
network: a transfer that starts at time t ends when the integral of the
bandwidth from t reaches its bits (``Trace.transfer_seconds``).  A constant
bandwidth is a one-segment trace.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterable, Sequence

from astra_jax.netsim.flops import Cost

TOPOLOGIES = ("switched", "shared")
DEFAULT_TOPOLOGY = "switched"
DEFAULT_MESSAGE_LATENCY_S = 1e-3

# bytes on the bottleneck per operand byte, as functions of P
_WIRE = {
    "switched": {
        "all-gather": lambda p: p - 1,
        "all-reduce": lambda p: 2 * (p - 1) / p,
        "reduce-scatter": lambda p: (p - 1) / p,
        "all-to-all": lambda p: (p - 1) / p,
        "collective-permute": lambda p: 1,
    },
    "shared": {
        "all-gather": lambda p: p,
        "all-reduce": lambda p: p,
        "reduce-scatter": lambda p: p - 1,
        "all-to-all": lambda p: p - 1,
        "collective-permute": lambda p: p,
    },
}


@dataclasses.dataclass(frozen=True)
class Transfer:
  """``count`` collectives of one kind moving ``operand_bytes`` per device in total."""

  kind: str
  count: int
  operand_bytes: int


def check_topology(topology: str) -> str:
  if topology not in TOPOLOGIES:
    raise ValueError(f"unknown topology {topology!r}; choose one of {list(TOPOLOGIES)}")
  return topology


def wire_bytes(kind: str, operand_bytes: float, mesh_size: int, topology: str) -> float:
  """Bytes crossing the bottleneck link for a collective (module docstring)."""
  check_topology(topology)
  kind = kind.removesuffix("-start")
  if kind not in _WIRE[topology]:
    raise ValueError(f"no wire model for collective {kind!r}; known: {sorted(_WIRE[topology])}")
  if mesh_size <= 1:
    return 0.0
  return _WIRE[topology][kind](mesh_size) * operand_bytes


@dataclasses.dataclass(frozen=True)
class Trace:
  """Piecewise-constant bandwidth: ``segments`` of (start seconds, Mbit/s).

  The first segment starts at 0; each rate holds until the next start, and the
  last forever (it must be positive so every transfer ends).  A rate of 0 is
  an outage.
  """

  segments: tuple[tuple[float, float], ...]

  def __post_init__(self):
    segs = tuple((float(t), float(r)) for t, r in self.segments)
    object.__setattr__(self, "segments", segs)
    if not segs or segs[0][0] != 0:
      raise ValueError("a bandwidth trace must start at time 0, e.g. '0:100,2:10'")
    starts = [t for t, _ in segs]
    if any(b <= a for a, b in zip(starts, starts[1:])):
      raise ValueError(f"bandwidth trace start times must increase, got {starts}")
    if any(r < 0 for _, r in segs):
      raise ValueError("bandwidth trace rates must be >= 0 Mbit/s")
    if segs[-1][1] <= 0:
      raise ValueError("the last segment of a bandwidth trace must have a positive rate "
                       "(it lasts forever)")

  @classmethod
  def constant(cls, mbps: float) -> "Trace":
    if not mbps > 0:
      raise ValueError(f"bandwidth must be positive (Mbit/s), got {mbps}")
    return cls(((0.0, mbps),))

  @classmethod
  def parse(cls, text: str) -> "Trace":
    """'0:100,2:10,5:50' -> 100 Mbit/s from 0 s, 10 from 2 s, 50 from 5 s on."""
    try:
      pairs = [tuple(float(x) for x in item.split(":")) for item in text.split(",")]
      if any(len(p) != 2 for p in pairs):
        raise ValueError
    except ValueError:
      raise ValueError(f"cannot read bandwidth trace {text!r}: write SECONDS:MBITS pairs "
                       "separated by commas, e.g. '0:100,2:10,5:50'") from None
    return cls(tuple(pairs))

  def transfer_seconds(self, start: float, nbytes: float) -> float:
    """Time to move ``nbytes`` starting at ``start`` seconds (integrates the trace)."""
    bits = 8.0 * nbytes
    if bits <= 0:
      return 0.0
    starts = [t for t, _ in self.segments]
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    t = start
    while True:
      rate = self.segments[i][1] * 1e6
      end = self.segments[i + 1][0] if i + 1 < len(self.segments) else float("inf")
      if rate > 0 and bits <= rate * (end - t):
        return t + bits / rate - start
      bits -= rate * (end - t)
      t, i = end, i + 1

  def bytes_between(self, start: float, end: float) -> float:
    """Bytes the trace carries from ``start`` to ``end`` seconds (its integral / 8)."""
    total = 0.0
    for i, (t, rate) in enumerate(self.segments):
      until = self.segments[i + 1][0] if i + 1 < len(self.segments) else float("inf")
      lo, hi = max(t, start), min(until, end)
      if hi > lo:
        total += rate * 1e6 / 8 * (hi - lo)
    return total

  def label(self) -> str:
    if len(self.segments) == 1:
      return f"{self.segments[0][1]:g}"
    return "trace:" + ",".join(f"{t:g}:{r:g}" for t, r in self.segments)


@dataclasses.dataclass(frozen=True)
class Network:
  """The link between the devices: bandwidth (trace), topology, per-message latency."""

  trace: Trace
  topology: str = DEFAULT_TOPOLOGY
  message_latency_s: float = DEFAULT_MESSAGE_LATENCY_S
  # (collective kind, fraction of the bandwidth it reaches), e.g. measured on a
  # real link by ``infer.lab.collective_time``; kinds not listed reach all of it
  link_efficiency: tuple[tuple[str, float], ...] = ()
  # depth in bytes of a token bucket in front of each link (tbf); 0: none
  burst_bytes: float = 0.0

  def __post_init__(self):
    check_topology(self.topology)
    if self.message_latency_s < 0:
      raise ValueError(f"message latency must be >= 0 s, got {self.message_latency_s}")
    if self.burst_bytes < 0:
      raise ValueError(f"burst must be >= 0 bytes, got {self.burst_bytes}")
    object.__setattr__(self, "link_efficiency", tuple(sorted(dict(self.link_efficiency).items())))
    for kind, eff in self.link_efficiency:
      if kind not in _WIRE[self.topology]:
        raise ValueError(f"link efficiency for unknown collective {kind!r}; known: "
                         f"{sorted(_WIRE[self.topology])}")
      if not 0 < eff <= 1:
        raise ValueError(f"link efficiency of {kind} must be in (0, 1], got {eff}")

  def wire_bytes(self, transfer: Transfer, mesh_size: int) -> float:
    return wire_bytes(transfer.kind, transfer.operand_bytes, mesh_size, self.topology)

  def seconds(self, transfer: Transfer, mesh_size: int, start: float = 0.0,
              tokens: float = 0.0) -> float:
    """comm(c) of the module docstring, for a transfer starting at ``start`` with
    ``tokens`` bytes in the bucket; a collective kind with link efficiency e
    moves its bytes at e x the bandwidth."""
    if mesh_size <= 1 or transfer.count == 0:
      return 0.0
    nbytes = max(0.0, self.wire_bytes(transfer, mesh_size) - tokens)
    nbytes /= dict(self.link_efficiency).get(transfer.kind.removesuffix("-start"), 1.0)
    return self.trace.transfer_seconds(start, nbytes) + self.message_latency_s * transfer.count


@dataclasses.dataclass(frozen=True)
class Latency:
  """compute_s + comm_s (the communication not hidden under compute) = total_s;
  hidden_s: communication that ran while the device computed (not in the total)."""

  compute_s: float
  comm_s: float
  hidden_s: float = 0.0

  @property
  def total_s(self) -> float:
    return self.compute_s + self.comm_s


def roofline_seconds(cost: Cost, peak_flops: float, mem_bandwidth: float,
                     efficiency: float = 1.0) -> float:
  """max(FLOPs / (peak * efficiency), bytes / memory bandwidth)."""
  if not (peak_flops > 0 and mem_bandwidth > 0 and 0 < efficiency <= 1):
    raise ValueError("roofline needs peak FLOP/s > 0, memory bandwidth > 0 and "
                     f"0 < efficiency <= 1 (got {peak_flops}, {mem_bandwidth}, {efficiency})")
  return max(cost.flops / (peak_flops * efficiency), cost.bytes / mem_bandwidth)


def prefill_latency(*, layers: int, layer_compute_s: float,
                    layer_transfers: Sequence[Transfer], mesh_size: int,
                    network: Network, embed_s: float = 0.0, head_s: float = 0.0,
                    final_transfers: Iterable[Transfer] = (),
                    layer_overlap_s: float = 0.0) -> Latency:
  """One device's prefill latency (module docstring), walking the timeline.

  The timeline matters only for a bandwidth trace: each transfer starts when
  the compute before it ends (a layer's: all but its ``layer_overlap_s``).
  """
  if layers < 1:
    raise ValueError(f"layers must be >= 1, got {layers}")
  if not 0 <= layer_overlap_s <= layer_compute_s:
    raise ValueError(f"layer_overlap_s must be in [0, layer_compute_s={layer_compute_s}], "
                     f"got {layer_overlap_s}")
  t = compute = embed_s
  comm = hidden = 0.0
  bucket, idle_since = network.burst_bytes, 0.0  # full: the link idled before the prefill

  def send(transfers) -> float:
    nonlocal t, bucket, idle_since
    start = t
    bucket = min(network.burst_bytes, bucket + network.trace.bytes_between(idle_since, t))
    for tr in transfers:
      used = min(bucket, network.wire_bytes(tr, mesh_size)) if mesh_size > 1 else 0.0
      t += network.seconds(tr, mesh_size, start=t, tokens=used)
      bucket -= used
    idle_since = t
    return t - start

  for _ in range(layers):
    t += layer_compute_s - layer_overlap_s
    busy = send(layer_transfers)
    t += max(0.0, layer_overlap_s - busy)  # the overlapped compute outlasts the transfers
    compute += layer_compute_s
    comm, hidden = comm + max(0.0, busy - layer_overlap_s), hidden + min(busy, layer_overlap_s)
  t, compute = t + head_s, compute + head_s
  comm += send(final_transfers)
  return Latency(compute, comm, hidden)
