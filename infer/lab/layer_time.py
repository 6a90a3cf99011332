"""One layer at a big model's true dimensions, timed on this host, scaled to the model.

  python -m infer.lab.layer_time                       # Llama 3.1 8B shape, 1024 tokens, P=4
  python -m infer.lab.layer_time --dtype bfloat16 --exchanges vq:groups=1 --repeats 2

Times one Transformer block (random weights, batch 1) for the whole prompt on
one device, and for one device's share on a mesh of ``--mesh`` fake CPU
devices with each exchange (the devices share this host's cores; the time is
divided by P).  The latency model (``astra_jax.netsim.latency``) then scales the
layer to the model's layer count and adds the exchange's bytes per layer,
read from the compiled program of a 1- and 2-layer slice of the real model
(``workloads.traffic``), at each bandwidth.  Two compute sources are
reported: this host (measured) and the GTX 1660 Ti profile (roofline of the
analytic FLOPs, ``astra_jax.netsim.flops``), beside ASTRA's Table 7 (Llama-3-8B,
4 devices, GTX 1660 Ti).  Also reports this process's peak memory.
Writes ``--out`` .json and .md.
"""

from __future__ import annotations

import json
import os
import sys

from astra_jax.run import cli
from infer import lab

# ASTRA Table 7: Llama-3-8B prefill, 4 devices; single device and G=1 by bandwidth
PAPER = {"single_device_s": 4.578,
         "astra_g1_s": {10: 1.563, 20: 1.549, 50: 1.547, 100: 1.545, 500: 1.540}}


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama3-8b", help="a workload of astra_jax.netsim.workloads")
  p.add_argument("--mesh", type=cli.at_least(1), default=4)
  p.add_argument("--exchanges", nargs="+", default=["vq:groups=1", "vq:groups=32", "exact"])
  p.add_argument("--bandwidths", nargs="+", type=cli.positive, default=[10, 20, 50, 100, 500])
  p.add_argument("--profile", default="gtx1660ti")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=cli.at_least(1), default=3)
  p.add_argument("--latency-ms", type=cli.nonnegative, default=1.0,
                 help="per-collective latency alpha")
  p.add_argument("--out", default=os.path.join(lab.OUT, "llama8b_layer"),
                 help="writes OUT.json and OUT.md (default %(default)s)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.ensure_cpu_devices(args.mesh)
  from astra_jax.netsim import devices, latency, workloads
  from astra_jax.core import exchange

  try:
    w = workloads.get(args.model)
    exchanges = {spec: exchange.from_spec(spec) for spec in args.exchanges}
    profile = devices.get(args.profile)
    if any(b <= 0 for b in args.bandwidths):
      raise ValueError("--bandwidths must be positive (Mbit/s)")
  except ValueError as e:
    cli.fail(str(e))
  print(f"{w.description}: timing one layer ({args.dtype}) on this host", flush=True)
  single_layer = workloads.measure_layer(w, exchange.make_exchange("exact"), 1, args.repeats,
                                         args.dtype)
  print(f"  one device, whole prompt: {single_layer:.3f} s/layer", flush=True)
  share, traffic = {}, {}
  for spec, ex in exchanges.items():
    share[spec] = workloads.measure_layer(w, ex, args.mesh, args.repeats, args.dtype)
    traffic[spec] = workloads.traffic(w, ex, args.mesh)
    print(f"  {spec}: {share[spec]:.3f} s/layer per device, "
          f"{traffic[spec].layer_bytes:,} B/layer/device", flush=True)
  peak = workloads.peak_memory_bytes()

  layer_cost = {spec: workloads.costs(w, args.mesh, ex)[0] for spec, ex in exchanges.items()}
  single_cost = workloads.costs(w, 1)[0]
  roof = lambda c: latency.roofline_seconds(c, profile.peak_flops, profile.mem_bandwidth)
  rows = []
  for source, one, per in (
      ("host (measured)", single_layer, share),
      (f"{profile.name} (roofline)", roof(single_cost),
       {spec: roof(c) for spec, c in layer_cost.items()})):
    single_s = w.layers * one
    for spec in exchanges:
      for mbps in args.bandwidths:
        net = latency.Network(latency.Trace.constant(mbps), latency.DEFAULT_TOPOLOGY,
                              args.latency_ms / 1e3)
        lat = latency.prefill_latency(layers=w.layers, layer_compute_s=per[spec],
                                      layer_transfers=traffic[spec].per_layer,
                                      mesh_size=args.mesh, network=net)
        rows.append({"compute": source, "exchange": spec, "bandwidth_mbps": mbps,
                     "single_device_s": single_s, "latency_s": lat.total_s,
                     "compute_s": lat.compute_s, "comm_s": lat.comm_s,
                     "speedup": single_s / lat.total_s,
                     "bytes_per_device": traffic[spec].total_bytes(w.layers)})
  result = {"command": "python -m infer.lab.layer_time " + " ".join(sys.argv[1:]),
            "model": w.name, "tokens": w.tokens, "layers": w.layers, "mesh": args.mesh,
            "dtype": args.dtype, "single_layer_s": single_layer, "share_layer_s": share,
            "peak_memory_bytes": peak, "paper": PAPER, "rows": rows}
  md = markdown(result)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(md + "\n")
  print(md)
  cli.print_result({"out": args.out, "single_layer_s": single_layer,
                    "peak_memory_gib": peak / 2**30})


def markdown(r: dict) -> str:
  lines = [f"One {r['model']} layer ({r['dtype']}, {r['tokens']} tokens) on this host: "
           f"{r['single_layer_s']:.3f} s on one device; peak memory "
           f"{r['peak_memory_bytes'] / 2**30:.2f} GiB.", "",
           "| compute | exchange | Mbit/s | one device s | P=%d s (compute + comm) | speedup | "
           "paper (1660 Ti, G=1) s |" % r["mesh"], "|---|---|---|---|---|---|---|"]
  for row in r["rows"]:
    paper = r["paper"]["astra_g1_s"].get(int(row["bandwidth_mbps"]))
    paper = f"{paper:.3f} (one device {r['paper']['single_device_s']})" \
        if paper and row["exchange"] == "vq:groups=1" else "-"
    lines.append(f"| {row['compute']} | {row['exchange']} | {row['bandwidth_mbps']:g} | "
                 f"{row['single_device_s']:.3f} | {row['latency_s']:.3f} "
                 f"({row['compute_s']:.3f} + {row['comm_s']:.3f}) | {row['speedup']:.2f}x | "
                 f"{paper} |")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.entry(main)
