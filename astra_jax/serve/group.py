"""The multi-rank engine: rank 0 serves HTTP and runs the requests over the
ranks that are alive, with the plan the latency model predicts fastest.

Design (a lost device must not take the service down).  The ranks share no
``jax.distributed`` group: its coordination service stops every process
when one dies (``parallel.distributed``), and an XLA program that spans
processes cannot go on without one of them.  Instead each rank is a process
of its own with the whole model (``serve.rank``); rank 0, the front, holds
the control channel to each other rank (``serve.wire``) and every request
runs as one program per rank, the K/V (codes) going forward on the stream
exchange's links.  When a rank dies its control channel closes (or stays
silent past ``rank_timeout_s``): the request it was part of ends with an
error, the rank leaves the group, and the next request is planned over the
ranks left, down to rank 0 alone.  A rank started again (``infer.launch
--restart``, or the same command by hand) says ``hello``; once the front has
warmed it up between two requests, plans use it again.

Per request the plan is one device (rank 0, whole prompt) or every live rank
with exact K/V or ASTRA codes, whichever ``serve.plan.Planner`` predicts
fastest within the quality budget.  The rank holding the prompt's last token
decodes and sends its tokens to the front.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import random
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from astra_jax.core import streaming
from astra_jax.parallel import peer_links
from astra_jax.run.tasks import lm
from astra_jax.serve import chat as chat_lib, plan as plan_lib, rank as rank_lib, wire
from astra_jax.serve.engine import BucketedEngine, Generation, Sampling
from astra_jax.serve.load import Loaded

PROBE_BYTES = 1 << 20


class RankLost(RuntimeError):
  """A rank of the request's group died or went silent."""


class Member:
  """Another rank as the front sees it."""

  def __init__(self, rank: int, links: str, pid: int, channel: wire.Channel):
    self.rank, self.links, self.pid, self.channel = rank, links, pid, channel
    self.alive, self.warm = True, False
    self.compiles_at_warm_up: int | None = None
    self.compiles = 0

  def describe(self) -> dict[str, Any]:
    return {"rank": self.rank, "pid": self.pid, "links": self.links, "alive": self.alive,
            "warm": self.warm}


class GroupEngine(BucketedEngine):
  """``loaded`` (with its stream twins, ``load.load_group``) served by rank 0 of
  ``size`` ranks; the front listens for the others on ``control`` (HOST:PORT)."""

  def __init__(self, loaded: Loaded, *, size: int, control: str, links_host: str,
               buckets: list[int] | None = None, chat: chat_lib.ChatFormat | None = None,
               max_loss: float | None = None, rank_timeout_s: float = 45.0,
               log: Callable[[str], None] = lambda line: print(line, file=sys.stderr,
                                                                flush=True)):
    super().__init__(loaded, multiple=size, what=f"the {size} ranks", buckets=buckets,
                     chat=chat)
    self.size = size
    self.labels = [label for label in loaded.variants if label != "exact"] + ["exact"]
    self.rank_timeout_s, self.log = rank_timeout_s, log
    self.programs = rank_lib.Programs(loaded)
    self.fingerprint = rank_lib.fingerprint(loaded)
    self.links = peer_links.Links(links_host, timeout_s=rank_timeout_s)
    streaming.set_host(self.links)
    kv_dim, layers = lm.exchanged_shape(loaded.model_cfg)
    dtype = getattr(loaded.model_cfg, "dtype", jnp.float32)
    self.planner = plan_lib.Planner(
        layers=layers, max_loss=max_loss,
        message_bytes={label: 2 * net.cfg.exchange.bytes_per_token(kv_dim, dtype)
                       for label, net in loaded.variants.items()})
    self.members: dict[int, Member] = {}
    self._lock = threading.Lock()
    self._replies: dict[int, queue.Queue] = {}
    self._ids = itertools.count(1)
    self.run_between: Callable[[Callable[[], None]], None] | None = None
    self._closing = False
    self._server = socket.create_server(peer_links.split_address(control))
    peer_links.serve_connections(self._server, self._join, "front")

  # ---- the group ---------------------------------------------------------

  def _join(self, sock: socket.socket) -> None:
    channel = wire.Channel(sock)
    hello = (channel.recv() or {}).get("hello")
    if not isinstance(hello, dict) or not 0 < int(hello.get("rank", -1)) < self.size:
      self.log(f"front: a connection that is not a rank of {self.size} was refused")
      channel.close()
      return
    rank = int(hello["rank"])
    if hello.get("fingerprint") != self.fingerprint:
      self.log(f"front: rank {rank} (pid {hello.get('pid')}) loaded another model or other "
               f"codebooks ({hello.get('fingerprint')} vs {self.fingerprint}); refused: start "
               "every rank with the same --model/--workdir, --exchange and ASTRA_CACHE_DIR")
      channel.send({"op": "stop"})
      channel.close()
      return
    member = Member(rank, hello["links"], int(hello.get("pid", 0)), channel)
    with self._lock:
      old = self.members.get(rank)
      self.members[rank] = member
    if old is not None:
      old.alive = False
      old.channel.close()
    self.log(f"front: rank {rank} joined (pid {member.pid}, links {member.links})")
    threading.Thread(target=self._read, args=(member,), daemon=True,
                     name=f"front-from-{rank}").start()
    if self.compiles_at_warm_up is not None and self.run_between is not None:
      self.run_between(lambda: self._rewarm(member))

  def _read(self, member: Member) -> None:
    while (message := member.channel.recv()) is not None:
      rid = message.get("id", message.get("probe"))
      with self._lock:
        box = self._replies.get(rid)
      if box is not None:
        box.put((member.rank, message))
    self._lose(member, "its control channel closed")

  def _lose(self, member: Member, why: str) -> None:
    with self._lock:
      if not member.alive:
        return
      member.alive = False
      if self._closing:  # shutdown() asked the ranks to stop
        return
      boxes = list(self._replies.values())
    member.channel.close()
    self.log(f"front: rank {member.rank} (pid {member.pid}) is lost ({why}); serving with "
             f"{1 + len(self.live())} rank(s)")
    for box in boxes:
      box.put((member.rank, {"lost": why}))

  def live(self) -> list[Member]:
    """The other ranks alive and warmed up, by rank."""
    with self._lock:
      return sorted((m for m in self.members.values() if m.alive and m.warm),
                    key=lambda m: m.rank)

  def wait_for_ranks(self, timeout_s: float) -> None:
    """Until every other rank has joined; ValueError naming the missing ones."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      with self._lock:
        missing = [r for r in range(1, self.size)
                   if r not in self.members or not self.members[r].alive]
      if not missing:
        return
      time.sleep(0.2)
    raise ValueError(f"ranks {missing} did not join the front within {timeout_s:.0f} s; start "
                     f"them with --coordinator pointing at rank 0 (python -m infer.launch "
                     f"--procs {self.size} does it)")

  # ---- the engine ----------------------------------------------------------

  def describe(self) -> dict[str, Any]:
    return {"context": self.context, "ranks": self.size, "live_ranks": 1 + len(self.live()),
            "plans": [plan_lib.ONE] + self.labels, "buckets": self.buckets,
            "chat_template": self.chat.template is not None}

  def stats(self) -> dict[str, Any]:
    """The group, the planner's measurements and compiles since warm-up."""
    with self._lock:
      members = [m.describe() | {"compiles_since_warm_up": (
          None if m.compiles_at_warm_up is None else m.compiles - m.compiles_at_warm_up)}
          for m in sorted(self.members.values(), key=lambda m: m.rank)]
    p = self.planner
    return {"members": members,
            "link": p.link.as_dict() if p.link else None,
            "one_device_s": {str(b): round(s, 4) for b, s in p.one.items()},
            "block_s": {f"{label}@{r}:{b}": round(s, 4) for (label, r, b), s in p.block.items()},
            "fixed_s": {f"{label}@{r}": round(s, 4) for (label, r), s in p.overhead.items()},
            "quality_loss_pct": p.loss, "max_quality_loss_pct": p.max_loss}

  def plan(self, prompt_len: int, max_tokens: int, force: str | None = None,
           bucket: int | None = None) -> dict[str, Any]:
    """How a request runs now: ``force`` a plan label, ``bucket`` a padded length
    (warm-up and benchmarks), else the fastest predicted."""
    length = self.fitted(prompt_len, max_tokens, bucket)
    members = self.live()
    ranks = 1 + len(members)
    candidates = [(plan_lib.ONE, 1, length)]
    if ranks > 1 and length % ranks == 0:
      candidates += [(label, ranks, length) for label in self.labels]
    if force is not None:
      chosen = next((c for c in candidates if c[0] == force), None)
      if chosen is None:
        raise ValueError(f"plan {force!r} is not available now (plans: "
                         f"{', '.join(c[0] for c in candidates)})")
      _, predicted = self.planner.choose(candidates)
    else:
      chosen, predicted = self.planner.choose(candidates)
    label, ranks, length = chosen
    block = length // ranks
    return {"plan": label, "ranks": ranks, "bucket": length,
            "decode_rank": ([0] + [m.rank for m in members])[(prompt_len - 1) // block]
            if ranks > 1 else 0,
            "predicted_s": predicted[f"{label}@{ranks}"], "predictions_s": predicted,
            "group": [0] + [m.rank for m in members][:ranks - 1]}

  def generate(self, prompt_ids: list[int], sampling: Sampling, bucket: int | None = None,
               quiet: bool = False) -> Generation:
    n = len(prompt_ids)
    plan = self.plan(n, sampling.max_tokens, sampling.plan, bucket)
    if sampling.max_tokens == 0:
      return Generation(iter(()), plan, 0.0)
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    start = time.perf_counter()
    if plan["ranks"] == 1:
      tokens = self._one_device(prompt_ids, plan["bucket"], sampling, seed)
    else:
      tokens = self._on_group(prompt_ids, plan, sampling, seed)
    first = next(tokens)  # prefill done and its first token here: the time to first token
    prefill_s = time.perf_counter() - start
    plan["measured_s"] = round(prefill_s, 4)
    if not quiet:
      self.log(f"plan {plan['plan']} on {plan['ranks']} rank(s), bucket {plan['bucket']}, "
               f"{n} prompt tokens: predicted {plan['predicted_s']} s, measured "
               f"{prefill_s:.4f} s to the first token")
    return Generation(_then(first, tokens), plan, prefill_s)

  def _one_device(self, prompt_ids, length, sampling, seed) -> Iterator[int]:
    g = self.programs.decoder
    logits, views = g.prefill_prompt(prompt_ids, sampling.max_tokens, length)
    yield from g.decode(logits, views, len(prompt_ids), sampling.max_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p,
                        key=jax.random.PRNGKey(seed % 2**32))

  def _on_group(self, prompt_ids, plan, sampling, seed) -> Iterator[int]:
    """The request on the live ranks: each runs its block; the decoding rank's
    tokens come from this process or back on that rank's control channel."""
    with self._lock:
      members = [self.members[r] for r in plan["group"][1:]]
    with self._mailbox() as (rid, box):
      yield from self._run_on(members, rid, box, prompt_ids, plan, sampling, seed)

  def _run_on(self, members, rid, box, prompt_ids, plan, sampling, seed) -> Iterator[int]:
    """``_on_group`` for request ``rid``, whose replies arrive in ``box``."""
    group = [self.links.address] + [m.links for m in members]
    message = {"op": "run", "id": rid, "label": plan["plan"], "group": group,
               "tokens": list(prompt_ids), "length": plan["bucket"], "n": len(prompt_ids),
               "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
               "top_p": sampling.top_p, "seed": seed, "score": bool(plan.get("score"))}
    pending = {m.rank for m in members}
    try:
      for i, m in enumerate(members, start=1):
        try:
          m.channel.send({**message, "index": i})
        except OSError:
          self._lose(m, "its control channel closed")
          raise RankLost(f"rank {m.rank} is gone (its control channel closed); retry the "
                         "request: the server goes on with the ranks left") from None
      g = self.programs.get(plan["plan"], 0, len(group))
      self.links.begin(rid, group, 0)
      start = time.perf_counter()
      logits, views = g.prefill_prompt(prompt_ids, sampling.max_tokens, plan["bucket"])
      jax.block_until_ready(logits)
      plan["rank0_s"] = round(time.perf_counter() - start, 4)
      if plan.get("score"):
        plan["nll"] = [rank_lib.block_nll(logits, list(prompt_ids), 0)]
      yield from g.decode(logits, views, len(prompt_ids), sampling.max_tokens,
                          temperature=sampling.temperature, top_p=sampling.top_p,
                          key=jax.random.PRNGKey(seed % 2**32))  # nothing unless rank 0 decodes
      while pending:
        try:
          sender, reply = box.get(timeout=self.rank_timeout_s)
        except queue.Empty:
          late = [m for m in members if m.rank in pending]
          for m in late:
            self._lose(m, f"no answer for {self.rank_timeout_s:.0f} s")
          pending.clear()
          raise RankLost(f"rank(s) {[m.rank for m in late]} sent nothing for "
                         f"{self.rank_timeout_s:.0f} s; retry the request: the server goes on "
                         "with the ranks left") from None
        if "lost" in reply:
          if sender in pending:
            pending.discard(sender)
            raise RankLost(f"rank {sender} was lost mid-request ({reply['lost']}); retry "
                           "the request: the server goes on with the ranks left")
          continue
        if "error" in reply:
          pending.discard(sender)
          raise RankLost(f"rank {sender} failed the request: {reply['error']}")
        if "token" in reply:
          yield reply["token"]
        elif reply.get("done"):
          pending.discard(sender)
          self.members[sender].compiles = reply.get("compiles", 0)
          if "nll" in reply:
            plan["nll"].append({"nll": reply["nll"], "count": reply["count"]})
    finally:
      if pending:  # stopped early (cancelled, failed): the others stop too
        for m in members:
          if m.rank in pending and m.alive:
            try:
              m.channel.send({"op": "cancel", "id": rid})
            except OSError:
              pass
        self._drain(box, pending, members)

  @contextlib.contextmanager
  def _mailbox(self):
    """(a fresh request number, the queue its replies from the ranks go to)."""
    rid, box = next(self._ids), queue.Queue()
    with self._lock:
      self._replies[rid] = box
    try:
      yield rid, box
    finally:
      with self._lock:
        self._replies.pop(rid, None)

  def _drain(self, box: queue.Queue, pending: set[int], members: list[Member]) -> None:
    """Waits (bounded) for the ranks still at a request to finish it."""
    deadline = time.monotonic() + self.rank_timeout_s
    while pending and time.monotonic() < deadline:
      try:
        sender, reply = box.get(timeout=max(deadline - time.monotonic(), 0.01))
      except queue.Empty:
        break
      if sender in pending and ("done" in reply or "error" in reply or "lost" in reply):
        pending.discard(sender)
    for m in members:
      if m.rank in pending:
        self._lose(m, f"still busy {self.rank_timeout_s:.0f} s after its request ended")

  # ---- start-up ------------------------------------------------------------

  def probe_link(self, member: Member) -> plan_lib.Link:
    """Round trips to ``member``: three tiny ones and one carrying PROBE_BYTES."""
    with self._mailbox() as (rid, box):

      def trip(payload: str) -> float:
        start = time.perf_counter()
        member.channel.send({"op": "probe", "id": rid, "payload": payload})
        _, reply = box.get(timeout=120)
        if "lost" in reply:
          raise RankLost(f"rank {member.rank} was lost while its link was measured")
        return time.perf_counter() - start

      small = min(trip("") for _ in range(3))
      big = trip("x" * PROBE_BYTES)
    return plan_lib.link_from_probe(small, big, PROBE_BYTES)

  def _warm_runs(self, label: str, ranks: int, length: int, first: bool) -> float:
    """One request per rank that can decode a prompt of this bucket (each one's
    decode compiles), the sampling variants once, then a timed one: one
    device's time to first token, or rank 0's own block of a plan (its
    compute: in a forward-streamed prefill it never waits)."""
    block = length // ranks
    samplings = [(0.0, 1.0)] + ([(1.0, 1.0), (1.0, 0.9)] if first else [])
    runs = [(d * block + 1, s) for d in range(ranks) for s in samplings] + [(1, samplings[0])]
    for n, (temperature, top_p) in runs:
      gen = self.generate([self.programs.decoder.pad_id] * n,
                          Sampling(max_tokens=3, temperature=temperature, top_p=top_p, seed=0,
                                   plan=label), bucket=length, quiet=True)
      list(gen)
    self.planner.ttft[(label, ranks, length)] = gen.prefill_s
    return gen.plan.get("rank0_s", gen.prefill_s)

  def _time_plans(self, ranks: int, length: int, first: bool) -> None:
    """Compiles and times every plan over ``ranks`` ranks at one bucket (none on
    one rank, or when the bucket does not split over them)."""
    if ranks > 1 and length % ranks == 0:
      for label in self.labels:
        self.planner.block[(label, ranks, length)] = self._warm_runs(label, ranks, length,
                                                                     first)

  def perplexity(self, label: str, ids: list[int]) -> float:
    """The plan's perplexity on ``ids`` (one bucket's worth, run as a request)."""
    ranks = 1 if label == plan_lib.ONE else 1 + len(self.live())
    length = max(b for b in self.buckets if b <= len(ids) and b % ranks == 0)
    window = ids[:length]
    if ranks == 1:
      g = self.programs.decoder
      logits, _ = g.prefill_prompt(window, 0, length)
      parts = [rank_lib.block_nll(logits, window, 0)]
    else:
      plan = self.plan(length, 0, label, length) | {"score": True}
      for _ in self._on_group(window, plan, Sampling(max_tokens=0), 0):
        pass
      parts = plan["nll"]
    return math.exp(sum(p["nll"] for p in parts) / sum(p["count"] for p in parts))

  def measure_quality(self, ids: list[int]) -> dict[str, float]:
    """Each plan's perplexity increase over one device on ``ids``, percent."""
    if not ids or len(ids) < min(self.buckets):
      return {}
    base = self.perplexity(plan_lib.ONE, ids)
    out = {"one_device_ppl": round(base, 4)}
    if self.live():
      for label in self.labels:
        ppl = self.perplexity(label, ids)
        self.planner.loss[label] = round(100 * (ppl / base - 1), 3)
        out[f"{label}_ppl"] = round(ppl, 4)
    self.log(f"warm-up: perplexity on {len(ids)} held-out tokens {out}; increase over one "
             f"device (%) {self.planner.loss}")
    return out

  def warm_up(self, held_out: list[int] | None = None) -> dict[str, Any]:
    """Measures the link, then compiles and times every plan at every bucket
    (the ranks compile theirs alongside); returns the compile count and times."""
    start, compiles = time.perf_counter(), self.compiles.count
    members = [m for m in self.members.values() if m.alive]
    if members:
      links = [self.probe_link(m) for m in members]
      self.planner.link = min(links, key=lambda link: link.mbit)
      self.log(f"warm-up: link to the other ranks {self.planner.link.as_dict()}")
    for m in members:
      m.warm = True
    ranks = 1 + len(members)
    seconds: dict[str, float] = {}
    for i, length in enumerate(self.buckets):
      t = time.perf_counter()
      self.planner.one[length] = self._warm_runs(plan_lib.ONE, 1, length, i == 0)
      self._time_plans(ranks, length, i == 0)
      seconds[str(length)] = round(time.perf_counter() - t, 2)
      self.log(f"warm-up: bucket {length} tokens, {1 + (len(self.labels) if ranks > 1 else 0)} "
               f"plan(s), compiled and timed in {seconds[str(length)]:.1f} s")
    self.planner.calibrate()
    quality = self.measure_quality(held_out or [])
    self.compiles_at_warm_up = self.compiles.count
    for m in members:
      m.compiles_at_warm_up = m.compiles
    return {"quality": quality, "compile_s": round(time.perf_counter() - start, 2),
            "compiles": self.compiles.count - compiles, "bucket_s": seconds,
            "link": self.planner.link.as_dict() if self.planner.link else None}

  def _rewarm(self, member: Member) -> None:
    """A rank that joined after start-up: its link and programs, then it plans again."""
    if not member.alive:
      return
    try:
      link = self.probe_link(member)
      self.planner.link = link if self.planner.link is None else min(
          self.planner.link, link, key=lambda x: x.mbit)
      member.warm = True
      ranks = 1 + len(self.live())
      for i, length in enumerate(self.buckets):
        self._time_plans(ranks, length, i == 0)
      self.planner.calibrate()
      member.compiles_at_warm_up = member.compiles
      self.compiles_at_warm_up = self.compiles.count
      self.log(f"front: rank {member.rank} warmed up; plans use {ranks} ranks again")
    except Exception as e:  # noqa: BLE001 - the rank stays out, the server goes on
      member.warm = False
      self._lose(member, f"its warm-up failed: {e}")

  def shutdown(self) -> None:
    with self._lock:
      self._closing = True
      members = list(self.members.values())
    for m in members:
      try:
        m.channel.send({"op": "stop"})
      except OSError:
        pass
    self._server.close()


def _then(first: int, rest: Iterator[int]) -> Iterator[int]:
  """``first``, then ``rest``; closing it closes ``rest`` (a request stopped early)."""
  yield first
  yield from rest
