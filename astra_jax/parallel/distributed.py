"""Multi-process runs: the ``jax.distributed`` settings every CLI takes.

  python -m infer.gpt2 ... --mesh=4 --coordinator=HOST:PORT --num-processes=2 --process-id=I
  python -m infer.gpt2 ... --mesh=4 --distributed=auto     # SLURM / cloud TPU detection
  python -m infer.launch --procs 2 -- infer.gpt2 ...        # both ranks on this machine

Each process owns ``mesh / num_processes`` devices (on CPU: that many fake
devices); the mesh spans all of them, and each process places only its own
slices of the inputs (``mesh.to_global``).  CPU collectives go over gloo (TCP),
so processes in separate network namespaces talk over whatever link joins them.
When a process dies the others stop with one line naming it: a killed
peer's sockets close at once, so the survivors' next gloo collective fails
and the excepthook ``initialize`` installs turns that error into a one-line
message and exit status ``PEER_DIED``.  When jax's coordination client aborts
a survivor first (at once when the coordinator dies; after ``HEARTBEAT_S``
seconds for a peer that vanished without closing its sockets), its glog
stack dump is dropped by ``stderr_guard``, which prints the one line instead
(jaxlib's missed-heartbeat hook cannot take a Python callback: it fails
converting the status).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys

HEARTBEAT_S = 30  # long enough that a live survivor always reaches a collective first
PEER_DIED = 1  # exit status of a survivor
# how a collective reports a peer that went away (gloo over TCP), and the
# coordination service's words for a task that stopped sending heartbeats
_LOST = re.compile(r"Gloo [\w-]+ (?:failed|timed out)\b.*?(Connection reset by peer|"
                   r"Connection closed by peer|Broken pipe|Connection refused|End of file)"
                   r"(?:\s*\[([^\]]+)\]:(\d+))?|(heartbeat timeout|stopped sending heartbeats)",
                   re.S)


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
  # XLA's C++ logs (coordination-service warnings, its multi-line account of a
  # dead task) would bury the one line below; errors still reach Python
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if args.num_processes is not None:
    _guard_stderr(args.process_id, args.num_processes)
  _drop_runtime_stdout()
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
  sys.excepthook = _excepthook(sys.excepthook, args.process_id, jax.process_count())
  if jax.devices()[0].platform == "cpu":
    # A program one process loaded from JAX's persistent compilation cache
    # while another compiled it (only process 0 writes the cache) left gloo's
    # collectives waiting for ever: a 2-process evaluation hung with
    # JAX_COMPILATION_CACHE_DIR set (jax 0.12.1, 2026-12-06).  Multi-process
    # CPU runs compile every program themselves (set before the first compile).
    jax.config.update("jax_enable_compilation_cache", False)
  from astra_jax.parallel import stream_transport
  stream_transport.install(args.coordinator)  # the stream exchange's forward-only links
  if len(jax.devices()) != mesh_size:
    raise ValueError(f"--mesh={mesh_size} but the {jax.process_count()} processes have "
                     f"{len(jax.devices())} devices in all; the mesh must span every device")


def _drop_runtime_stdout() -> None:
  """Python keeps this process's stdout; what the C++ runtime writes to fd 1 is
  dropped: gloo prints ``[Gloo] Rank R is connected to P peer ranks ...`` there
  from its own threads, in the middle of a line of ours and sometimes two at
  once, interleaved character by character (seen in CI), which no line filter
  downstream can take apart again."""
  import io
  sys.stdout.flush()
  kept = os.dup(1)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.close(devnull)
  sys.stdout = io.TextIOWrapper(os.fdopen(kept, "wb", buffering=0), encoding=sys.stdout.encoding,
                                errors=sys.stdout.errors, line_buffering=True,
                                write_through=True)


def _guard_stderr(process_id: int, num_processes: int) -> None:
  """Sends this process's stderr (fd 2) through ``stderr_guard``, which drops
  the stack dump of jax's C++ abort when the coordinator dies (see there)."""
  read, write = os.pipe()
  subprocess.Popen([sys.executable, "-m", "astra_jax.parallel.stderr_guard", str(process_id),
                    str(num_processes)], stdin=read, stdout=subprocess.DEVNULL)
  os.close(read)
  sys.stderr.flush()
  os.dup2(write, 2)
  os.close(write)


def lost_peer_line(who: str, cause: str, process_id: int) -> str:
  """The one line a survivor prints (here and in ``stderr_guard``)."""
  return (f"{who} is gone ({cause}); process {process_id} stops too. Look at that "
          "process's own output, then start every process again (a training run resumes "
          "from its last checkpoint)")


def is_peer_failure(exc: BaseException) -> bool:
  """Whether ``exc`` means another process of the group died."""
  return _LOST.search(str(exc)) is not None


def peer_failure(exc: BaseException, process_id: int, num_processes: int) -> str | None:
  """The one-line message for an error that means another process died, else None."""
  found = _LOST.search(str(exc))
  if not found:
    return None
  who = f"process {1 - process_id}" if num_processes == 2 else "a peer process"
  if found.group(2):
    who += f" at {found.group(2)}:{found.group(3)}"
  return lost_peer_line(who, found.group(1) or "it stopped sending heartbeats", process_id)


def _excepthook(previous, process_id, num_processes):
  def hook(kind, exc, tb):
    message = peer_failure(exc, process_id, num_processes)
    if message is None:
      return previous(kind, exc, tb)
    try:
      sys.stdout.flush()
    except Exception:  # noqa: BLE001 - leaving anyway
      pass
    # os._exit: the normal exit runs jax's shutdown barrier, which waits for
    # the dead peer and ends in the coordination service's abort
    os.write(2, f"\nerror: {message}\n".encode())
    os._exit(PEER_DIED)
  return hook


def is_main() -> bool:
  """True on process 0 (the one that prints results and writes shared files)."""
  import jax
  return jax.process_index() == 0
