"""Measured end-to-end latency of one sequence- or tensor-parallel forward (prefill).

  python -m infer.lab.prefill_time --model gpt2:mini --tokens 1024 --exchange vq --groups 32 --mesh 2
  python -m infer.lab.prefill_time --model gpt2:mini --tokens 1024 --mesh 1      # one device
  python -m infer.lab.prefill_time --model gpt2:mini --tokens 1024 --mesh 2 --tp flash:bits=4
  python -m infer.lab.prefill_time --model smollm2 --tokens 1024 --exchange vq --groups 32 --mesh 2
  python -m infer.lab.testbed --procs 2 --rate 10 -- infer.lab.prefill_time --model gpt2:mini --mesh 2

Builds the model at random initialisation (``gpt2:<variant>`` with a
``--vocab-size`` vocabulary, 256 unless given (50257 is GPT-2's: its head is
then as big as the real model's), and ``--tokens`` positions, or ``vit:<variant>/<patch>`` over
``--tokens`` patches, a square number), or loads a pretrained LM as the LM
CLIs do (``smollm2``, ``gguf:PATH``, ``hf:DIR``: the real weights, built with
the requested exchange, fed ``--tokens`` random token ids; at most the model's
context), compiles the evaluation forward of
``astra_jax.parallel.forward.inference_forward`` for ``--mesh`` devices, runs it
``--warmup`` times, then times ``--repeats`` forwards end to end
(``jax.block_until_ready``), every process starting each one after a barrier.
A repeat's latency is the slowest process's time.  VQ codebooks are random
(pretrained models too: no k-means): what crosses the link (G codes per
token, bit-packed) and the work done are the same as with trained codebooks,
so the timing does not depend on the codebook values, while the outputs are
meaningless.  ``--mesh 1`` is the single-device baseline (no collectives).

``--timeline PATH`` (the ``stream`` exchange in a multi-process launch, one
device per process) records one more forward's per-layer events on every
rank (``astra_jax.parallel.stream_transport.Timeline``: when each layer's
block was handed over, when the earlier ranks' blocks arrived, how long the
device waited) and writes them to PATH as JSON and a plot beside it
(PATH with ``.png``; ``infer.lab.timeline_plot``).  ``--slow-rank R:S``
makes rank R sleep S seconds before handing over each layer's block, to show
that the earlier ranks do not wait for it.

The last line is one JSON object: model (as given), tokens, mesh, processes, exchange,
groups, codebook_size, vocab_size, latency_s (median), latency_min_s, latencies_s (every repeat),
bytes_per_device (collective bytes of the compiled forward, from its HLO),
compile_s, cores (CPUs this process may run on).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

from astra_jax.run import cli
from astra_jax.parallel import distributed

RANDOM_INIT = ("gpt2", "vit")
PRETRAINED_SCHEMES = ("gguf", "hf")  # astra_jax.io.pretrained.SCHEMES (which imports jax)


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="gpt2:mini",
                 help="gpt2:<nano|micro|mini|small|medium|...>, vit:<mu|xs|Ti|S|B|L>/<patch> "
                 "(random init) or a pretrained LM: smollm2 (bundled), gguf:PATH or hf:DIR")
  p.add_argument("--tokens", type=cli.at_least(1), default=1024,
                 help="sequence length (ViT: patches)")
  p.add_argument("--mesh", type=cli.at_least(1), default=2,
                 help="devices on the seq axis (1: one device)")
  p.add_argument("--batch", type=cli.at_least(1), default=1)
  p.add_argument("--vocab-size", type=cli.at_least(2), default=None,
                 help="gpt2:<variant> only: its vocabulary (default 256; GPT-2's is 50257)")
  p.add_argument("--repeats", type=cli.at_least(1), default=5, help="timed forwards")
  p.add_argument("--warmup", type=cli.at_least(0), default=1,
                 help="untimed forwards after compiling")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also write the JSON result here")
  p.add_argument("--timeline", default=None, metavar="PATH",
                 help="stream exchange, multi-process: write one forward's per-rank, "
                 "per-layer timeline to PATH (JSON) and PATH with .png (a plot)")
  p.add_argument("--slow-rank", type=rank_seconds, default=None, metavar="R:SECONDS",
                 help="stream exchange, multi-process: rank R sleeps SECONDS before handing "
                 "over each layer's block (shows that earlier ranks do not wait)")
  cli.add_exchange_flags(p)
  cli.add_tp_flag(p)
  distributed.add_flags(p)
  args = p.parse_args(argv)
  family, sep, variant = args.model.partition(":")
  # a bare name is left to astra_jax.io.pretrained (which lists the bundled ones):
  # importing it here would start jax before --mesh asks for its devices
  if (family in RANDOM_INIT and not variant) or (
      sep and family not in RANDOM_INIT + PRETRAINED_SCHEMES) or not args.model:
    p.error(f"--model must be gpt2:<variant> or vit:<variant>/<patch> (random init), or a "
            f"pretrained LM: smollm2 (bundled), gguf:PATH or hf:DIR; got {args.model!r}")
  if args.vocab_size is not None and family != "gpt2":
    p.error("--vocab-size is for gpt2:<variant> models (a pretrained LM has its own, a ViT none)")
  for flag in ("tokens", "mesh", "batch", "repeats"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0, got {args.warmup}")
  if (args.timeline or args.slow_rank) and not args.exchange.startswith("stream"):
    p.error("--timeline and --slow-rank time the stream exchange's host transport: "
            "add --exchange stream:... (and launch one process per device)")
  ranks = args.num_processes or 1
  if args.slow_rank and args.slow_rank[0] >= ranks:
    p.error(f"--slow-rank {args.slow_rank[0]}: the run has {ranks} process(es), ranks 0-"
            f"{ranks - 1}")
  return args


def rank_seconds(text: str) -> tuple[int, float]:
  """``--slow-rank``'s RANK:SECONDS (a rank >= 0, 0-10 s)."""
  rank, _, seconds = text.partition(":")
  try:
    parsed = int(rank), float(seconds)
  except ValueError:
    parsed = (-1, 0.0)
  if parsed[0] < 0 or not 0 <= parsed[1] <= 10:
    raise argparse.ArgumentTypeError(
        f"--slow-rank is RANK:SECONDS (a rank >= 0, 0-10 s), e.g. 1:0.05; got {text!r}")
  return parsed


def build(args, exchange, sync=None):
  """(model, host inputs (x, positions), out_seq_dim, (width, layers)): at random
  init, or a pretrained LM's weights; ``sync``: the tensor-parallel strategy
  (None: the default, inert without a tp axis)."""
  import numpy as np
  from flax import nnx
  rng = np.random.default_rng(args.seed)
  positions = np.arange(args.tokens, dtype=np.int32)
  family, _, variant = args.model.partition(":")
  if family not in RANDOM_INIT:
    return build_pretrained(args, exchange, sync, rng, positions)
  if family == "gpt2":
    from astra_jax.models import gpt2
    vocab = args.vocab_size or 256
    cfg = gpt2.GPT2Config(variant=variant, vocab_size=vocab, context=args.tokens,
                          exchange=exchange, **({"sync": sync} if sync else {}))
    model = gpt2.GPT2(cfg, rngs=nnx.Rngs(args.seed))
    x = rng.integers(0, vocab, (args.batch, args.tokens), dtype=np.int32)
    return model, (x, positions), 1, cfg.sizes[:2]
  from astra_jax.models import vit
  side = math.isqrt(args.tokens)
  if side * side != args.tokens:
    raise ValueError(f"vit models need a square number of patches; --tokens {args.tokens} is "
                     f"not (use e.g. {side * side} or {(side + 1) ** 2})")
  patch = variant.partition("/")[2]
  if not patch.isdigit():
    raise ValueError(f"vit models are named vit:<variant>/<patch>, e.g. vit:Ti/16; got "
                     f"{args.model!r}")
  cfg = vit.ViTConfig(variant=variant, image_size=side * int(patch), channels=3,
                      num_classes=1000, exchange=exchange, **({"sync": sync} if sync else {}))
  model = vit.ViT(cfg, rngs=nnx.Rngs(args.seed))
  x = rng.standard_normal((args.batch, args.tokens, int(patch) ** 2 * 3)).astype(np.float32)
  return model, (x, positions), None, cfg.sizes[:2]


def build_pretrained(args, exchange, sync, rng, positions):
  """``build`` for a pretrained LM spec: its weights in a model with ``exchange``
  (fresh random codebooks) over ``--tokens`` random token ids."""
  import dataclasses
  import numpy as np
  from astra_jax.io import pretrained
  from astra_jax.run.tasks import lm
  target = pretrained.model_config(pretrained.parse(args.model), exchange)
  if args.tokens > target.context:
    raise ValueError(f"--tokens {args.tokens} exceeds {args.model}'s context of "
                     f"{target.context} tokens; time a prefill of at most {target.context}")
  if sync is not None:
    target = dataclasses.replace(target, sync=sync)
  model = lm.load_pretrained(args.model, target)
  x = rng.integers(0, target.vocab_size, (args.batch, args.tokens), dtype=np.int32)
  return model, (x, positions), 1, tuple(target.sizes[:2])


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def slowest(times: list[float]) -> list[float]:
  """Per repeat, the largest time over processes (every process gets the same list)."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return times
  from jax.experimental import multihost_utils
  every = multihost_utils.process_allgather(np.asarray(times, np.float64))
  return [float(t) for t in np.max(np.asarray(every).reshape(-1, len(times)), axis=0)]


def measure(args) -> dict:
  import jax
  from astra_jax.parallel import forward, mesh as mesh_lib
  from astra_jax.netsim import traffic
  exchange = cli.exchange_from_flags(args)
  sync = cli.sync_from_flags(args)
  if sync is None:
    mesh_lib.check_divisible(args.tokens, args.mesh, what="token")
  transport = host_transport(args) if args.timeline or args.slow_rank else None
  if args.slow_rank and jax.process_index() == args.slow_rank[0]:
    transport.delay = args.slow_rank[1]
  model, inputs, out_seq_dim, (width, layers) = build(args, exchange, sync)
  fwd = forward.inference_forward(model, args.mesh, out_seq_dim=out_seq_dim,
                                tensor=sync is not None)
  params, rest = fwd.params, fwd.rest
  inputs = fwd.place(inputs, (1, 0))
  start = time.perf_counter()
  compiled = fwd.fn.lower(params, rest, *inputs).compile()
  compile_s = time.perf_counter() - start
  bytes_per_device = traffic.hlo_traffic(compiled.as_text()).bytes_per_device
  for i in range(args.warmup):
    barrier(f"warmup {i}")
    jax.block_until_ready(compiled(params, rest, *inputs))
  times = []
  for i in range(args.repeats):
    barrier(f"repeat {i}")
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, rest, *inputs))
    times.append(time.perf_counter() - start)
  times = slowest(times)
  timeline = record_timeline(args, transport, lambda: compiled(params, rest, *inputs)) \
      if args.timeline else None
  return {
      "model": args.model, "tokens": args.tokens, "batch": args.batch, "mesh": args.mesh,
      "processes": jax.process_count(), "exchange": exchange.name,
      "strategy": sync.name if sync else exchange.name,
      "parallelism": "tensor" if sync else "sequence", "tp": args.tp,
      "groups": getattr(exchange, "groups", None),
      "codebook_size": getattr(exchange, "codebook_size", None),
      "quantize": getattr(exchange, "quantize", None),
      "overlap": exchange.overlap, "width": width, "layers": layers,
      "vocab_size": getattr(model.cfg, "vocab_size", None),
      "latency_s": statistics.median(times), "latency_min_s": min(times), "latencies_s": times,
      "bytes_per_device": bytes_per_device, "compile_s": compile_s,
      "cores": len(os.sched_getaffinity(0)), "platform": jax.devices()[0].platform,
      **({"timeline": timeline} if timeline else {}),
  }


def host_transport(args):
  """This process's stream transport, or a one-line error when the run does not
  use one (``--timeline``/``--slow-rank`` need it)."""
  import jax
  from astra_jax.core import streaming
  transport = streaming.host()
  if transport is None or not streaming.uses_host("seq"):
    raise ValueError(
        "--timeline and --slow-rank need the stream exchange's host transport: launch one "
        f"process per device (python -m infer.launch --procs {args.mesh} -- "
        "infer.lab.prefill_time ... or infer.lab.testbed)")
  if args.slow_rank and args.slow_rank[0] >= jax.process_count():
    raise ValueError(f"--slow-rank {args.slow_rank[0]} is not a rank of this "
                     f"{jax.process_count()}-process run")
  return transport


def record_timeline(args, transport, forward_once) -> dict:
  """One forward with every rank's ``transport`` recording; process 0 gathers
  the ranks' events (the coordination service's key-value store the
  transport met its peers through), writes ``--timeline`` and its plot, and
  returns the summary."""
  import json
  import jax
  from infer.lab import timeline_plot
  # recording starts before the barrier: rank 0 never waits, so its first block
  # can reach a later rank before that rank has left the barrier
  timeline = transport.record()
  barrier("timeline")
  start = time.time()
  jax.block_until_ready(forward_once())
  end = time.time()
  barrier("timeline forward")  # every rank done: every block sent and received
  transport.timeline = None
  mine = {**timeline.as_dict(), "start": start, "end": end}
  kv = transport.kv
  kv.key_value_set(f"astra_jax/timeline/{jax.process_index()}", json.dumps(mine))
  ranks = [json.loads(kv.blocking_key_value_get(f"astra_jax/timeline/{r}", 60_000))
           for r in range(jax.process_count())]
  record = {"model": args.model, "tokens": args.tokens, "exchange": args.exchange,
            "ranks": ranks}
  summary = timeline_plot.summarise(record)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(args.timeline)), exist_ok=True)
    with open(args.timeline, "w") as f:
      json.dump({**record, "summary": summary}, f, indent=1)
    timeline_plot.plot(record, os.path.splitext(args.timeline)[0] + ".png")
  barrier("timeline written")
  return summary


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.setup_devices(args)
  try:
    result = measure(args)
  except ValueError as e:
    cli.fail(str(e))
  print(f"{args.model} {args.tokens} tokens, mesh {args.mesh}, {result['strategy']} "
        f"({result['parallelism']} parallel): "
        f"{result['latency_s']:.3f} s per forward (median of {args.repeats}), "
        f"{result['bytes_per_device']:,} bytes/device", flush=True)
  cli.print_result(result, args.out)


if __name__ == "__main__":
  cli.entry(main)
