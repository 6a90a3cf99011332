"""TCP throughput between two hosts (or network namespaces): the link's real rate.

  python -m astra_jax.netsim.throughput recv HOST PORT        # prints "ready", then waits
  python -m astra_jax.netsim.throughput send HOST PORT BYTES  # prints one JSON line

The sender times from connect until the receiver acknowledges the last byte
(it replies with the count it got), so the figure is payload bits over wall
time, headers and the link's queueing included: what a collective sees.
:func:`measure` runs both ends under command prefixes, e.g. ``ip netns exec
NS``, which is how ``infer.lab.testbed`` shows that its shaping holds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

CHUNK = 1 << 16


def receive(host: str, port: int, timeout: float = 60) -> int:
  """Accepts one connection, counts bytes to EOF, replies with the count."""
  with socket.socket() as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(1)
    server.settimeout(timeout)
    print("ready", flush=True)
    conn, _ = server.accept()
    with conn:
      conn.settimeout(timeout)
      got = 0
      while chunk := conn.recv(CHUNK):
        got += len(chunk)
      conn.sendall(got.to_bytes(8, "big"))
  return got


def send(host: str, port: int, nbytes: int, timeout: float = 60) -> dict:
  """Sends ``nbytes`` and waits for the receiver's count; the rate in Mbit/s."""
  payload = b"\0" * CHUNK
  with socket.create_connection((host, port), timeout=timeout) as conn:
    start = time.perf_counter()
    sent = 0
    while sent < nbytes:
      sent += conn.send(payload[:min(CHUNK, nbytes - sent)])
    conn.shutdown(socket.SHUT_WR)
    reply = b""
    while len(reply) < 8 and (part := conn.recv(8 - len(reply))):
      reply += part
    seconds = time.perf_counter() - start
  got = int.from_bytes(reply, "big") if len(reply) == 8 else 0
  if got != nbytes:
    raise RuntimeError(f"the receiver got {got} of {nbytes} bytes")
  return {"bytes": nbytes, "seconds": seconds, "mbit_per_s": nbytes * 8 / seconds / 1e6}


def measure(send_prefix: list[str], recv_prefix: list[str], host: str, port: int,
            nbytes: int, timeout: float = 120) -> dict:
  """Runs the receiver (under ``recv_prefix``) on ``host:port`` and the sender
  (under ``send_prefix``); returns the sender's result.  RuntimeError on failure."""
  me = [sys.executable, "-m", "astra_jax.netsim.throughput"]
  receiver = subprocess.Popen([*recv_prefix, *me, "recv", host, str(port), str(timeout)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    if receiver.stdout.readline().strip() != "ready":
      raise RuntimeError(f"the throughput receiver did not start: {receiver.stderr.read()[-500:]}")
    sender = subprocess.run([*send_prefix, *me, "send", host, str(port), str(nbytes),
                             str(timeout)], capture_output=True, text=True, timeout=timeout)
    if sender.returncode:
      raise RuntimeError(f"the throughput sender failed: {sender.stderr.strip()[-500:]}")
    receiver.wait(timeout=10)
    return json.loads(sender.stdout.strip().splitlines()[-1])
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"the throughput probe took over {e.timeout:g} s; is the link up?") from None
  finally:
    if receiver.poll() is None:
      receiver.kill()
      receiver.wait()


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) < 3 or argv[0] not in ("recv", "send"):
    print("usage: python -m astra_jax.netsim.throughput recv HOST PORT [TIMEOUT] | "
          "send HOST PORT BYTES [TIMEOUT]", file=sys.stderr)
    raise SystemExit(2)
  if argv[0] == "recv":
    receive(argv[1], int(argv[2]), *(float(x) for x in argv[3:4]))
  else:
    print(json.dumps(send(argv[1], int(argv[2]), int(argv[3]), *(float(x) for x in argv[4:5]))),
          flush=True)


if __name__ == "__main__":
  main()
