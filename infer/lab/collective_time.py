"""Measured time of one kind of collective, alone: the link rate it really reaches.

  python -m infer.lab.testbed --procs 2 --rate 10 -- infer.lab.collective_time --kind all-gather \\
      --bytes 1048576 --count 6 --mesh 2
  python -m infer.lab.collective_time --kind all-reduce --bytes 65536 --mesh 2   # fake CPU devices

Compiles one program of ``--count`` chained collectives of ``--kind``
(all-gather, all-reduce, all-to-all or collective-permute around the ring), each handing
``--bytes`` of float32 per device to the collective (its operand, as
``astra_jax.netsim.traffic`` counts it), with nothing else in it; runs it
``--warmup`` times, then times ``--repeats`` runs (every process starting
each after a barrier; a repeat's time is the slowest process's).  The bytes a
device receives per collective follow the latency model's ``switched``
topology (``astra_jax.netsim.latency.wire_bytes``), so

  achieved_mbit = count x wire_bytes x 8 / latency_s / 1e6

is the rate this kind of collective reaches over the link, message latency
included.  ``infer.lab.model_check --measure`` runs it on the shaped testbed for
every kind the strategies use and gives the latency model the ratio to the
link's rate (``--link-efficiency`` of ``infer.lab.bench``): a calibration from a
measurement of the collectives themselves, not of the forwards it predicts.

``--gap-s S`` runs the ``--count`` collectives as that many calls of a
one-collective program instead, each after S seconds of idling (every process
alike), and times only the calls: a link idles between a forward's layers
while the ranks compute, and a tbf bucket refills then, so this measures what
a layer's exchange gets after a compute-long pause (the latency model's
``burst_bytes`` credit); back to back, only the first collective gets it.

  python -m infer.lab.testbed --procs 2 --rate 10 -- infer.lab.collective_time --kind all-gather \\
      --bytes 40960 --count 12 --mesh 2 --gap-s 0.1

The last line is one JSON object: kind, bytes, count, mesh, processes,
latency_s (median), latencies_s, wire_bytes (per collective), achieved_mbit,
gap_s, calls (programs run per repeat: 1, or ``--count`` with a gap),
hlo_collectives (what the compiled program holds, to show the count is real).
"""

from __future__ import annotations

import statistics
import sys
import time

from astra_jax.run import cli
from astra_jax.parallel import distributed

KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute")


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--kind", choices=KINDS, default="all-gather")
  p.add_argument("--bytes", type=cli.at_least(4), default=1 << 20,
                 help="operand bytes per device of each collective (float32, rounded down to 4)")
  p.add_argument("--count", type=cli.at_least(1), default=6, help="chained collectives per run")
  p.add_argument("--mesh", type=cli.at_least(2), default=2, help="devices taking part")
  p.add_argument("--repeats", type=cli.at_least(1), default=5, help="timed runs")
  p.add_argument("--warmup", type=cli.at_least(0), default=1, help="untimed runs after compiling")
  p.add_argument("--gap-s", type=cli.nonnegative, default=0.0,
                 help="seconds of idling before each collective, run one per call "
                      "(default 0: all chained in one program)")
  p.add_argument("--out", default=None, help="also write the JSON result here")
  distributed.add_flags(p)
  return p.parse_args(argv)


def program(kind: str, count: int, axis: str):
  """The per-device body: ``count`` collectives of ``kind``, each fed by the last."""
  import jax

  def body(x):
    n = x.shape[0]
    for _ in range(count):
      if kind == "all-gather":
        both = jax.lax.all_gather(x, axis, tiled=True)
        # the next operand depends on every block received, so nothing is skipped
        x = both.reshape(-1, n).sum(0) * 0.5
      elif kind == "all-reduce":
        x = jax.lax.psum(x, axis) * 0.5
      elif kind == "all-to-all":
        x = jax.lax.all_to_all(x, axis, 0, 0, tiled=True) * 0.5
      else:
        size = jax.lax.axis_size(axis)
        x = jax.lax.ppermute(x, axis, [(j, (j + 1) % size) for j in range(size)]) * 0.5
    return x

  return body


def measure(args) -> dict:
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec
  from astra_jax.netsim import latency, traffic
  from astra_jax.parallel import mesh as mesh_lib
  from infer.lab.prefill_time import barrier, slowest

  mesh = mesh_lib.make_seq_mesh(args.mesh)
  axis = mesh.axis_names[0]
  n = args.bytes // 4
  calls = args.count if args.gap_s > 0 else 1
  fn = jax.jit(jax.shard_map(program(args.kind, args.count // calls, axis), mesh=mesh,
                             in_specs=PartitionSpec(axis), out_specs=PartitionSpec(axis)))
  x = mesh_lib.to_global(np.ones((args.mesh * n,), np.float32), mesh, 0)
  compiled = fn.lower(x).compile()
  report = traffic.hlo_traffic(compiled.as_text())

  def run() -> float:
    """Seconds in the collective calls of one run, the idle gaps left out."""
    spent = 0.0
    for _ in range(calls):
      if args.gap_s:
        time.sleep(args.gap_s)
      start = time.perf_counter()
      jax.block_until_ready(compiled(x))
      spent += time.perf_counter() - start
    return spent

  for i in range(args.warmup):
    barrier(f"warmup {i}")
    run()
  times = []
  for i in range(args.repeats):
    barrier(f"repeat {i}")
    times.append(run())
  times = slowest(times)
  seconds = statistics.median(times)
  wire = latency.wire_bytes(args.kind, n * 4, args.mesh, "switched")
  return {"kind": args.kind, "bytes": n * 4, "count": args.count, "mesh": args.mesh,
          "processes": jax.process_count(), "latency_s": seconds, "latencies_s": times,
          "wire_bytes": wire, "achieved_mbit": args.count * wire * 8 / seconds / 1e6,
          "gap_s": args.gap_s, "calls": calls,
          "hlo_collectives": report.by_kind()}


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.setup_devices(args)
  try:
    result = measure(args)
  except ValueError as e:
    cli.fail(str(e))
  print(f"{args.count} x {args.kind} of {result['bytes']:,} bytes/device over {args.mesh} "
        f"devices: {result['latency_s']:.3f} s (median of {args.repeats}), "
        f"{result['achieved_mbit']:.2f} Mbit/s", flush=True)
  cli.print_result(result, args.out)


if __name__ == "__main__":
  cli.entry(main)
