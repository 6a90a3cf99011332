"""Bytes on the wire, read from the compiled program.

``hlo_traffic`` parses the optimized HLO text of a compiled SPMD program and
sums, for every collective, the bytes of its operands on one device: for an
``all-gather`` that is the block this device contributes; for an
``all-reduce`` the buffer it reduces.  Every traffic figure in astra-jax comes
from here, printed beside the analytic formula (``sequence_parallel_bytes``).

Collectives inside a loop body run once per iteration, which static HLO text
cannot count; such programs are rejected with a clear error (unroll the loop,
as the astra-jax models do).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

COLLECTIVES = {
    "all-gather", "all-gather-start", "all-reduce", "all-reduce-start",
    "reduce-scatter", "collective-permute", "collective-permute-start",
    "all-to-all", "ragged-all-to-all", "collective-broadcast",
}

_ITEM_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16,
    "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16,
    "f32": 32, "f64": 64, "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8,
    "f8e4m3": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e4m3b11fnuz": 8, "f8e3m4": 8,
    "f8e8m0fnu": 8, "f4e2m1fn": 4, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations)=\{?([^}\s]*)")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  operand_bytes: int
  result_bytes: int
  computation: str


@dataclasses.dataclass(frozen=True)
class TrafficReport:
  """Collectives of one compiled program, bytes per device."""

  collectives: tuple[Collective, ...]

  @property
  def bytes_per_device(self) -> int:
    return sum(c.operand_bytes for c in self.collectives)

  def by_kind(self) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in self.collectives:
      kind = c.kind.removesuffix("-start")
      row = out.setdefault(kind, {"count": 0, "operand_bytes": 0})
      row["count"] += 1
      row["operand_bytes"] += c.operand_bytes
    return out


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: ``f32[2,3]{1,0}`` or a tuple of them."""
  bits = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _ITEM_BITS:
      raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    bits += n * _ITEM_BITS[dtype]
  return (bits + 7) // 8


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
  parts, depth, cur = [], 0, []
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if "".join(cur).strip():
    parts.append("".join(cur))
  return parts


def hlo_traffic(hlo_text: str) -> TrafficReport:
  """Parses optimized HLO text into the list of collectives with their bytes."""
  text = re.sub(r"/\*.*?\*/", "", hlo_text)
  shapes: dict[str, str] = {}
  found: list[tuple[str, str, list[str], str]] = []
  calls: dict[str, set[str]] = {}
  loop_roots: set[str] = set()
  comp = ""
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      c = _COMP.match(line)
      if c and "=" not in line.split("{")[0]:
        comp = c.group(1)
      continue
    name, rest = m.groups()
    rest = rest.strip()
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].strip()
    shapes[name] = shape
    op = rest[: rest.index("(")] if "(" in rest else rest
    for kind, targets in _CALLS.findall(rest):
      for target in filter(None, (t.strip().lstrip("%") for t in targets.split(","))):
        calls.setdefault(comp, set()).add(target)
        if kind in ("body", "condition"):
          loop_roots.add(target)
    if op in COLLECTIVES:
      open_at = rest.index("(")
      operands = _split_top(rest[open_at + 1: _balanced(rest, open_at) - 1])
      found.append((op, shape, operands, comp))

  in_loop, frontier = set(), list(loop_roots)
  while frontier:
    c = frontier.pop()
    if c not in in_loop:
      in_loop.add(c)
      frontier.extend(calls.get(c, ()))

  collectives = []
  for op, shape, operands, comp in found:
    if comp in in_loop:
      raise ValueError(
          f"a {op} sits inside a loop body ({comp}); its byte count per run is not "
          "static. Unroll the layer loop (no lax.scan/fori_loop over layers) to "
          "measure traffic.")
    operand_bytes = 0
    for operand in operands:
      operand = operand.strip()
      if _ARRAY.search(operand):
        operand_bytes += shape_bytes(operand)
      else:
        operand_bytes += shape_bytes(shapes[operand.lstrip("%").split()[0]])
    result_bytes = shape_bytes(shape)
    if op.endswith("-start"):  # async start returns (operands..., results...)
      result_bytes -= operand_bytes
    collectives.append(Collective(op, operand_bytes, result_bytes, comp))
  return TrafficReport(tuple(collectives))


def compiled_traffic(fn: Callable[..., Any], *args, **kwargs) -> TrafficReport:
  """Compiles ``fn(*args, **kwargs)`` (jitting it if needed) and reads its collectives."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return hlo_traffic(jitted.lower(*args, **kwargs).compile().as_text())


def received_bytes(report: TrafficReport, mesh_size: int, topology: str = "switched") -> int:
  """Bytes reaching one device over its link (``latency.wire_bytes``, switched
  full-duplex links by default): comparable across collective kinds, unlike the
  operand bytes (an all-gather's operand is one block, a ring's P - 1 permutes
  carry P - 1 blocks, an all-reduce's operand is the whole buffer)."""
  from astra_jax.netsim import latency
  return round(sum(latency.wire_bytes(c.kind, c.operand_bytes, mesh_size, topology)
                   for c in report.collectives))


def sequence_parallel_bytes(exchange, *, layers: int, batch: int,
                            tokens_per_device: int, kv_dim: int, dtype: Any,
                            mesh_size: int) -> int:
  """Analytic operand bytes of one device per forward: L * 2 (K and V) * B * Tl *
  bytes/token, times the sends per block (P - 1 for a ring, whose every
  ``ppermute`` step forwards one block; the bytes reaching a device are those
  of the all-gather either way, see ``latency.wire_bytes``)."""
  if mesh_size == 1:
    return 0
  return (layers * 2 * batch * tokens_per_device * exchange.bytes_per_token(kv_dim, dtype)
          * exchange.sends(mesh_size))


def exchange_summary(forward: Callable[..., Any], example_args: tuple, exchange, *,
                     width: int, layers: int, tokens: int, mesh_size: int,
                     extra_formula_bytes: int = 0) -> dict[str, Any]:
  """The exchange fields every evaluation reports, for one example per forward.

  ``bytes_per_device`` is read from the compiled ``forward(*example_args)``;
  ``bytes_per_device_formula`` is the K/V exchange of every layer plus
  ``extra_formula_bytes`` (e.g. ViT's logits averaged over devices).
  """
  report = compiled_traffic(forward, *example_args)
  formula = sequence_parallel_bytes(exchange, layers=layers, batch=1,
                                    tokens_per_device=tokens // mesh_size, kv_dim=width,
                                    dtype=jnp.float32, mesh_size=mesh_size)
  return {
      "parallelism": "sequence", "strategy": exchange.name,
      "exchange": exchange.name, "mesh": mesh_size,
      "groups": getattr(exchange, "groups", None),
      "codebook_size": getattr(exchange, "codebook_size", None),
      "bits_per_token": 8 * exchange.bytes_per_token(width, jnp.float32),
      "bytes_per_device": report.bytes_per_device,
      "bytes_received_per_device": received_bytes(report, mesh_size),
      "bytes_per_device_formula": formula + (extra_formula_bytes if mesh_size > 1 else 0),
  }


def tensor_parallel_bytes(sync, *, layers: int, values: int, mesh_size: int) -> int:
  """Analytic bytes one device hands to collectives per forward under tensor
  parallelism: one all-reduce of ``values`` (B x T x D) numbers at every sync
  point the strategy keeps (2 per block; SPD drops some)."""
  if mesh_size == 1:
    return 0
  points = sum(not sync.defers(layer, where) for layer in range(layers)
               for where in ("attn", "mlp"))
  return points * sync.all_reduce_bytes(values, mesh_size)


def tensor_summary(forward: Callable[..., Any], example_args: tuple, sync, *,
                   layers: int, values: int, mesh_size: int) -> dict[str, Any]:
  """``exchange_summary``'s counterpart for a tensor-parallel forward:
  ``values`` is what one all-reduce sums for one example (tokens x width)."""
  report = compiled_traffic(forward, *example_args)
  return {
      "parallelism": "tensor", "strategy": sync.name, "mesh": mesh_size,
      "sync": {"name": sync.name, **{f.name: getattr(sync, f.name)
                                     for f in dataclasses.fields(sync)}},
      "bytes_per_device": report.bytes_per_device,
      "bytes_received_per_device": received_bytes(report, mesh_size),
      "bytes_per_device_formula": tensor_parallel_bytes(sync, layers=layers, values=values,
                                                        mesh_size=mesh_size),
      "collectives": report.by_kind(),
  }
