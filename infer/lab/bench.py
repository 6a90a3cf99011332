"""Prefill latency for models x devices x bandwidths x strategies: HLO bytes + a latency model.

  python -m infer.lab.bench                       # the full matrix, into results/bench/
  python -m infer.lab.bench --tiny --out /tmp/b   # CI: tiny models, a few points, seconds
  python -m infer.lab.bench --models vit-b16 --mesh 1 4 --bandwidths 10 \\
      --exchanges exact vq:groups=32 --profiles gtx1660ti

Bytes per device come from the compiled program of each (model, P, exchange)
(``astra_jax.netsim.workloads.traffic``, cached); compute from a device profile's
roofline (``astra_jax.netsim.devices``) or, for profile ``measured`` (``--measure``
adds it for the tiny models), timed on this host; ``astra_jax.netsim.latency``
combines them.  Strategies are spec strings: a K/V exchange of sequence
parallelism (``astra_jax.core.exchange.available()``: ``exact``, ``ring``,
``vq:groups=32``, ``vq:groups=1,codebook_size=256``; ``overlap=true`` on exact or vq
hides up to the local block's attention time of each layer under its transfer,
``astra_jax.netsim.latency``) or a tensor-parallel sync
(``astra_jax.core.sync.available()``: ``tp``, ``spd:drop=all``,
``flash:bits=4,group_size=128``).  Writes bench.json (every row), bench.md
(tables and the comparison with the ASTRA paper) and PNG plots to --out; the
last stdout line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from astra_jax.run import cli
from infer import lab

FULL = dict(models=["vit-b16", "gpt2-small", "gpt2-medium", "vit-mu7", "gpt2-micro"],
            mesh=[1, 2, 4, 8], bandwidths=[10, 20, 50, 100, 500, 1000],
            exchanges=["exact", "vq:groups=32", "vq:groups=1", "ring", "tp", "spd:drop=all",
                       "flash:bits=4,group_size=128", "flash:bits=8,group_size=128"],
            profiles=["gtx1660ti", "orin-nano", "rpi5", "h100"])
TINY = dict(models=["vit-mu7", "gpt2-micro"], mesh=[1, 4], bandwidths=[10, 1000],
            exchanges=["exact", "vq:groups=32"], profiles=["gtx1660ti"])
MEASURED = "measured"


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0], out="folder")
  p.add_argument("--tiny", action="store_true", help="the small CI configuration (defaults "
                 "below become " + ", ".join(f"{k}={v}" for k, v in TINY.items()) + ")")
  p.add_argument("--models", nargs="+", help=f"default {FULL['models']}")
  p.add_argument("--mesh", nargs="+", type=cli.at_least(1),
                 help=f"devices P, default {FULL['mesh']}")
  p.add_argument("--bandwidths", nargs="+", type=cli.positive,
                 help=f"Mbit/s, default {FULL['bandwidths']}")
  p.add_argument("--trace", default=None,
                 help="also a dynamic network: SECONDS:MBITS pairs, e.g. '0:100,0.2:10,1:50'")
  p.add_argument("--strategies", "--exchanges", dest="exchanges", nargs="+",
                 help="K/V exchange specs (sequence parallel: exact, ring, vq:groups=32) and "
                 "tensor-parallel syncs (tp, spd:drop=all, flash:bits=4,group_size=128), "
                 f"default {FULL['exchanges']}")
  p.add_argument("--profiles", nargs="+", help=f"device profiles (see astra_jax.netsim.devices, "
                 f"'host', '{MEASURED}'), default {FULL['profiles']}")
  p.add_argument("--measure", action="store_true",
                 help=f"add profile '{MEASURED}' (timed on this host) for the tiny models")
  p.add_argument("--host-profile", default=os.path.join("results", "host_profile.json"),
                 help="file written by python -m infer.lab.profile_host")
  p.add_argument("--topology", nargs="+", default=["switched"],
                 help="switched (full duplex, default) and/or shared (one medium)")
  p.add_argument("--latency-ms", type=cli.nonnegative, default=1.0,
                 help="fixed latency per collective message, ms")
  p.add_argument("--efficiency", type=cli.positive, default=1.0,
                 help="fraction of a profile's peak FLOP/s reached (roofline)")
  p.add_argument("--link-efficiency", type=link_efficiency, default=(), metavar="KIND=E,...",
                 help="fraction of the bandwidth each collective kind reaches, e.g. "
                      "all-gather=0.6,all-reduce=0.85 (measured by infer.lab.collective_time; "
                      "default 1 for every kind)")
  p.add_argument("--repeats", type=cli.at_least(1), default=5, help="timed runs per measurement")
  p.add_argument("--out", default=os.path.join(lab.OUT, "bench"),
                 help="output folder (default %(default)s; BENCHMARKS.md names results/ folders)")
  args = p.parse_args(argv)
  for key, value in (TINY if args.tiny else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, list(value))
  return args


def link_efficiency(text: str) -> tuple[tuple[str, float], ...]:
  """'all-gather=0.6,all-reduce=0.85' -> (('all-gather', 0.6), ('all-reduce', 0.85))."""
  import argparse
  pairs = []
  for item in filter(None, text.split(",")):
    kind, eq, value = item.partition("=")
    try:
      eff = float(value)
    except ValueError:
      eff = None
    if not eq or eff is None or not 0 < eff <= 1:
      raise argparse.ArgumentTypeError(
          f"expected KIND=E with E in (0, 1], e.g. all-gather=0.6,all-reduce=0.85; got {item!r}")
    pairs.append((kind.strip(), eff))
  return tuple(pairs)


def validate(args) -> None:
  """Checks that need no JAX; ValueError naming the fix."""
  from astra_jax.netsim import devices, latency, workloads
  for name in args.models:
    workloads.get(name)
  for name in args.profiles:
    if name != MEASURED:
      devices.get(name, args.host_profile)
  if any(p < 1 for p in args.mesh):
    raise ValueError(f"--mesh sizes must be >= 1, got {args.mesh}")
  if any(not b > 0 for b in args.bandwidths):
    raise ValueError(f"--bandwidths must be positive (Mbit/s), got {args.bandwidths}")
  for topology in args.topology:
    latency.check_topology(topology)
  if args.trace:
    latency.Trace.parse(args.trace)
  if args.latency_ms < 0 or not 0 < args.efficiency <= 1 or args.repeats < 1:
    raise ValueError("--latency-ms must be >= 0, --efficiency in (0, 1], --repeats >= 1")
  for topology in args.topology:  # unknown kinds named with the fix
    latency.Network(latency.Trace.constant(1.0), topology, link_efficiency=args.link_efficiency)


@dataclasses.dataclass(frozen=True)
class Point:
  """One device's compute seconds: per layer, embedding, head."""

  layer_s: float
  embed_s: float
  head_s: float


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.ensure_cpu_devices(max(args.mesh))  # before validate, which starts jax
  try:
    validate(args)
  except ValueError as e:
    cli.fail(str(e))
  try:
    rows, paper, skipped = run(args)
  except ValueError as e:
    cli.fail(str(e))
  from infer.lab import bench_report
  files = bench_report.write(args.out, rows, paper, command=_command(argv), skipped=skipped)
  if paper:
    print(bench_report.paper_text(paper))
  cli.print_result({"out": args.out, "rows": len(rows), "files": files, "paper": paper})


def _command(argv) -> str:
  return " ".join(["python -m infer.lab.bench", *(sys.argv[1:] if argv is None else argv)])


def run(args):
  """Every row of the matrix, and the paper-comparison numbers (or None)."""
  import tqdm
  from astra_jax.netsim import devices, flops, latency, pipeline, workloads
  from astra_jax.core import exchange
  from astra_jax.parallel import mesh as mesh_lib

  models = [workloads.get(m) for m in args.models]
  exchanges = {spec: workloads.parse_strategy(spec) for spec in args.exchanges}
  # exact SP is every row's baseline, run even when not asked for
  exact_spec = next((s for s, e in exchanges.items() if e.name == "exact" and not e.overlap),
                    "exact")
  exchanges_all = {exact_spec: exchange.from_spec(exact_spec), **exchanges}
  for w in models:
    for p in args.mesh:
      mesh_lib.check_divisible(w.tokens, p, what=f"{w.name} token")
    for spec, ex in exchanges_all.items():
      if workloads.is_tensor(ex):
        continue  # checked per mesh size below
      try:
        ex.bytes_per_token(w.shape.width, "float32")
      except ValueError as e:
        raise ValueError(f"exchange {spec!r} does not fit {w.name}: {e}") from None
  # tensor parallelism splits heads: a model runs it only on device counts that divide them
  skipped = {}
  for w in models:
    for p in args.mesh:
      for spec, ex in exchanges.items():
        if ex.name == "stream" and w.family == "vit":
          skipped[w.name, p, spec] = ("the stream exchange is for causal models (a ViT's "
                                      "tokens attend both ways); use vq or exact")
        elif workloads.is_tensor(ex):
          try:
            workloads.costs(w, p, ex)
          except ValueError as e:
            skipped[w.name, p, spec] = str(e)

  profiles = {name: devices.get(name, args.host_profile)
              for name in args.profiles if name != MEASURED}
  measured_models = [w for w in models if w.tiny] if args.measure else []
  if MEASURED in args.profiles:
    measured_models = models
  meshes = sorted(set(args.mesh) | {1})

  # the expensive part: compile (and time) each (model, P, exchange) once
  tasks = [("traffic", w, p, spec) for w in models for p in meshes if p > 1
           for spec in exchanges_all if (w.name, p, spec) not in skipped]
  tasks += [("measure", w, p, spec) for w in measured_models for p in meshes
            for spec in exchanges_all if (p > 1 or spec == exact_spec)
            and (w.name, p, spec) not in skipped]
  traffic, timed = {}, {}
  bar = tqdm.tqdm(tasks, desc="compile/measure", unit="program", file=sys.stderr)
  for kind, w, p, spec in bar:
    bar.set_postfix_str(f"{w.name} P={p} {spec}")
    if kind == "traffic":
      traffic[w.name, p, spec] = workloads.traffic(w, exchanges_all[spec], p)
    else:
      layer_s, extra_s = workloads.measure(w, exchanges_all[spec], p, args.repeats)
      timed[w.name, p, spec] = Point(layer_s, extra_s, 0.0)

  def point(w, source, p, spec) -> Point:
    if source == MEASURED:
      return timed[w.name, p, spec if p > 1 else exact_spec]
    prof = profiles[source]
    layer, embed, head = workloads.costs(w, p, exchanges_all[spec])
    secs = [latency.roofline_seconds(c, prof.peak_flops, prof.mem_bandwidth, args.efficiency)
            for c in (layer, embed, head)]
    return Point(*secs)

  networks = [(b, latency.Trace.constant(b)) for b in args.bandwidths]
  if args.trace:
    networks.append((None, latency.Trace.parse(args.trace)))

  def overlap_s(w, p, spec, layer_s) -> float:
    """The part of a layer's compute an overlapped exchange runs while its K/V
    travel: the local block's share of the layer's FLOPs (0 without overlap)."""
    ex = exchanges_all[spec]
    if p == 1 or not getattr(ex, "overlap", False):
      return 0.0
    layer = workloads.costs(w, p, ex)[0]
    return layer_s * flops.local_attention_cost(w.shape, p).flops / layer.flops

  def latency_of(w, source, p, spec, trace, topology):
    pt = point(w, source, p, spec)
    tr = traffic.get((w.name, p, spec), workloads.LayerTraffic((), ()))
    net = latency.Network(trace, topology, args.latency_ms / 1e3, args.link_efficiency)
    if exchanges_all[spec].name == "stream":  # forward only, no barrier: the pipelined schedule
      return pipeline.streaming_latency(
          layers=w.layers, layer_compute_s=pt.layer_s, layer_transfers=tr.per_layer,
          mesh_size=p, network=net, embed_s=pt.embed_s, head_s=pt.head_s), tr
    return latency.prefill_latency(
        layers=w.layers, layer_compute_s=pt.layer_s, layer_transfers=tr.per_layer,
        mesh_size=p, network=net, embed_s=pt.embed_s, head_s=pt.head_s,
        final_transfers=tr.final, layer_overlap_s=overlap_s(w, p, spec, pt.layer_s)), tr

  def row(w, source, p, spec, mbps, trace, topology):
    single, _ = latency_of(w, source, 1, exact_spec, trace, topology)
    exact, _ = latency_of(w, source, p, exact_spec, trace, topology)
    lat, tr = latency_of(w, source, p, spec, trace, topology)
    overlapped = getattr(exchanges_all[spec], "overlap", False)
    pt = point(w, source, p, spec)
    # the model's inputs, so a reader can recompute the row with other link
    # parameters (infer.lab.model_check does, with measured link efficiencies)
    inputs = {"layer_compute_s": pt.layer_s, "embed_s": pt.embed_s, "head_s": pt.head_s,
              "layer_overlap_s": overlap_s(w, p, spec, pt.layer_s),
              "message_latency_s": args.latency_ms / 1e3,
              "transfers": {part: [[t.kind, t.count, t.operand_bytes] for t in getattr(tr, part)]
                            for part in ("per_layer", "final")}}
    return {
        "model": w.name, "tokens": w.tokens, "layers": w.layers, "profile": source,
        "compute": "measured" if source == MEASURED else "roofline",
        "topology": topology, "mesh": p, "bandwidth_mbps": mbps,
        "bandwidth": f"{mbps:g}" if mbps else trace.label(), "exchange": spec,
        "parallelism": "tensor" if workloads.is_tensor(exchanges_all[spec]) else "sequence",
        "bytes_per_device": tr.total_bytes(w.layers),
        "bytes_per_device_per_layer": tr.layer_bytes,
        "collectives_per_layer": sum(t.count for t in tr.per_layer),
        **{k: float(f"{v:.6g}") for k, v in (
            ("compute_s", lat.compute_s), ("comm_s", lat.comm_s),
            ("latency_s", lat.total_s), ("single_device_s", single.total_s),
            ("exact_sp_s", exact.total_s),
            ("speedup_vs_single", single.total_s / lat.total_s),
            ("speedup_vs_exact", exact.total_s / lat.total_s))},
        # overlapped exchanges only: communication hidden under the local attention
        **({"comm_hidden_s": float(f"{lat.hidden_s:.6g}")} if overlapped else {}),
        "model_inputs": inputs,
    }

  rows = []
  sources = [*profiles] + ([MEASURED] if measured_models else [])
  for w in models:
    for source in sources:
      if source == MEASURED and w not in measured_models:
        continue
      for topology in args.topology:
        for mbps, trace in networks:
          for p in args.mesh:
            for spec in exchanges:
              if (w.name, p, spec) not in skipped:
                rows.append(row(w, source, p, spec, mbps, trace, topology))

  def paper_accounting(w, source, spec, mbps):
    """The paper's accounting: communication = the bits a device sends /
    bandwidth (no per-message cost, no topology), added to the same compute."""
    p, trace = PAPER["mesh"], latency.Trace.constant(mbps)
    def total(s):
      lat, tr = latency_of(w, source, p, s, trace, "switched")
      comm = 8 * tr.total_bytes(w.layers) / (mbps * 1e6)
      return lat.compute_s + comm, comm
    single, _ = latency_of(w, source, 1, exact_spec, trace, "switched")
    (astra_s, comm), (exact_s, _) = total(spec), total(exact_spec)
    return {k: float(f"{v:.6g}") for k, v in (
        ("comm_s", comm), ("latency_s", astra_s), ("exact_sp_s", exact_s),
        ("speedup_vs_single", single.total_s / astra_s),
        ("speedup_vs_exact", exact_s / astra_s))}

  # the ASTRA paper's operating point (G=1: the only setting whose byte ratio allows
  # its 171.8x over exact SP; G=32 beside it) in two accountings: ours (the
  # matrix's switched network, per-message latency) and the paper's (outgoing
  # bits / bandwidth, nothing per message), on its GPU's spec-sheet profile and
  # on any measured one in the run ('host': this machine's measured FLOP/s)
  astra = {e.groups: s for s, e in exchanges.items() if e.name == "vq"
           and e.groups in (1, 32) and e.codebook_size == 1024 and not e.overlap}
  paper = None
  if PAPER["model"] in args.models and PAPER["mesh"] in args.mesh and astra:
    profiles.setdefault(PAPER["profile"], devices.get(PAPER["profile"]))
    w, mbps = workloads.get(PAPER["model"]), PAPER["bandwidth_mbps"]
    trace = latency.Trace.constant(mbps)
    on = [PAPER["profile"]] + [name for name in profiles if name == "host"]
    compared = []
    for source in on:
      for groups in sorted(astra):
        r = row(w, source, PAPER["mesh"], astra[groups], mbps, trace, "switched")
        compared.append(dict(r, accounting="ours"))
        compared.append(dict(r, accounting="paper", **paper_accounting(w, source,
                                                                        astra[groups], mbps)))
    paper = {
        "setting": {k: PAPER[k] for k in ("profile", "model", "mesh", "bandwidth_mbps")},
        "paper": {k: PAPER[k] for k in ("speedup_vs_single", "speedup_vs_exact")},
        "latency_ms_per_message": args.latency_ms, "efficiency": args.efficiency,
        "rows": compared}
  return rows, paper, [{"model": m, "mesh": p, "strategy": s, "why": why}
                       for (m, p, s), why in skipped.items()]


# ASTRA (arXiv 2505.19342): GTX 1660 Ti, 4 devices, ViT-B/16 1024 tokens, 10 Mbit/s; the
# speedups are labelled G=1 (76.8x, G=32's byte ratio over float32, is below 171.8x)
PAPER = {"profile": "gtx1660ti", "model": "vit-b16", "mesh": 4, "bandwidth_mbps": 10.0,
         "speedup_vs_single": 2.64, "speedup_vs_exact": 171.8}


if __name__ == "__main__":
  cli.entry(main)
