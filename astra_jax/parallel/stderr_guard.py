"""A multi-process rank's stderr, minus the stack dump jax prints when it aborts.

When the coordinator process dies, jax's coordination client in every other
process aborts from a C++ thread at once: a glog FATAL line, gRPC details and
a stack dump, then SIGABRT.  Python never sees it, so ``distributed.initialize``
starts this filter and points the process's stderr (fd 2) at it:

  python -m astra_jax.parallel.stderr_guard PROCESS_ID NUM_PROCESSES  < pipe

Everything is passed through as it arrives until the runtime itself logs (a
glog line; multi-process runs set TF_CPP_MIN_LOG_LEVEL=3, so that happens when
the process group is failing); from there on only our own ``error: `` lines
are kept, and if the abort began (``MARKERS``) and the process printed no
error of its own, one line naming the lost peer ends the output.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys

from astra_jax.parallel import distributed  # stdlib-only at import: cheap

MARKERS = (b"Terminating process because the JAX distributed service detected fatal errors",
           b"*** Check failure stack trace: ***")  # the abort has begun
# a glog line from the runtime (absl/XLA); it may be glued to a progress bar
_GLOG = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")
_GLOG_START = re.compile(rb"[IWEF]\d{0,4}(?: [\d:.]*(?: +\d*)?)?$")  # one cut short
_SEGMENT = re.compile(rb"[^\r\n]*[\r\n]")
IDLE_S = 0.2  # an unfinished line (a progress bar) is shown after this long


def lost_peer_message(process_id: int, num_processes: int) -> str:
  who = ("the coordinator (process 0)" if process_id != 0 else
         f"process {1 if num_processes == 2 else 'another'}")
  return "error: " + distributed.lost_peer_line(who, "the coordination service reported it",
                                                process_id)


def guard(src: int, dst: int, process_id: int, num_processes: int) -> None:
  """Copies ``src`` to ``dst`` until the runtime logs (a glog line: with
  TF_CPP_MIN_LOG_LEVEL=3 only when the process group is failing); from then on
  only ``error: `` lines pass.  If the abort began (``MARKERS``) and the
  process said nothing itself, one line naming the lost peer ends the output."""
  pending = b""
  quiet = fatal = said = False
  while True:
    ready, _, _ = select.select([src], [], [], IDLE_S)
    if not ready:  # idle: show an unfinished line (a progress bar has no newline)
      if pending and not quiet and not _GLOG.search(pending) and not _GLOG_START.search(pending):
        os.write(dst, pending)
        pending = b""
      continue
    chunk = os.read(src, 65536)
    if not chunk:
      break
    pending += chunk
    segments = _SEGMENT.findall(pending)
    pending = pending[sum(len(s) for s in segments):]
    for segment in segments:
      fatal = fatal or any(m in segment for m in MARKERS)
      if not quiet:
        log = _GLOG.search(segment)
        cuts = [segment.find(m) for m in MARKERS if m in segment] + ([log.start()] if log else [])
        if not cuts:
          os.write(dst, segment)
          continue
        quiet = True
        if min(cuts):
          os.write(dst, segment[:min(cuts)] + b"\n")
      elif segment.startswith(b"error: "):
        os.write(dst, segment)
        said = True
  if quiet:
    if fatal and not said:
      os.write(dst, (lost_peer_message(process_id, num_processes) + "\n").encode())
  elif pending:
    os.write(dst, pending)


def main() -> None:
  # Ctrl-C reaches the whole process group: the rank handles it, the filter
  # keeps passing its output until the rank closes the pipe
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  guard(sys.stdin.fileno(), sys.stderr.fileno(), int(sys.argv[1]), int(sys.argv[2]))


if __name__ == "__main__":
  main()
