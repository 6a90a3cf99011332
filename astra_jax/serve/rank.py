"""One rank of the multi-rank server: its prefill programs and, on ranks other
than 0, the loop that runs what the front asks.

Every rank is its own process holding the whole model (sequence parallelism
needs nothing else), with one device and no ``jax.distributed`` group: its
only links to the others are the control channel to the front
(``serve.wire``) and the forward links of the ``stream`` exchange
(``parallel.peer_links``).  So a rank that dies takes nothing down with it:
the requests it was part of fail, the front goes on with the ranks left, and
a rank started again joins anew (``hello``).

``Programs`` holds a rank's compiled prefills, one per (plan, place in the
group, group size), all decoding with one shared step.  ``Worker`` connects
to the front, says what it loaded and answers ``run`` requests: its block of
the padded prompt, then, if it holds the prompt's last token, the decode,
token by token back to the front.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from astra_jax.core import attention, axes, streaming
from astra_jax.parallel import peer_links
from astra_jax.run import generate
from astra_jax.serve import wire
from astra_jax.serve.load import Loaded

CONNECT_TIMEOUT_S = 600  # a worker loads (and calibrates) while the front may still be loading


def fingerprint(loaded: Loaded) -> dict[str, str]:
  """What every rank must share to decode the others' codes: the model's name
  and, per plan, a digest of its codebooks (the K/V exchange state)."""
  out = {"model": loaded.name}
  for label, net in sorted(loaded.variants.items()):
    digest = hashlib.sha256()
    for layer in attention.attention_layers(net):
      for leaf in jax.tree.leaves(layer.state.get_value()):
        digest.update(np.asarray(leaf).tobytes())
    out[label] = digest.hexdigest()[:16]
  return out


class Programs:
  """A rank's prefills by (plan label, index in the group, group size)."""

  def __init__(self, loaded: Loaded):
    self.loaded = loaded
    self._generators: dict[tuple[str, int, int], generate.Generator] = {}
    self.decoder = generate.Generator(loaded.variants["exact"], mesh_size=1,
                                      context=loaded.context)  # also the one-device plan

  def get(self, label: str, index: int, size: int) -> generate.Generator:
    if size == 1:
      return self.decoder
    key = (label, index, size)
    if key not in self._generators:
      if label not in self.loaded.variants:
        raise ValueError(f"this rank has no {label!r} plan (it has "
                         f"{', '.join(sorted(self.loaded.variants))})")
      g = generate.Generator(self.loaded.variants[label], mesh_size=size,
                             context=self.loaded.context, rank=axes.HostAxis(index, size))
      g.share_decode(self.decoder)
      self._generators[key] = g
    return self._generators[key]


def run_block(programs: Programs, links: peer_links.Links, message: dict[str, Any],
              emit: Callable[[dict[str, Any]], None], cancelled: Callable[[], bool]) -> None:
  """One ``run`` request on this rank: its block's prefill and, if it holds the
  prompt's last token, the decode (``emit``: a message to the front)."""
  rid, group, index = message["id"], message["group"], message["index"]
  g = programs.get(message["label"], index, len(group))
  links.begin(rid, group, index)
  start = time.perf_counter()
  logits, views = g.prefill_prompt(message["tokens"], message["max_tokens"], message["length"])
  jax.block_until_ready(logits)
  prefill_s = time.perf_counter() - start
  scored = {}
  if message.get("score"):
    scored = block_nll(logits, message["tokens"], index * logits.shape[1])
  tokens = g.decode(logits, views, message["n"], message["max_tokens"],
                    temperature=message["temperature"], top_p=message["top_p"],
                    key=jax.random.PRNGKey(message["seed"] % 2**32))
  count = 0
  for token in tokens:
    emit({"id": rid, "token": int(token)})
    count += 1
    if cancelled():
      break
  emit({"id": rid, "done": True, "prefill_s": round(prefill_s, 4), "tokens": count, **scored})


def block_nll(logits, tokens: list[int], offset: int) -> dict[str, float]:
  """Summed negative log-likelihood of the next token at each position of this
  block (``offset``: its first position) that has one among ``tokens``."""
  n = min(len(tokens) - 1 - offset, logits.shape[1])
  if n <= 0:
    return {"nll": 0.0, "count": 0}
  logp = jax.nn.log_softmax(np.asarray(logits[0, :n], np.float32), axis=-1)
  targets = np.asarray(tokens[offset + 1:offset + 1 + n])
  return {"nll": float(-np.asarray(logp)[np.arange(n), targets].sum()), "count": int(n)}


class Worker:
  """Rank ``rank`` (not 0): connects to the front at ``front`` and serves it."""

  def __init__(self, loaded: Loaded, *, rank: int, front: str, host: str,
               compiles: Callable[[], int], log: Callable[[str], None]):
    self.rank, self.front, self.compiles, self.log = rank, front, compiles, log
    self.programs = Programs(loaded)
    self.links = peer_links.Links(host)
    streaming.set_host(self.links)
    self.hello = {"hello": {"rank": rank, "links": self.links.address, "pid": os.getpid(),
                            "fingerprint": fingerprint(loaded)}}
    self._cancelled: set[int] = set()

  def _connect(self) -> wire.Channel:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
      try:
        return wire.Channel(socket.create_connection(peer_links.split_address(self.front),
                                                     timeout=10))
      except OSError as e:
        if time.monotonic() > deadline:
          raise ValueError(f"rank {self.rank}: the front (rank 0) at {self.front} did not "
                           f"answer within {CONNECT_TIMEOUT_S} s ({e.strerror or e}); start "
                           "rank 0 with the same --coordinator") from None
        time.sleep(0.5)

  def serve(self) -> None:
    """Until the front says ``stop`` or goes away."""
    channel = self._connect()
    channel.sock.settimeout(None)
    channel.send(self.hello)
    jobs: queue.Queue = queue.Queue()

    def read():
      while (message := channel.recv()) is not None:
        if message.get("op") == "cancel":
          self._cancelled.add(message["id"])
        else:
          jobs.put(message)
      jobs.put(None)

    threading.Thread(target=read, daemon=True, name="control-reader").start()
    while (message := jobs.get()) is not None:
      op = message.get("op")
      if op == "stop":
        break
      try:
        if op == "probe":
          channel.send({"probe": message["id"]})
        elif op == "run":
          self._run(message, channel)
      except OSError:  # the front is gone
        break
    self.log(f"rank {self.rank}: the front closed the control channel; stopping")
    channel.close()

  def _run(self, message: dict[str, Any], channel: wire.Channel) -> None:
    rid = message["id"]
    def emit(reply):
      if reply.get("done"):
        reply["compiles"] = self.compiles()
      channel.send(reply)

    try:
      run_block(self.programs, self.links, message, emit, lambda: rid in self._cancelled)
    except OSError:
      raise
    except Exception as e:  # noqa: BLE001 - the request fails, the rank goes on
      cause = _root_cause(e)
      print(f"rank {self.rank}: request {rid} failed: {cause}", file=sys.stderr, flush=True)
      channel.send({"id": rid, "error": cause})
    finally:
      self._cancelled.discard(rid)


def serve_worker(loaded: Loaded, *, rank: int, front: str, host: str,
                 compiles: Callable[[], int]) -> None:
  """Rank ``rank`` (not 0) serves the front at ``front`` until it stops; logs on stderr."""
  Worker(loaded, rank=rank, front=front, host=host, compiles=compiles,
         log=lambda line: print(line, file=sys.stderr, flush=True)).serve()


def _root_cause(e: BaseException) -> str:
  """The first line naming what went wrong (a lost peer, not XLA's wrapping)."""
  text = str(e)
  for line in text.splitlines():
    if "PeerLost" in line or "rank at" in line:
      return line.strip()[:300]
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
