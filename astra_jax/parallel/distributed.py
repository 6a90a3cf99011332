"""Multi-process runs: the ``jax.distributed`` settings every CLI takes.

  python -m infer.gpt2 ... --mesh=4 --coordinator=HOST:PORT --num-processes=2 --process-id=I
  python -m infer.gpt2 ... --mesh=4 --distributed=auto     # SLURM / cloud TPU detection
  python -m infer.launch --procs 2 -- infer.gpt2 ...        # both ranks on this machine

Each process owns ``mesh / num_processes`` devices (on CPU: that many fake
devices); the mesh spans all of them, and each process places only its own
slices of the inputs (``mesh.to_global``).  CPU collectives go over gloo (TCP),
so processes in separate network namespaces talk over whatever link joins them.
Heartbeats are short, so when a process dies the others stop within about
``heartbeat`` seconds instead of hanging in a collective.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

HEARTBEAT_S = 10


def add_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("multi-process (jax.distributed)")
  g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  g.add_argument("--distributed", choices=["off", "auto"], default="off",
                 help="auto: let JAX detect the cluster (SLURM, TPU pods, ...)")
  g.add_argument("--init-timeout", type=int, default=60,
                 help="seconds to wait for every process to join")


def requested(args: argparse.Namespace) -> bool:
  return args.distributed == "auto" or any(
      x is not None for x in (args.coordinator, args.num_processes, args.process_id))


def check(args: argparse.Namespace, mesh_size: int) -> None:
  """ValueError naming the fix for an inconsistent set of flags."""
  if args.distributed == "auto" or not requested(args):
    return
  missing = [f for f, v in (("--coordinator", args.coordinator),
                            ("--num-processes", args.num_processes),
                            ("--process-id", args.process_id)) if v is None]
  if missing:
    raise ValueError(f"multi-process runs need --coordinator, --num-processes and "
                     f"--process-id together; missing {' '.join(missing)} (or use "
                     "--distributed=auto under SLURM, or python -m infer.launch)")
  if ":" not in args.coordinator:
    raise ValueError(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
  if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
    raise ValueError(f"--process-id must be in 0..{args.num_processes - 1} for "
                     f"--num-processes={args.num_processes}, got {args.process_id}")
  if mesh_size % args.num_processes:
    raise ValueError(f"--mesh={mesh_size} cannot be split evenly over "
                     f"{args.num_processes} processes; use a multiple of {args.num_processes}")
  if args.process_id == 0:
    check_port_free(args.coordinator)


def check_port_free(coordinator: str) -> None:
  """ValueError naming the fix when process 0 could not bind the coordinator's
  port (gRPC would fail deep inside XLA, in some runs with a segfault)."""
  host, _, port = coordinator.rpartition(":")
  try:
    port_number = int(port)
  except ValueError:
    raise ValueError(f"--coordinator must be HOST:PORT with a numeric port, got "
                     f"{coordinator!r}") from None
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is free
    try:
      s.bind(("", port_number))
    except OSError as e:
      raise ValueError(f"port {port_number} of --coordinator {coordinator} is not free "
                       f"({e.strerror}); pick another port, stop the process holding it, "
                       "or let python -m infer.launch choose one") from None


def initialize(args: argparse.Namespace, mesh_size: int) -> None:
  """Joins the process group when asked to; on CPU gives this process its devices.

  Must run before jax creates its backend (the CLIs call it right after
  parsing).  A no-op for single-process runs.
  """
  if not requested(args):
    return
  check(args, mesh_size)
  if args.num_processes is not None and "jax" not in sys.modules:
    os.environ["JAX_NUM_CPU_DEVICES"] = str(mesh_size // args.num_processes)
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  options = dict(initialization_timeout=args.init_timeout, heartbeat_timeout_seconds=HEARTBEAT_S,
                 shutdown_timeout_seconds=HEARTBEAT_S)
  try:
    if args.distributed == "auto":
      jax.distributed.initialize(**options)
    else:
      jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                 **options)
  except Exception as e:  # noqa: BLE001 - the coordinator's errors are long and deep
    raise ValueError(f"could not join the process group at {args.coordinator} as process "
                     f"{args.process_id} of {args.num_processes} within {args.init_timeout} s "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); start every "
                     "process with the same --coordinator and --num-processes") from e
  if len(jax.devices()) != mesh_size:
    raise ValueError(f"--mesh={mesh_size} but the {jax.process_count()} processes have "
                     f"{len(jax.devices())} devices in all; the mesh must span every device")


def is_main() -> bool:
  """True on process 0 (the one that prints results and writes shared files)."""
  import jax
  return jax.process_index() == 0
