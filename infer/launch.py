"""Start N processes of a CLI on this machine as one jax.distributed run.

  python -m infer.launch --procs 2 -- infer.gpt2 --workdir workdir/gpt2 --mesh=4 --eval

Every rank runs ``python -m <cli> <args> --coordinator=HOST:PORT
--num-processes=N --process-id=I``.  Its lines are prefixed ``[rank I]`` as they
arrive, its stdout on the launcher's stdout and its stderr (progress bars,
warnings, ``error:`` lines) on the launcher's stderr.  The runtime's routine
lines are dropped (gloo's ``[Gloo] Rank R is connected to P peer ranks`` on
stdout, kept when fewer peers connected than expected); text they cut off is
joined to its line again.

The last line is the run's result, unprefixed, so scripts read it as usual: the
last stdout line of the rank whose JSON names itself in ``decoded_by_process``
(generation: the process holding the prompt's last token decodes; the others
print no tokens), else rank 0's last line (evaluation and training print the
same result on every rank).

Fails fast: when a rank exits non-zero, the others are stopped (SIGTERM, then
SIGKILL after ``--grace`` seconds) and the launcher exits non-zero naming the
dead rank.  Ctrl-C or SIGTERM to the launcher is passed on to every rank
(training ranks save a checkpoint and stop); the launcher then exits 130 or
143 like the ranks.  ``--restart N`` is for servers (``infer.serve``): a rank
other than 0 that dies is started again, up to N times each, and the others
go on (rank 0 still stops the run).  ``--timeout`` bounds the whole run (0:
no bound, for a server).  ``--wrap`` puts a command
before each rank (``{rank}`` is replaced), e.g. ``ip netns exec astra{rank}``;
``infer.lab.testbed`` uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from astra_jax.run import cli


INTERRUPT_GRACE_S = 120  # Ctrl-C / SIGTERM: time the ranks get to save a checkpoint
# gloo (C++) prints this on stdout whenever it opens a communicator, in the
# middle of whatever line the rank was writing
GLOO_CONNECTED = re.compile(r"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
                            r"Expected number of connected peer ranks is : (\d+)$")
RESULT_FROM = "decoded_by_process"  # a result one process produces names that process


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--procs", type=cli.at_least(1), required=True, help="number of processes")
  p.add_argument("--coordinator", default=None,
                 help="HOST:PORT for rank 0's coordinator (default 127.0.0.1 and a free port)")
  p.add_argument("--timeout", type=cli.nonnegative, default=1800,
                 help="seconds for the whole run (0: no limit)")
  p.add_argument("--restart", type=cli.at_least(0), default=0,
                 help="start a rank other than 0 again when it dies, up to this many times "
                      "each, while the others go on (servers: infer.serve)")
  p.add_argument("--grace", type=cli.nonnegative, default=10,
                 help="seconds between SIGTERM and SIGKILL")
  p.add_argument("--wrap", default="", help="command before each rank; {rank} is replaced")
  p.add_argument("command", nargs=argparse.REMAINDER,
                 help="-- MODULE ARGS...: the CLI to run (e.g. infer.gpt2 --eval ...)")
  args = p.parse_args(argv)
  if args.command and args.command[0] == "--":
    args.command = args.command[1:]
  if not args.command:
    p.error("give the CLI after --, e.g. -- infer.gpt2 --workdir workdir/gpt2 --eval")
  if args.procs < 1:
    p.error(f"--procs must be >= 1, got {args.procs}")
  return args


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def rank_command(args, rank: int, coordinator: str) -> list[str]:
  wrap = shlex.split(args.wrap.format(rank=rank)) if args.wrap else []
  module, *rest = args.command
  return [*wrap, sys.executable, "-m", module, *rest, f"--coordinator={coordinator}",
          f"--num-processes={args.procs}", f"--process-id={rank}"]


def without_noise(lines):
  """``lines`` without their newlines and without gloo's routine connection lines
  (kept when fewer peers connected than expected); text before one of those (a
  prompt streamed without a newline) is joined to the line that follows."""
  head = ""
  for line in lines:
    line = head + line.rstrip("\n")
    found = GLOO_CONNECTED.search(line)
    if found and found.group(1) == found.group(2):
      head = line[:found.start()]
      continue
    head = ""
    yield line
  if head:
    yield head


class Rank:
  """One child process and two threads copying its stdout and stderr, prefixed."""

  def __init__(self, rank: int, cmd: list[str], lock: threading.Lock):
    self.rank, self.last = rank, ""
    self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, bufsize=1, start_new_session=True,
                                 env=dict(os.environ, PYTHONUNBUFFERED="1"))
    self.threads = [threading.Thread(target=self._pump, args=(src, lock, is_stdout), daemon=True)
                    for src, is_stdout in ((self.proc.stdout, True), (self.proc.stderr, False))]
    for t in self.threads:
      t.start()

  def _pump(self, src, lock, is_stdout: bool):
    for line in without_noise(src):
      if is_stdout and line.strip():
        self.last = line
      with lock:
        print(f"[rank {self.rank}] {line}", file=sys.stdout if is_stdout else sys.stderr,
              flush=True)

  def signal(self, sig) -> None:
    if self.proc.poll() is None:
      try:
        os.killpg(self.proc.pid, sig)
      except ProcessLookupError:
        pass


def _first_cause(dead: list) -> list:
  """Failed ranks, the likely cause first: one killed by a signal (negative
  status) before the survivors that stopped with an error because it died."""
  return sorted(dead, key=lambda r: (r.proc.returncode >= 0, r.rank))


def result_line(ranks: list) -> str:
  """The last stdout line of the rank whose JSON result names itself in
  ``RESULT_FROM``, else rank 0's."""
  for r in ranks:
    try:
      result = json.loads(r.last)
    except ValueError:
      continue
    if isinstance(result, dict) and result.get(RESULT_FROM) == r.rank:
      return r.last
  return ranks[0].last


def run(args) -> int:
  coordinator = args.coordinator or f"127.0.0.1:{free_port()}"
  lock = threading.Lock()
  ranks = [Rank(i, rank_command(args, i, coordinator), lock) for i in range(args.procs)]
  restarts = [0] * args.procs
  deadline = time.monotonic() + (args.timeout or float("inf"))
  failed, reason, received = None, None, []

  def stop_all(sig, grace):
    for r in ranks:
      r.signal(sig)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(r.proc.poll() is None for r in ranks):
      time.sleep(0.1)
    for r in ranks:
      r.signal(signal.SIGKILL)
      r.proc.wait()

  def interrupted(signum, _frame):
    received.append(signum)
    raise KeyboardInterrupt

  previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while any(r.proc.poll() is None for r in ranks):
      for i, r in enumerate(ranks):
        if i and r.proc.poll() not in (None, 0) and restarts[i] < args.restart:
          restarts[i] += 1
          with lock:
            print(f"launch: rank {i} exited with code {r.proc.returncode}; starting it again "
                  f"({restarts[i]} of --restart={args.restart})", file=sys.stderr, flush=True)
          ranks[i] = Rank(i, rank_command(args, i, coordinator), lock)
      if any(r.proc.poll() not in (None, 0) for r in ranks):
        break
      if time.monotonic() > deadline:
        reason = f"the run exceeded --timeout={args.timeout:g} s"
        break
      time.sleep(0.1)
    dead = _first_cause([r for r in ranks if r.proc.poll() not in (None, 0)])
    if dead and not reason:
      failed = dead[0]
      reason = f"rank {failed.rank} exited with code {failed.proc.returncode}"
  except KeyboardInterrupt:
    reason = f"stopped by {signal.Signals(received[0]).name}" if received else "interrupted"
  finally:
    if received:  # the user's signal, passed on: training ranks save a checkpoint first
      print(f"launch: {reason}; passing it to the ranks", file=sys.stderr, flush=True)
      stop_all(received[0], max(args.grace, INTERRUPT_GRACE_S))
    else:
      if reason:
        print(f"launch: {reason}; stopping the other ranks", file=sys.stderr, flush=True)
      stop_all(signal.SIGTERM, args.grace)
    for s, handler in previous.items():
      signal.signal(s, handler)
    for r in ranks:
      for t in r.threads:
        t.join(timeout=5)
  if received:
    codes = sorted({r.proc.returncode for r in ranks})
    print(f"error: {reason}; the ranks exited with {', '.join(map(str, codes))} (see their "
          "lines above)", file=sys.stderr)
    return 128 + received[0]
  if reason:
    print(f"error: {reason} (see its [rank {failed.rank if failed else '?'}] lines above)"
          if failed else f"error: {reason}", file=sys.stderr)
    code = failed.proc.returncode if failed else 1
    return code if code in (130, 143) else 1  # a rank stopped by a signal: its status
  print(result_line(ranks), flush=True)
  return 0


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  sys.exit(run(args))


if __name__ == "__main__":
  cli.entry(main)
