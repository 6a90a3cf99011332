"""Measure this machine's float32 matmul FLOP/s and memory bandwidth (the 'host' profile).

  python -m infer.lab.profile_host [--out results/host_profile.json]

FLOP/s: a jitted N x N float32 matmul (2 N^3 FLOPs), median of ``--repeats``
runs after a warm-up.  Memory bandwidth: a jitted, buffer-donating ``x * 2``
over a buffer much larger than the caches (read + write = 2 x its bytes),
median likewise.
Both are what XLA:CPU reaches on all cores of this machine, so they change
with other load on it.  The last line is one JSON object (also written to --out).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time

from astra_jax.run import cli
from infer import lab


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(lab.OUT, "host_profile.json"),
                 help="default %(default)s; the bench reads results/host_profile.json "
                      "unless given --host-profile")
  p.add_argument("--matmul-size", type=cli.at_least(1), default=2048)
  p.add_argument("--buffer-mib", type=cli.at_least(1), default=256,
                 help="size of the bandwidth buffer")
  p.add_argument("--repeats", type=cli.at_least(1), default=5)
  return p.parse_args(argv)


def _median_seconds(fn, arg, repeats):
  """Median time of ``arg = fn(arg)`` (chained, so a donated buffer is reused)."""
  arg = fn(arg).block_until_ready()  # compile + warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    arg = fn(arg).block_until_ready()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.matmul_size < 64 or args.buffer_mib < 1 or args.repeats < 1:
    cli.fail("--matmul-size must be >= 64, --buffer-mib >= 1 and --repeats >= 1")
  import jax
  import jax.numpy as jnp

  n = args.matmul_size
  a = jnp.ones((n, n), jnp.float32)
  # ones @ ones / n stays ones when chained (no overflow to inf)
  matmul = jax.jit(lambda x: jnp.dot(x, x, precision=jax.lax.Precision.HIGHEST) / n)
  flops = 2 * n ** 3 / _median_seconds(matmul, a, args.repeats)
  buf = jnp.ones((args.buffer_mib * 2 ** 20 // 4,), jnp.float32)
  # donated: the output reuses the input's pages, so no page faults are timed
  scale = jax.jit(lambda x: x * 2.0, donate_argnums=0)
  nbytes = buf.nbytes
  bandwidth = 2 * nbytes / _median_seconds(scale, buf, args.repeats)
  cpu = _cpu_name()
  cores = os.cpu_count()
  day = datetime.date.today().isoformat()
  print(f"{cpu}, {cores} cores: {flops / 1e9:.1f} GFLOP/s float32 matmul, "
        f"{bandwidth / 1e9:.1f} GB/s memory")
  cli.print_result({
      "name": "host", "description": f"this machine: {cpu}, {cores} cores (XLA:CPU)",
      "peak_flops": flops, "mem_bandwidth": bandwidth, "precision": "fp32",
      "source": f"measured by python -m infer.lab.profile_host on {day}: {n}x{n} float32 "
                f"matmul and a {args.buffer_mib} MiB x*2 pass, median of {args.repeats}, "
                f"jax {jax.__version__}",
      "cpu": cpu, "cores": cores,
  }, args.out)


if __name__ == "__main__":
  cli.entry(main)
