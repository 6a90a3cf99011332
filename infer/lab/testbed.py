"""Run a multi-process CLI over bandwidth-shaped links between network namespaces.

  sudo python -m infer.lab.testbed --procs 2 --rate 10 -- infer.lab.prefill_time --model gpt2:mini \\
      --tokens 1024 --mesh 2 --exchange vq --groups 32
  sudo python -m infer.lab.testbed --procs 2 --rate 10          # only measure the link
  sudo python -m infer.lab.testbed --cleanup                    # remove crashed runs' leftovers

Sets up ``astra_jax.netsim.netns.Testbed``: one namespace per process on a bridge,
every link shaped with tbf to ``--rate`` Mbit/s in both directions (netem is
not available on this kernel, so no delay or loss is added).  Then:

  1. measures TCP throughput from namespace 0 to namespace 1 over the shaped
     link (``--probe-mb`` MB, by default 2 s worth of the rate and at least
     2.5 MB; ``--check-throughput`` fails unless it lies
     within 0.5x..1.2x of the rate);
  2. runs ``python -m infer.launch --procs N --coordinator <ns 0>:PORT --wrap
     "ip netns exec <ns rank> taskset -c <cores of rank>" -- MODULE ARGS``:
     rank i runs in namespace i pinned to cores i*C..i*C+C-1 (``--cores-per-proc``
     C; 0: no pinning), so its collectives (gloo over TCP) cross the shaped
     links;
  3. passes the launcher's exit code through and prints, as the last line, the
     CLI's JSON result plus rate_mbit, measured_mbit, procs, cores_per_proc and
     link_bytes (bytes each namespace sent through its shaped link during the
     run, from tc's counters: the collectives really went over it).

Everything is removed on exit, on errors, on Ctrl-C/SIGTERM (the launcher is
asked to stop its ranks first) and when set-up fails half-way.  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

from astra_jax.run import cli

COORDINATOR_PORT = 29500
PROBE_PORT = 29600
BAND = (0.5, 1.2)


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--procs", type=cli.at_least(1), default=2, help="processes, one namespace each")
  p.add_argument("--rate", type=cli.positive, default=10,
                 help="Mbit/s of every link, each direction")
  p.add_argument("--cores-per-proc", type=cli.at_least(1), default=1,
                 help="pin rank i to cores i*C..i*C+C-1 (0: no pinning)")
  p.add_argument("--probe-mb", type=cli.nonnegative, default=None,
                 help="MB sent to measure throughput before the run (default: 2 s at --rate, "
                 "at least 2.5 MB; 0: skip)")
  p.add_argument("--check-throughput", action="store_true",
                 help=f"fail unless the measured rate is within {BAND[0]}x..{BAND[1]}x of --rate")
  p.add_argument("--timeout", type=cli.positive, default=1800, help="seconds for the launched run")
  p.add_argument("--grace", type=cli.nonnegative, default=5,
                 help="seconds the launcher gives ranks between SIGTERM and SIGKILL")
  p.add_argument("--out", default=None, help="also write the JSON result here")
  p.add_argument("--cleanup", action="store_true",
                 help="remove leftover testbeds of dead processes (--force: of every process)")
  p.add_argument("--force", action="store_true",
                 help="with --cleanup: also remove the testbeds of running processes")
  p.add_argument("command", nargs=argparse.REMAINDER,
                 help="-- MODULE ARGS...: the CLI each rank runs (e.g. infer.lab.prefill_time ...)")
  args = p.parse_args(argv)
  if args.command and args.command[0] == "--":
    args.command = args.command[1:]
  if not args.cleanup and not 2 <= args.procs <= 64:
    cli.fail(f"--procs must be 2..64 (one namespace each), got {args.procs}")
  if not args.cleanup and not args.rate > 0:
    cli.fail(f"--rate must be > 0 Mbit/s, got {args.rate:g}")
  if args.probe_mb is None:
    args.probe_mb = max(2.5, args.rate / 8 * 2)
  if args.cores_per_proc < 0:
    p.error(f"--cores-per-proc must be >= 0, got {args.cores_per_proc}")
  return args


def core_sets(procs: int, per_proc: int) -> list[str] | None:
  """taskset core lists, one per rank; ValueError when the machine has too few."""
  if per_proc == 0:
    return None
  cores = sorted(os.sched_getaffinity(0))
  if procs * per_proc > len(cores):
    raise ValueError(f"{procs} processes x {per_proc} cores need {procs * per_proc} cores but "
                     f"this machine lets us use {len(cores)}; lower --cores-per-proc, or pass "
                     "--cores-per-proc 0 to run unpinned (sharing cores)")
  return [",".join(str(c) for c in cores[i * per_proc:(i + 1) * per_proc])
          for i in range(procs)]


def rank_wrap(namespace_prefix: str, cores: list[str] | None) -> str:
  """The launcher's ``--wrap``: rank i runs in namespace i, pinned to ``cores[i]``.

  The launcher substitutes only ``{rank}``; when rank i's cores are not simply
  core i, a one-line ``sh`` table maps the rank to its core list.
  """
  wrap = f"ip netns exec {namespace_prefix}-{{rank}}"
  if not cores:
    return wrap
  if cores == [str(i) for i in range(len(cores))]:
    return wrap + " taskset -c {rank}"
  table = " ".join(f"{i}) c={c};;" for i, c in enumerate(cores))
  return (f"sh -c 'case $0 in {table} esac; exec ip netns exec {namespace_prefix}-$0 "
          "taskset -c $c \"$@\"' {rank}")


def launch_command(args, tb, cores) -> list[str]:
  prefix = tb.namespaces[0].rsplit("-", 1)[0]
  return [sys.executable, "-m", "infer.launch", f"--procs={args.procs}",
          f"--coordinator={tb.ips[0]}:{COORDINATOR_PORT}", f"--timeout={args.timeout:g}",
          f"--grace={args.grace:g}", "--wrap", rank_wrap(prefix, cores), "--", *args.command]


def stop(proc: subprocess.Popen, grace: float) -> None:
  """Asks the launcher to stop its ranks (SIGTERM), then kills its group after the grace."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=grace + 10)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def run_launcher(cmd: list[str], grace: float) -> tuple[int, str]:
  """Runs the launcher, copying its output; (exit code, its last stdout line)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1,
                          start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  last = ""
  try:
    for line in proc.stdout:
      print(line, end="", flush=True)
      if line.strip():
        last = line.strip()
    return proc.wait(), last
  except KeyboardInterrupt:
    print("testbed: interrupted; stopping the ranks and removing the namespaces",
          file=sys.stderr, flush=True)
    stop(proc, grace)
    raise


def run(args) -> int:
  from astra_jax.netsim import netns, throughput
  netns.check_root()
  netns.check_tools()
  cores = core_sets(args.procs, args.cores_per_proc)
  if cores and shutil.which("taskset") is None:
    raise ValueError("taskset not found on PATH; install util-linux or pass --cores-per-proc 0")
  print(f"testbed: {args.procs} namespaces, links shaped to {args.rate:g} Mbit/s each way "
        f"with tbf ({netns.NETEM_NOTE})", file=sys.stderr, flush=True)
  with netns.Testbed(args.procs, args.rate) as tb:
    result = {"rate_mbit": args.rate, "procs": args.procs, "cores_per_proc": args.cores_per_proc,
              "measured_mbit": None}
    if args.probe_mb > 0:
      try:
        probe = throughput.measure(tb.exec_prefix(0), tb.exec_prefix(1), tb.ips[1], PROBE_PORT,
                                   int(args.probe_mb * 1e6))
      except RuntimeError as e:
        raise netns.TestbedError(f"could not measure the link: {e}") from None
      result["measured_mbit"] = round(probe["mbit_per_s"], 3)
      print(f"testbed: measured {probe['mbit_per_s']:.2f} Mbit/s from {tb.ips[0]} to "
            f"{tb.ips[1]} ({probe['bytes']:,} bytes in {probe['seconds']:.2f} s; "
            f"configured {args.rate:g})", file=sys.stderr, flush=True)
      low, high = BAND[0] * args.rate, BAND[1] * args.rate
      if args.check_throughput and not low <= probe["mbit_per_s"] <= high:
        raise netns.TestbedError(
            f"measured {probe['mbit_per_s']:.2f} Mbit/s, outside {low:g}..{high:g} for --rate "
            f"{args.rate:g}; is the machine overloaded, or tbf misbehaving?")
    if not args.command:
      cli.print_result(result, args.out)
      return 0
    before = tb.link_stats()
    cmd = launch_command(args, tb, cores)
    print(f"testbed: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    rc, last = run_launcher(cmd, args.grace)
    after = tb.link_stats()
  if rc:
    print(f"error: the launched run failed with exit code {rc} (see above); every namespace "
          "and link has been removed", file=sys.stderr)
    return rc
  try:
    launched = json.loads(last)
  except json.JSONDecodeError:
    launched = None
  if not isinstance(launched, dict):  # a CLI without a JSON result line
    launched = {"last_line": last}
  result.update(link_bytes=[a["sent_bytes"] - b["sent_bytes"] for a, b in zip(after, before)])
  cli.print_result({**launched, **result}, args.out)
  return 0


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  from astra_jax.netsim import netns
  try:
    if args.cleanup:
      netns.check_root()
      removed = netns.cleanup_stale(force=args.force)
      left = netns.leftovers()
      cli.print_result({"removed": removed, "still_present": left})
      return
    if not args.command and args.probe_mb <= 0:
      cli.fail("nothing to do: give a CLI after --, a --probe-mb > 0, or --cleanup")
    code = run(args)
  except (netns.TestbedError, ValueError) as e:
    cli.fail(str(e))
  except KeyboardInterrupt:
    print("error: interrupted; every namespace and link has been removed", file=sys.stderr)
    sys.exit(130)
  sys.exit(code)


if __name__ == "__main__":
  cli.entry(main)
