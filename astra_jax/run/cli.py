"""Plumbing shared by the command-line tools (imports no JAX at module load).

``ensure_cpu_devices`` must run before jax is imported: XLA's CPU backend fixes
its device count when it starts.  The CLIs call it from their ``--mesh`` flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def ensure_cpu_devices(n: int) -> None:
  """Asks XLA:CPU for at least ``n`` fake devices (a no-op once jax is imported)."""
  if "jax" in sys.modules:
    return
  have = int(os.environ.get("JAX_NUM_CPU_DEVICES", "1") or 1)
  os.environ["JAX_NUM_CPU_DEVICES"] = str(max(have, n))


def setup_devices(args: argparse.Namespace) -> None:
  """Before jax starts: this process's devices for ``--mesh``, joining the
  ``jax.distributed`` process group when the multi-process flags ask for it."""
  from astra_jax.parallel import distributed
  if not distributed.requested(args):
    ensure_cpu_devices(args.mesh)
    return
  try:
    distributed.initialize(args, args.mesh)
  except ValueError as e:
    fail(str(e))


def train_args(argv, *, description: str, config: str, workdir: str, extra=None):
  """The train CLIs' flags (``extra(parser)`` adds more); returns (args, overrides).

  The overrides are the remaining ``--config.KEY=VAL`` arguments.
  """
  p = argparse.ArgumentParser(description=description)
  if extra:
    extra(p)
  p.add_argument("--config", default=config, help="a module in configs/ with get_config()")
  p.add_argument("--mesh", type=int, default=4, help="devices on the seq axis")
  p.add_argument("--workdir", default=workdir)
  p.add_argument("--init-from", default=None, help="run folder whose weights to start from")
  p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
  from astra_jax.parallel import distributed
  distributed.add_flags(p)
  return p.parse_known_args(argv)


def add_exchange_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("exchange (how K/V cross devices)")
  g.add_argument("--exchange", default="exact", help="strategy name: exact | vq | ring")
  g.add_argument("--groups", type=int, default=32, help="vq: groups G per K/V vector")
  g.add_argument("--codebook-size", type=int, default=1024, help="vq: entries K per codebook")


def add_link_flags(parser: argparse.ArgumentParser) -> None:
  """The flags every evaluation CLI shares: simulated link loss, tensor-parallel
  baselines and multi-process."""
  from astra_jax.parallel import distributed
  add_tp_flag(parser)
  parser.add_argument("--drop-rate", type=float, default=0.0,
                      help="simulated link loss: fraction of non-local tokens' K/V (codes) "
                           "lost per exchange, masked out of attention")
  distributed.add_flags(parser)


def add_tp_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--tp", default=None, metavar="SYNC",
                      help="tensor-parallel baseline instead of sequence parallelism: the "
                           "weights split over --mesh devices, all-reduces done as SYNC: tp "
                           "(exact), spd:drop=1+3 (Sync-Point Drop), flash:bits=4,group_size=128 "
                           "(Flash Communication)")


def sync_from_flags(args: argparse.Namespace):
  """The ``--tp`` strategy, or None for sequence parallelism; ValueError on bad combos."""
  if args.tp is None:
    return None
  from astra_jax.core import sync
  if getattr(args, "exchange", None) not in (None, "exact"):
    raise ValueError(f"--tp runs tensor parallelism, which exchanges no K/V; drop "
                     f"--exchange {args.exchange}")
  if getattr(args, "drop_rate", 0.0):
    raise ValueError("--drop-rate simulates lost K/V of sequence parallelism; it does not "
                     "apply to --tp")
  return sync.from_spec(args.tp)


def exchange_from_flags(args: argparse.Namespace):
  from astra_jax.core import exchange
  options = {}
  if args.exchange == "vq":
    options = {"groups": args.groups, "codebook_size": args.codebook_size}
  return exchange.make_exchange(args.exchange, **options)


def print_result(result: dict[str, Any], out: str | None = None) -> None:
  """Prints ``result`` as the last line (one JSON object) and writes it to ``out``
  (process 0 only, in multi-process runs)."""
  line = json.dumps(result, sort_keys=True)
  if out and _main_process():
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)


def _main_process() -> bool:
  if "jax" not in sys.modules:
    return True
  import jax
  return jax.process_index() == 0


def fail(message: str, code: int = 2) -> None:
  """Exits with a one-line error naming the fix (no traceback)."""
  print(f"error: {message}", file=sys.stderr)
  if "jax" in sys.modules:
    import jax
    if jax.process_count() > 1:  # skip the shutdown barrier the other ranks never reach
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  raise SystemExit(code)
