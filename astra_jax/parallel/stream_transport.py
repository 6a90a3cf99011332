"""The host transport of the ``stream`` exchange across processes (TCP, sender threads).

``astra_jax.core.streaming.forward`` hands each layer's block to ``Transport``
through an ``io_callback`` when every device of the sequence axis is in its
own process.  The call queues the block for every later rank (one writer
thread and one TCP connection per destination, so the call returns at once
and the device goes on computing) and then takes the earlier ranks' blocks of
the same layer from their reader threads, waiting only if one has not
arrived.  Nothing is sent to an earlier rank.

The group is the ``jax.distributed`` one: at start-up (``install``, called by
``distributed.initialize``) each process listens on the address that routes
to the coordinator and publishes it in the coordination service's key-value
store; connections to the later ranks are opened at the first exchange.
Blocks are matched by order: every rank runs the same program, so the n-th
block a rank receives from rank j is j's n-th.  A peer that dies closes its
connection, and the next exchange stops with an error naming it.

``record()`` starts a timeline (``Timeline``): for every exchange, when the
device handed its block over (its layer's compute ended), when the later
ranks' copies left this host and when the earlier ranks' blocks arrived and
were taken; ``infer.lab.prefill_time --timeline`` plots one forward's.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time

import numpy as np

KEY = "astra_jax/stream/{rank}"
CONNECT_TIMEOUT_MS = 60_000
_CLOSED = object()


class Timeline:
  """Wall-clock events of one rank's exchanges, numbered from ``record()``.

  ``calls``: per exchange n, [reached, handed over, earlier ranks' blocks all
  taken] (reached = the layer's K/V or codes computed; handed over = after
  the lab's ``delay``, the same time otherwise; taken - handed over = the
  time the device waited on the link).  ``sent[dest]`` and
  ``arrived[src]``: per message n, when its last byte was handed to the
  kernel for rank ``dest`` / read from rank ``src``.
  """

  def __init__(self, rank: int, size: int):
    self.rank = rank
    self.calls: list[list[float]] = []
    self.sent = {i: [] for i in range(rank + 1, size)}
    self.arrived = {j: [] for j in range(rank)}

  def as_dict(self) -> dict:
    return {"rank": self.rank, "calls": self.calls,
            "sent": {str(k): v for k, v in self.sent.items()},
            "arrived": {str(k): v for k, v in self.arrived.items()}}


class Transport:
  """This process's end of the forward-only links (rank ``rank`` of ``size``)."""

  def __init__(self, rank: int, size: int, kv, host: str):
    self.rank, self.size, self.kv = rank, size, kv
    self.inbox = {j: queue.Queue() for j in range(rank)}
    self.outbox = {i: queue.Queue() for i in range(rank + 1, size)}
    self._connected = False
    self._lock = threading.Lock()
    self.timeline: Timeline | None = None
    self.delay = 0.0  # seconds slept per exchange before handing the block over (lab only)
    self._server = socket.create_server((host, 0))
    kv.key_value_set(KEY.format(rank=rank), f"{host}:{self._server.getsockname()[1]}")
    threading.Thread(target=self._accept, daemon=True, name="stream-accept").start()

  def _accept(self) -> None:
    for _ in range(self.rank):  # one connection from each earlier rank
      conn, _ = self._server.accept()
      (sender,) = struct.unpack("!I", read_exact(conn, 4))
      threading.Thread(target=self._read_loop, args=(conn, sender), daemon=True,
                       name=f"stream-from-{sender}").start()

  def _read_loop(self, conn: socket.socket, sender: int) -> None:
    try:
      while True:
        (size,) = struct.unpack("!Q", read_exact(conn, 8))
        payload = read_exact(conn, size)
        self._note("arrived", sender)
        self.inbox[sender].put(payload)
    except (ConnectionError, OSError):
      self.inbox[sender].put(_CLOSED)

  def _connect(self) -> None:
    for dest, box in self.outbox.items():
      host, port = self.kv.blocking_key_value_get(KEY.format(rank=dest),
                                                  CONNECT_TIMEOUT_MS).rsplit(":", 1)
      conn = socket.create_connection((host, int(port)))
      conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      conn.sendall(struct.pack("!I", self.rank))
      threading.Thread(target=self._write_loop, args=(conn, box, dest), daemon=True,
                       name=f"stream-to-{dest}").start()
    self._connected = True

  def record(self) -> Timeline:
    """Starts a fresh timeline (the exchanges after this call, numbered from 0)."""
    self.timeline = Timeline(self.rank, self.size)
    return self.timeline

  def _note(self, kind: str, peer: int) -> None:
    """Adds the time of a message sent to / arrived from ``peer`` to the timeline."""
    timeline = self.timeline
    if timeline is not None:
      getattr(timeline, kind)[peer].append(time.time())

  def _write_loop(self, conn: socket.socket, box: queue.Queue, dest: int) -> None:
    try:
      while True:
        payload = box.get()
        conn.sendall(struct.pack("!Q", len(payload)) + payload)
        self._note("sent", dest)
    except OSError:
      return

  def __call__(self, index, block) -> np.ndarray:
    """(this device's axis index, its block) -> [P, *block.shape], earlier
    ranks' blocks in place, zeros elsewhere (``streaming.forward``)."""
    if int(index) != self.rank:
      raise RuntimeError(f"stream transport of process {self.rank} called for device "
                         f"{int(index)}: the sequence axis must hold one device per process")
    with self._lock:
      if not self._connected:
        self._connect()
    reached = time.time()
    if self.delay:
      time.sleep(self.delay)
    handed = time.time() if self.delay else reached
    data = np.ascontiguousarray(block)
    payload = data.tobytes()
    for box in self.outbox.values():
      box.put(payload)
    out = np.zeros((self.size, *data.shape), data.dtype)
    for sender, box in self.inbox.items():
      got = box.get()
      if got is _CLOSED:
        raise RuntimeError(f"stream exchange: process {sender} closed its connection (did it "
                           "die?); restart the run")
      out[sender] = np.frombuffer(got, data.dtype).reshape(data.shape)
    if self.timeline is not None:
      self.timeline.calls.append([reached, handed, time.time()])
    return out


def read_exact(conn: socket.socket, n: int) -> bytes:
  """``n`` bytes from ``conn``; ConnectionError when it closes first."""
  buf = bytearray()
  while len(buf) < n:
    chunk = conn.recv(min(n - len(buf), 1 << 20))
    if not chunk:
      raise ConnectionError("closed")
    buf += chunk
  return bytes(buf)


def local_address(coordinator: str | None) -> str:
  """The address of this host on the route to the coordinator (its own network
  namespace's, on the testbed)."""
  if coordinator:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
      probe.connect((coordinator.rsplit(":", 1)[0], 9))
      return probe.getsockname()[0]
    finally:
      probe.close()
  return socket.gethostbyname(socket.gethostname())


def install(coordinator: str | None) -> bool:
  """Registers this process's transport with ``core.streaming`` (after
  ``jax.distributed.initialize``); False where the key-value store is missing
  (the stream exchange then uses XLA collectives)."""
  import jax
  from astra_jax.core import streaming
  try:
    from jax._src import distributed as jax_distributed
    kv = jax_distributed.global_state.client
  except ImportError:
    return False
  if kv is None or jax.local_device_count() != 1:
    return False
  streaming.set_host(Transport(jax.process_index(), jax.process_count(), kv,
                               local_address(coordinator)))
  return True
