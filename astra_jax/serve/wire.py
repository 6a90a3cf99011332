"""The control channel between the server's front (rank 0) and its other ranks:
one TCP connection per rank carrying JSON objects, one per line.

Rank -> front: ``hello`` on connecting (rank, links address, pid, what it
loaded), then per request its tokens (if it decodes) and ``done`` or
``error``; ``probe`` answers.  Front -> rank: ``run`` (a request's prefill,
and decode if the rank holds the prompt's last token), ``cancel``, ``probe``
(a payload to time the link) and ``stop``.  The K/V never travel here: they
go on the forward links (``astra_jax.parallel.peer_links``).
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any


class Channel:
  """JSON lines over one socket; ``send`` is thread-safe, ``recv`` is for one reader."""

  def __init__(self, sock: socket.socket):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.sock = sock
    self._reader = sock.makefile("r", encoding="utf-8", newline="\n")
    self._lock = threading.Lock()

  def send(self, message: dict[str, Any]) -> None:
    """OSError when the other end is gone."""
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    with self._lock:
      self.sock.sendall(data)

  def recv(self) -> dict[str, Any] | None:
    """The next message; None once the other end closed (or sent garbage)."""
    try:
      line = self._reader.readline()
    except (OSError, ValueError):
      return None
    if not line:
      return None
    try:
      message = json.loads(line)
    except ValueError:
      return None
    return message if isinstance(message, dict) else None

  def close(self) -> None:
    try:
      self.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass
    self.sock.close()
