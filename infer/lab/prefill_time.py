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

The last line is one JSON object: model (as given), tokens, mesh, processes, exchange,
groups, codebook_size, vocab_size, latency_s (median), latency_min_s, latencies_s (every repeat),
bytes_per_device (collective bytes of the compiled forward, from its HLO),
compile_s, cores (CPUs this process may run on).
"""

from __future__ import annotations

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
  return args


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
  return {
      "model": args.model, "tokens": args.tokens, "batch": args.batch, "mesh": args.mesh,
      "processes": jax.process_count(), "exchange": exchange.name,
      "strategy": sync.name if sync else exchange.name,
      "parallelism": "tensor" if sync else "sequence", "tp": args.tp,
      "groups": getattr(exchange, "groups", None),
      "codebook_size": getattr(exchange, "codebook_size", None),
      "overlap": exchange.overlap, "width": width, "layers": layers,
      "vocab_size": getattr(model.cfg, "vocab_size", None),
      "latency_s": statistics.median(times), "latency_min_s": min(times), "latencies_s": times,
      "bytes_per_device": bytes_per_device, "compile_s": compile_s,
      "cores": len(os.sched_getaffinity(0)), "platform": jax.devices()[0].platform,
  }


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
