"""Network namespaces joined by rate-shaped links: a slow interconnect on one machine.

  with netns.Testbed(procs=2, rate_mbit=10) as tb:
    subprocess.run([*tb.exec_prefix(0), "python", ...])   # runs inside namespace 0
    tb.ips[1]                                             # namespace 1's address

Topology: one Linux bridge in the root namespace and, per process i, a
namespace ``astra<pid>-<i>`` holding ``veth0`` with address 10.X.Y.(i+1)/24
(X.Y from our pid) whose peer ``astra<pid>b<i>`` is enslaved to the bridge.
Names carry our pid so parallel testbeds never collide, and a leftover whose
pid is dead is recognisably a crashed run's (:func:`cleanup_stale`).

Shaping: a ``tbf`` qdisc on BOTH directions of every link (egress of the
namespace's veth0: what i sends; egress of the bridge-side peer: what i
receives), each at ``rate_mbit``.  tbf counts layer-2 bytes, so TCP payload
tops out near 95% of the rate (Ethernet/IP/TCP headers take the rest).
``netem`` is NOT available on this kernel, so the links add no delay, jitter
or loss of their own: latency is what veth + tbf queueing give (tens of
microseconds idle, up to ``LATENCY_MS`` when a queue is full).

Parameters (:func:`tbf_args`): ``burst`` is 10 ms worth of the rate and at
least 16 KiB.  tbf refills its bucket per timer tick, so a bucket smaller
than rate/HZ (HZ >= 100) cannot sustain the rate, and one smaller than a
packet would drop it; 10 ms at the rate is a negligible head start against
the megabytes a forward moves.  ``latency`` (the longest a packet may wait
in the queue, which sizes the queue: rate x latency + burst) is 200 ms.
With 50 ms, gloo's back-to-back all-gathers overflowed the sender's own
queue (more packets dropped than sent at 10 Mbit/s, each one retransmitted
by TCP on the rank's only core); 200 ms drops none and leaves the measured
rate unchanged.  The price is up to 200 ms of queueing for a small message
behind a large one, as on a link with a deep buffer.

Every process using the testbed resolves the machine's hostname to its own
namespace address (``/etc/netns/<ns>/hosts``, which ``ip netns exec``
mounts over ``/etc/hosts``): gloo, JAX's CPU collectives, binds to and
advertises the address of the hostname, which otherwise is 127.0.0.1, a
loopback private to each namespace.

Teardown (``__exit__``, idempotent) kills what still runs inside the
namespaces, deletes namespaces, links, bridge and hosts files, on normal
exit, on exceptions, on SIGINT/SIGTERM/SIGHUP (handlers installed while
active, raising KeyboardInterrupt) and when creation fails half-way.
Needs root.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

PREFIX = "astra"
NETEM_NOTE = ("netem is not available on this kernel: the links are rate-limited with tbf "
              "but add no delay, jitter or loss")
LATENCY_MS = 200
MIN_BURST_BYTES = 16 * 1024
MAX_PROCS = 64
ETC_NETNS = "/etc/netns"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-(\d+)$")
_LINK_RE = re.compile(rf"^{PREFIX}(\d+)(br|b\d+)$")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TestbedError(RuntimeError):
  """A one-line message naming the fix."""


def check_root(euid: int | None = None) -> None:
  """TestbedError unless running as root (namespaces, links and qdiscs need it)."""
  euid = os.geteuid() if euid is None else euid
  if euid != 0:
    raise TestbedError("needs root: network namespaces, veth links and tc qdiscs can only be "
                       "made by root; run as root or with sudo (e.g. sudo -E "
                       f"{os.path.basename(sys.executable)} -m infer.lab.testbed ...)")


def check_tools(which=shutil.which) -> None:
  """TestbedError naming the package when ``ip`` or ``tc`` is missing."""
  missing = [t for t in ("ip", "tc") if which(t) is None]
  if missing:
    raise TestbedError(f"{' and '.join(missing)} not found on PATH; install iproute2 "
                       "(apt-get install iproute2)")


def run_cmd(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
  """Runs an ``ip``/``tc`` command; TestbedError with its first stderr line on failure."""
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if check and proc.returncode:
    text = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
    raise TestbedError(f"`{' '.join(cmd)}` failed: {text.splitlines()[0]}")
  return proc


def burst_bytes(rate_mbit: float) -> int:
  """tbf bucket: 10 ms at the rate, at least MIN_BURST_BYTES (see the module docstring)."""
  return max(MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 / 100))


def tbf_args(rate_mbit: float) -> list[str]:
  """The ``tc qdisc add ... root`` tail shaping one direction of a link to ``rate_mbit``."""
  return ["tbf", "rate", f"{int(round(rate_mbit * 1e6))}bit", "burst",
          str(burst_bytes(rate_mbit)), "latency", f"{LATENCY_MS}ms"]


def _tbf_error(e: TestbedError) -> TestbedError:
  text = str(e)
  if any(s in text for s in ("Unknown qdisc", "kind is unknown", "not supported",
                             "No such file", "Invalid argument")):
    return TestbedError(f"the tbf qdisc is unavailable ({text}); load it with `modprobe "
                        "sch_tbf` or use a kernel with CONFIG_NET_SCH_TBF")
  return e


def namespaces() -> list[str]:
  """Names of every network namespace (``ip netns list``)."""
  out = run_cmd(["ip", "netns", "list"], check=False).stdout
  return [line.split()[0] for line in out.splitlines() if line.strip()]


def links() -> list[str]:
  """Names of every link in the root namespace."""
  out = run_cmd(["ip", "-o", "link", "show"], check=False).stdout
  return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def leftovers(owner: int | None = None) -> dict[str, list[str]]:
  """Testbed namespaces and root-namespace links of ``owner`` (a pid), or of every owner."""
  def mine(m):
    return m is not None and (owner is None or int(m.group(1)) == owner)
  return {"namespaces": [n for n in namespaces() if mine(_NS_RE.match(n))],
          "links": [n for n in links() if mine(_LINK_RE.match(n))]}


def cleanup_stale(force: bool = False) -> dict[str, list[str]]:
  """Removes the testbeds of dead owners (every testbed with ``force``); returns what went."""
  found = leftovers()
  owners = {int(m.group(1)) for name in found["namespaces"] + found["links"]
            for m in [_NS_RE.match(name) or _LINK_RE.match(name)]}
  removed: dict[str, list[str]] = {"namespaces": [], "links": []}
  for owner in sorted(owners):
    if not force and _pid_alive(owner):
      continue
    gone = leftovers(owner)
    _remove(owner, gone["namespaces"], gone["links"])
    for key in removed:
      removed[key] += gone[key]
  for name in (os.listdir(ETC_NETNS) if os.path.isdir(ETC_NETNS) else []):
    m = _NS_RE.match(name)  # hosts files of namespaces that are already gone
    if m and (force or not _pid_alive(int(m.group(1)))) and name not in namespaces():
      shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
  try:
    os.rmdir(ETC_NETNS)
  except OSError:
    pass
  return removed


def _kill_inside(ns: str) -> None:
  """SIGKILLs whatever still runs inside namespace ``ns`` (our ranks, probes)."""
  out = run_cmd(["ip", "netns", "pids", ns], check=False).stdout.split()
  for pid in out:
    try:
      os.kill(int(pid), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def _remove(owner: int, nss: list[str], link_names: list[str]) -> None:
  for ns in nss:
    _kill_inside(ns)
  for ns in nss:
    run_cmd(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(os.path.join(ETC_NETNS, ns), ignore_errors=True)
  # a veth pair dies with its namespace; the explicit delete covers namespaces
  # that outlive their name because a killed process has not been reaped yet
  for link in sorted(link_names, key=lambda name: name.endswith("br")):
    run_cmd(["ip", "link", "del", link], check=False)
  try:
    os.rmdir(ETC_NETNS)  # only when empty, i.e. when nobody else uses it
  except OSError:
    pass


@dataclasses.dataclass
class Testbed:
  """``procs`` namespaces on a bridge, every link shaped to ``rate_mbit`` each way."""

  procs: int
  rate_mbit: float
  owner: int = dataclasses.field(default_factory=os.getpid)

  def __post_init__(self):
    if not 2 <= self.procs <= MAX_PROCS:
      raise TestbedError(f"a testbed needs 2..{MAX_PROCS} processes, got {self.procs}")
    if not self.rate_mbit > 0:
      raise TestbedError(f"the link rate must be > 0 Mbit/s, got {self.rate_mbit}")
    self._handlers: dict[int, object] = {}
    self.active = False

  @property
  def namespaces(self) -> list[str]:
    return [f"{PREFIX}{self.owner}-{i}" for i in range(self.procs)]

  @property
  def bridge(self) -> str:
    return f"{PREFIX}{self.owner}br"

  def bridge_port(self, i: int) -> str:
    return f"{PREFIX}{self.owner}b{i}"

  @property
  def subnet(self) -> str:
    return f"10.{(self.owner >> 8) & 255}.{self.owner & 255}"

  @property
  def ips(self) -> list[str]:
    return [f"{self.subnet}.{i + 1}" for i in range(self.procs)]

  def exec_prefix(self, i: int) -> list[str]:
    """Command prefix running a program inside namespace ``i``."""
    return ["ip", "netns", "exec", self.namespaces[i]]

  def __enter__(self) -> "Testbed":
    check_root()
    check_tools()
    self._install_handlers()
    self.active = True
    try:
      self._create()
    except BaseException:
      self.teardown()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.teardown()

  def _install_handlers(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return

    def interrupt(signum, _frame):
      raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for sig in _SIGNALS:
      self._handlers[sig] = signal.signal(sig, interrupt)

  def _create(self) -> None:
    hostname = socket.gethostname()
    run_cmd(["ip", "link", "add", self.bridge, "type", "bridge"])
    run_cmd(["ip", "link", "set", self.bridge, "up"])
    for i, (ns, ip) in enumerate(zip(self.namespaces, self.ips)):
      run_cmd(["ip", "netns", "add", ns])
      os.makedirs(os.path.join(ETC_NETNS, ns), exist_ok=True)
      with open(os.path.join(ETC_NETNS, ns, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n{ip} {hostname}\n")
      port = self.bridge_port(i)
      run_cmd(["ip", "link", "add", port, "type", "veth", "peer", "name", "veth0", "netns", ns])
      run_cmd(["ip", "link", "set", port, "master", self.bridge, "up"])
      run_cmd(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "veth0"])
      run_cmd(["ip", "-n", ns, "link", "set", "veth0", "up"])
      run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
      try:
        run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", "veth0", "root", *tbf_args(self.rate_mbit)])
        run_cmd(["tc", "qdisc", "add", "dev", port, "root", *tbf_args(self.rate_mbit)])
      except TestbedError as e:
        raise _tbf_error(e) from None

  def link_stats(self) -> list[dict[str, int]]:
    """Per namespace: bytes/packets its shaped egress sent and dropped so far (tc -s)."""
    stats = []
    for ns in self.namespaces:
      out = run_cmd(["tc", "-s", "-n", ns, "qdisc", "show", "dev", "veth0"]).stdout
      m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+)", out)
      sent, packets, dropped = (int(x) for x in m.groups()) if m else (0, 0, 0)
      stats.append({"sent_bytes": sent, "packets": packets, "dropped": dropped})
    return stats

  def teardown(self) -> None:
    """Removes everything this testbed made; safe to call twice or after a partial set-up."""
    if not self.active:
      return
    ignored = {}
    if threading.current_thread() is threading.main_thread():
      ignored = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _SIGNALS}  # finish first
    try:
      have = leftovers(self.owner)
      _remove(self.owner, have["namespaces"], have["links"])
      for _ in range(20):  # namespaces of killed processes go once those are reaped
        left = leftovers(self.owner)
        if not left["namespaces"] and not left["links"]:
          break
        _remove(self.owner, left["namespaces"], left["links"])
        time.sleep(0.1)
      else:
        print(f"warning: testbed leftovers {left}; remove them with "
              "`python -m infer.lab.testbed --cleanup`", file=sys.stderr)
      self.active = False
    finally:
      for sig, handler in ignored.items():
        signal.signal(sig, handler)
      for sig, handler in self._handlers.items():
        signal.signal(sig, handler)
      self._handlers.clear()
