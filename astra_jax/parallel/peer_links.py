"""The serving group's forward-only links: the host transport of the ``stream``
exchange when every rank is its own process and no ``jax.distributed`` group
joins them (``astra_jax.serve``).

Each rank listens on one TCP port (``Links.address``).  For a request the
front names the group, in sequence order, and this rank's place in it
(``begin``); the rank then connects, once, to every later member it has no
live connection to.  ``__call__`` is the callable ``core.streaming`` calls
at every layer: it queues the layer's block for every later member (one
writer thread per destination, so the device goes on computing) and takes
the earlier members' blocks of the same layer, waiting only for those not
yet arrived.  Nothing goes to an earlier rank.

Unlike ``stream_transport`` (a fixed ``jax.distributed`` group, where a lost
peer ends the run), a group here changes between requests: ranks die and
come back on another port.  So every message carries its request's number
and blocks left over from a failed request are dropped; a member whose
connection closes, or that sends nothing for ``timeout_s``, fails the
request with ``PeerLost`` naming it, and this rank goes on to the next.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading

import numpy as np

from astra_jax.parallel.stream_transport import read_exact

HEADER = struct.Struct("!QQ")  # request number, payload bytes
_CLOSED = object()


class PeerLost(RuntimeError):
  """A member of the group closed its link or went silent mid-request."""


def serve_connections(server: socket.socket, handle, name: str) -> None:
  """Accepts ``server``'s connections on a daemon thread, each handled by
  ``handle(conn)`` on a thread of its own, until the server socket closes."""

  def accept():
    while True:
      try:
        conn, _ = server.accept()
      except OSError:
        return
      threading.Thread(target=handle, args=(conn,), daemon=True, name=f"{name}-conn").start()

  threading.Thread(target=accept, daemon=True, name=f"{name}-accept").start()


def split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host, int(port)


class Links:
  """This process's end of the group's forward links (``address``: HOST:PORT)."""

  def __init__(self, host: str, *, timeout_s: float = 45.0):
    self.timeout_s = timeout_s
    self._server = socket.create_server((host, 0))
    self.address = f"{host}:{self._server.getsockname()[1]}"
    self._inbox: dict[str, queue.Queue] = {}
    self._outbox: dict[str, queue.Queue] = {}
    self._lock = threading.Lock()
    self.request, self.group, self.index = -1, [self.address], 0
    serve_connections(self._server, self._read_loop, "links")

  def _box(self, sender: str) -> queue.Queue:
    with self._lock:
      return self._inbox.setdefault(sender, queue.Queue())

  def _read_loop(self, conn: socket.socket) -> None:
    box = None
    try:
      (size,) = struct.unpack("!I", read_exact(conn, 4))
      box = self._box(read_exact(conn, size).decode())
      while True:
        request, size = HEADER.unpack(read_exact(conn, HEADER.size))
        box.put((request, read_exact(conn, size)))
    except (ConnectionError, OSError, ValueError):
      if box is not None:
        box.put((None, _CLOSED))
    finally:
      conn.close()

  def begin(self, request: int, group: list[str], index: int) -> None:
    """The next exchanges belong to ``request``, run by ``group`` (addresses in
    sequence order) with this rank at ``index``; PeerLost if a later member
    cannot be reached."""
    if group[index] != self.address:
      raise ValueError(f"rank {index} of the group is {group[index]}, not this rank "
                       f"({self.address})")
    self.request, self.group, self.index = request, list(group), index
    for dest in group[index + 1:]:
      with self._lock:
        if dest in self._outbox:
          continue
      try:
        conn = socket.create_connection(split_address(dest), timeout=self.timeout_s)
      except OSError as e:
        raise PeerLost(f"rank at {dest} cannot be reached ({e.strerror or e})") from None
      conn.settimeout(None)
      conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      name = self.address.encode()
      conn.sendall(struct.pack("!I", len(name)) + name)
      box: queue.Queue = queue.Queue()
      with self._lock:
        self._outbox[dest] = box
      threading.Thread(target=self._write_loop, args=(conn, box, dest), daemon=True,
                       name=f"links-to-{dest}").start()

  def _write_loop(self, conn: socket.socket, box: queue.Queue, dest: str) -> None:
    try:
      while True:
        request, payload = box.get()
        conn.sendall(HEADER.pack(request, len(payload)) + payload)
    except OSError:
      with self._lock:  # reconnect at the next request that needs it
        if self._outbox.get(dest) is box:
          del self._outbox[dest]
    finally:
      conn.close()

  def __call__(self, index, block) -> np.ndarray:
    """(this device's index, its block) -> [P, *block.shape]: the earlier
    members' blocks of this layer in place, zeros elsewhere."""
    if int(index) != self.index:
      raise RuntimeError(f"links of rank {self.index} called for device {int(index)}")
    data = np.ascontiguousarray(block)
    payload = data.tobytes()
    for dest in self.group[self.index + 1:]:
      with self._lock:
        box = self._outbox.get(dest)
      if box is not None:  # a lost later member: its own request fails, not ours
        box.put((self.request, payload))
    out = np.zeros((len(self.group), *data.shape), data.dtype)
    for j, sender in enumerate(self.group[:self.index]):
      out[j] = np.frombuffer(self._take(sender), data.dtype).reshape(data.shape)
    return out

  def _take(self, sender: str) -> bytes:
    box = self._box(sender)
    while True:
      try:
        request, payload = box.get(timeout=self.timeout_s)
      except queue.Empty:
        raise PeerLost(f"rank at {sender} sent nothing for {self.timeout_s:.0f} s") from None
      if payload is _CLOSED:
        with self._lock:
          self._inbox.pop(sender, None)
        raise PeerLost(f"rank at {sender} closed its link (did it die?)")
      if request == self.request:
        return payload
      if request > self.request:
        raise PeerLost(f"rank at {sender} is at request {request}, this rank at "
                       f"{self.request}: the group is out of step")
      # else a block of an earlier request that failed before this rank took it

  def close(self) -> None:
    self._server.close()

