"""Nearest-code search against the layer it parallelises, on one CPU core.

  python -m infer.lab.code_search                                   # the table below
  python -m infer.lab.code_search --out results/code_search.json --repeats 5
  python -m infer.lab.code_search --rows 768/256/32/1024 256/512/32/1024

Each row is one device of a 4-device ASTRA prefill: WIDTH (the K/V width D),
TOKENS (its local tokens T), G groups and K entries per codebook.  Timed, as
medians of ``--repeats`` runs after a warm-up (``workloads._time``):

  layer    one GPT-2 block (width D, D/64 heads) on the T local tokens attending
           to 4T keys (``Block.decode`` with a 4T-key cache: QKV, attention,
           projection, MLP): the compute the search sits beside;
  encode   the codes of a [T, D] K and a [T, D] V, each against its own random
           [G, K, D/G] codebook, by ``quantizer.encode_reference`` (the
           definition, the search used before) and by ``quantizer.encode`` (the search
           the exchange uses), in one jitted call each.

Before JAX starts the process pins itself to one core (``--core``, default
the first it may use) and XLA:CPU to one thread, so the numbers are one
device's single-core times; ratios come from the same run (other jobs on the
machine move them by tens of percent).  The default 9 rows take about a
minute on one core of this project's 2-core Xeon, most of it in the
reference search and compiling.  Prints one line per row (times in ms,
encode K+V / layer for both searches, the speed-up, whether both searches
gave the same codes), then one JSON object (``rows``, ``core``, ``jax``,
``median_speedup``) as its last line, also written to ``--out``; exits 1 if
any row's codes differ.
"""

from __future__ import annotations

import os
import statistics
import sys

from astra_jax.run import cli

# (width D, local tokens T, groups G, entries K): the shapes of issue 14
DEFAULT_ROWS = ("768/256/32/1024", "768/256/1/1024", "256/512/32/1024", "256/512/1/1024",
                "192/512/32/1024", "192/512/1/1024", "256/512/32/256", "256/512/32/4096",
                "768/256/32/4096")
KEYS_PER_QUERY = 4  # a device's T queries attend to the keys of 4 devices


def _row(text: str) -> tuple[int, int, int, int]:
  import argparse
  try:
    width, tokens, groups, size = (int(v) for v in text.split("/"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected WIDTH/TOKENS/GROUPS/ENTRIES, e.g. 768/256/32/1024; got {text!r}") from None
  if min(width, tokens, groups) < 1 or width % groups or size < 2 or size & (size - 1):
    raise argparse.ArgumentTypeError(
        f"{text!r}: need positive sizes, GROUPS dividing WIDTH and ENTRIES a power of two >= 2")
  return width, tokens, groups, size


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", nargs="+", type=_row, default=[_row(r) for r in DEFAULT_ROWS],
                 metavar="D/T/G/K", help="width/local tokens/groups/entries per row")
  p.add_argument("--repeats", type=cli.at_least(1), default=5, help="timed runs (median)")
  p.add_argument("--core", type=cli.at_least(0), default=None,
                 help="the CPU to run on (default: the first this process may use)")
  p.add_argument("--out", default=None, help="also write the JSON result here")
  args = p.parse_args(argv)
  allowed = sorted(os.sched_getaffinity(0))
  if args.core is None:
    args.core = allowed[0]
  elif args.core not in allowed:
    p.error(f"argument --core: CPU {args.core} is not one this process may use ({allowed})")
  return args


def one_core(core: int) -> None:
  """Pins this process to ``core`` and XLA:CPU to one thread; call before jax starts."""
  os.sched_setaffinity(0, {core})
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def layer_fn(width: int, tokens: int):
  """(jitted fn, args): one GPT-2 block, ``tokens`` queries over KEYS_PER_QUERY x as many keys."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from astra_jax.models import gpt2
  heads = max(1, width // 64)
  cfg = gpt2.GPT2Config(variant="custom", width=width, layers=1, heads=heads,
                        context=KEYS_PER_QUERY * tokens)
  graphdef, state = nnx.split(gpt2.Block(cfg, 0, rngs=nnx.Rngs(0)))
  keys = KEYS_PER_QUERY * tokens
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(k1, (1, tokens, width))
  cache = tuple(jax.random.normal(k, (1, keys, heads, width // heads)) for k in (k2, k3))
  positions = jnp.arange(keys - tokens, keys)  # the last device: every key is visible

  @jax.jit
  def layer(state, x, positions, cache):
    return nnx.merge(graphdef, state).decode(x, positions, cache)[0]

  return layer, (state, x, positions, cache)


def encode_fn(search):
  import jax
  return jax.jit(lambda k, v, cb_k, cb_v: (search(k, cb_k), search(v, cb_v)))


def measure(args) -> dict:
  import jax
  import numpy as np
  from astra_jax.core import quantizer as vq
  from astra_jax.netsim import workloads
  reference, blocked = encode_fn(vq.encode_reference), encode_fn(vq.encode)
  layers, rows = {}, []
  print(f"one core (CPU {args.core}), median of {args.repeats}; times in ms; "
        f"ratio = encode K+V / layer", flush=True)
  print(f"{'width':>5} {'tokens':>6} {'G':>3} {'K':>5} | {'layer':>7} | "
        f"{'encode ref':>10} {'ratio':>6} | {'encode new':>10} {'ratio':>6} | "
        f"{'speed-up':>8} same codes", flush=True)
  for width, tokens, groups, size in args.rows:
    if (width, tokens) not in layers:
      fn, fn_args = layer_fn(width, tokens)
      layers[width, tokens] = workloads._time(fn, fn_args, args.repeats)
    layer = layers[width, tokens]
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    k, v = (jax.random.normal(key, (tokens, width)) for key in keys[:2])
    cb_k, cb_v = (jax.random.normal(key, (groups, size, width // groups)) for key in keys[2:])
    enc_args = (k, v, cb_k, cb_v)
    same = all(np.array_equal(a, b) for a, b in zip(reference(*enc_args), blocked(*enc_args)))
    t_ref = workloads._time(reference, enc_args, args.repeats)
    t_new = workloads._time(blocked, enc_args, args.repeats)
    row = {"width": width, "tokens": tokens, "groups": groups, "codebook_size": size,
           "layer_s": layer, "encode_reference_s": t_ref, "encode_s": t_new,
           "ratio_reference": t_ref / layer, "ratio": t_new / layer,
           "speedup": t_ref / t_new, "same_codes": same}
    rows.append(row)
    print(f"{width:>5} {tokens:>6} {groups:>3} {size:>5} | {layer * 1e3:7.2f} | "
          f"{t_ref * 1e3:10.2f} {t_ref / layer:6.2f} | {t_new * 1e3:10.2f} {t_new / layer:6.2f} | "
          f"{t_ref / t_new:7.1f}x {'yes' if same else 'NO'}", flush=True)
  return {"rows": rows, "core": args.core, "repeats": args.repeats,
          "keys_per_query": KEYS_PER_QUERY, "jax": jax.__version__,
          "median_speedup": statistics.median(r["speedup"] for r in rows)}


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  one_core(args.core)
  result = measure(args)
  cli.print_result(result, args.out)
  if not all(r["same_codes"] for r in result["rows"]):
    cli.fail("the two searches gave different codes (see the rows above)", code=1)


if __name__ == "__main__":
  cli.entry(main)
