"""Bytes per device of a sequence-parallel forward, read from the compiled HLO.

  python -m infer.traffic --mesh 4 --exchange vq --groups 32 --dim 768 --seq-len 1024

Compiles a forward pass of ``--layers`` attention layers over a sequence split
``--mesh`` ways, sums the collectives' operand bytes per device from the HLO,
and prints them beside the analytic formula L * 2 * B * (T/P) * bytes_per_token
and the ratio to the exact (float) exchange.  The last line is one JSON object.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="attention", choices=["attention"],
                 help="what to compile (attention: a stack of attention layers)")
  p.add_argument("--mesh", type=cli.at_least(1), default=4, help="devices P on the seq axis")
  p.add_argument("--layers", type=cli.at_least(1), default=1)
  p.add_argument("--batch", type=cli.at_least(1), default=1)
  p.add_argument("--seq-len", type=cli.at_least(1), default=1024,
                 help="tokens T, split T/P per device")
  p.add_argument("--dim", type=cli.at_least(1), default=768, help="K/V width D = heads * head_dim")
  p.add_argument("--heads", type=cli.at_least(1), default=12)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--out", help="also write the JSON result here")
  cli.add_exchange_flags(p)
  return p.parse_args(argv)


def attention_stack_traffic(exchange, *, mesh_size, layers, batch, seq_len, dim,
                            heads, dtype):
  """Compiles the attention stack and returns (measured report, analytic bytes)."""
  import jax
  import jax.numpy as jnp
  from astra_jax.core import attention, axes
  from astra_jax.parallel import mesh as mesh_lib
  from astra_jax.netsim import traffic

  if dim % heads:
    raise ValueError(f"--dim {dim} is not divisible by --heads {heads}")
  mesh = mesh_lib.make_seq_mesh(mesh_size)
  tl = mesh_lib.check_divisible(seq_len, mesh_size)
  states = [exchange.init_state(jax.random.PRNGKey(i), dim) for i in range(layers)]

  def body(states, x):
    for state in states:  # distinct K and V so XLA cannot merge their exchanges
      x, _ = attention.attend(exchange, state, x, jnp.sin(x), jnp.cos(x), causal=False,
                              axis_name=axes.current_seq_axis())
    return x

  fn = jax.jit(mesh_lib.sequence_parallel(body, mesh, in_seq_dims=(None, 1),
                                          out_seq_dims=1))
  x = jax.ShapeDtypeStruct((batch, seq_len, heads, dim // heads), jnp.dtype(dtype))
  report = traffic.compiled_traffic(fn, states, x)
  analytic = traffic.sequence_parallel_bytes(
      exchange, layers=layers, batch=batch, tokens_per_device=tl, kv_dim=dim,
      dtype=dtype, mesh_size=mesh_size)
  return report, analytic


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.ensure_cpu_devices(args.mesh)
  from astra_jax.core import exchange as exchange_lib
  try:
    exchange = cli.exchange_from_flags(args)
    kw = dict(mesh_size=args.mesh, layers=args.layers, batch=args.batch,
              seq_len=args.seq_len, dim=args.dim, heads=args.heads, dtype=args.dtype)
    report, analytic = attention_stack_traffic(exchange, **kw)
    exact_report, exact_analytic = attention_stack_traffic(
        exchange_lib.make_exchange("exact"), **kw)
  except ValueError as e:
    cli.fail(str(e))
  measured = report.bytes_per_device
  print(f"{'':24}{'HLO (measured)':>16}{'formula':>16}")
  print(f"{args.exchange + ' bytes/device':24}{measured:>16,}{analytic:>16,}")
  print(f"{'exact bytes/device':24}{exact_report.bytes_per_device:>16,}{exact_analytic:>16,}")
  for kind, row in report.by_kind().items():
    print(f"  {kind}: {row['count']} ops, {row['operand_bytes']:,} bytes")
  ratio = exact_report.bytes_per_device / measured if measured else None
  if ratio:
    print(f"exact / {args.exchange} = {ratio:.2f}x less traffic")
  bits = 8 * exchange.bytes_per_token(args.dim, args.dtype)
  cli.print_result({
      "model": args.model, "mesh": args.mesh, "exchange": args.exchange,
      "groups": args.groups if args.exchange == "vq" else None,
      "codebook_size": args.codebook_size if args.exchange == "vq" else None,
      "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
      "dim": args.dim, "dtype": args.dtype, "bits_per_token": bits,
      "bytes_per_device": measured, "bytes_per_device_formula": analytic,
      "exact_bytes_per_device": exact_report.bytes_per_device,
      "reduction_vs_exact": ratio,
  }, args.out)


if __name__ == "__main__":
  cli.entry(main)
