"""Evaluate a trained ViT run on the test split, sequence-parallel.

  python -m infer.vit --workdir DIR --mesh=4 --exchange vq [--out FILE]

Prints the accuracy and, as its last line, one JSON object with accuracy,
exchange, mesh, groups, codebook_size, bits_per_token, bytes_per_device (read
from the compiled program, one image per forward) and examples.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a run folder made by train.vit")
  p.add_argument("--mesh", type=cli.at_least(1), default=4)
  p.add_argument("--exchange", default=None,
                 help="exact | ring | vq, or a spec string such as vq:drop_rate=0.05 (default: the run's "
                      "own; vq needs a vq-trained run and uses its codebooks)")
  p.add_argument("--class-token", choices=["distributed", "single"], default=None,
                 help="override how per-device logits are combined")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--step", type=cli.at_least(0), default=None,
                 help="checkpoint step (default latest)")
  p.add_argument("--batch-size", type=cli.at_least(1), default=500)
  p.add_argument("--out", default=None, help="also write the JSON result here")
  cli.add_link_flags(p)
  return p.parse_args(argv)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.setup_devices(args)
  import dataclasses
  from astra_jax.run import workdir
  from astra_jax.data import images as data
  from astra_jax.run.tasks import exchanges, vit as task

  try:
    cfg = workdir.load_config(args.workdir, "vit")
    exchanges.for_evaluation(cfg, args.exchange, args.workdir, "train.vit")
    target = task.model_config(cfg, args.exchange)
    if args.drop_rate:  # else the spec's own drop_rate (default 0)
      target = dataclasses.replace(
          target, exchange=dataclasses.replace(target.exchange, drop_rate=args.drop_rate))
    if args.class_token:
      target = dataclasses.replace(target, class_token=args.class_token)
    sync = cli.sync_from_flags(args)
    if sync is not None:
      target = dataclasses.replace(target, sync=sync)
    cfg, model_cfg, model = task.restore_trained(args.workdir, target, args.step)
    split = data.load_image_dataset(cfg.dataset, args.data_dir, "test")
    result = task.evaluate(model, cfg, model_cfg, split, args.mesh, args.batch_size,
                           tensor=sync is not None)
  except ValueError as e:
    cli.fail(str(e))
  print(f"accuracy {result['accuracy']:.4f} on {result['examples']} test images, "
        f"{result['strategy']} ({result['parallelism']} parallel), mesh {args.mesh}, "
        f"{result['bytes_per_device']:,} bytes/device per image")
  cli.print_result(dict(result, workdir=args.workdir), args.out)


if __name__ == "__main__":
  cli.entry(main)
