"""Evaluate a trained ViT run on the test split, sequence-parallel.

  python -m infer.vit --workdir DIR --mesh=4 --exchange vq [--out FILE]
  python -m infer.vit --model hf:DIR --mesh=4 [--image-size N] [--dataset NAME]

``--model`` evaluates a pretrained classifier as it is (a transformers
ViTForImageClassification folder whose classes are the dataset's): the images
are upsampled by the largest whole factor that fits --image-size (default: the
model's own), padded to it, and fed the way the model was trained
(``astra_jax.io.hf_vit``); exchanges without state (exact, ring) only.

Prints the accuracy and, as its last line, one JSON object with accuracy,
exchange, mesh, groups, codebook_size, bits_per_token, bytes_per_device (read
from the compiled program, one image per forward) and examples.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--workdir", help="a run folder made by train.vit")
  which.add_argument("--model", help="a pretrained classifier: hf:DIR (transformers ViT)")
  p.add_argument("--image-size", type=cli.at_least(1), default=None,
                 help="with --model: the image size (default: the model's)")
  p.add_argument("--dataset", default="fashion_mnist", help="with --model: the test data")
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
  from astra_jax.run.tasks import exchanges, vit as task, vit_pretrained

  try:
    cfg = _pretrained_config(args) if args.model else workdir.load_config(args.workdir, "vit")
    exchanges.for_evaluation(cfg, args.exchange, args.model or args.workdir, "train.vit")
    target = task.model_config(cfg, args.exchange)
    if args.drop_rate:  # else the spec's own drop_rate (default 0)
      target = dataclasses.replace(
          target, exchange=dataclasses.replace(target.exchange, drop_rate=args.drop_rate))
    if args.class_token:
      target = dataclasses.replace(target, class_token=args.class_token)
    sync = cli.sync_from_flags(args)
    if sync is not None:
      target = dataclasses.replace(target, sync=sync)
    if args.model:
      model_cfg, model = target, vit_pretrained.load(cfg, target, require_head=True)
    else:
      cfg, model_cfg, model = task.restore_trained(args.workdir, target, args.step)
    split = data.load_image_dataset(cfg.dataset, args.data_dir, "test")
    result = task.evaluate(model, cfg, model_cfg, split, args.mesh, args.batch_size,
                           tensor=sync is not None)
  except ValueError as e:
    cli.fail(str(e))
  print(f"accuracy {result['accuracy']:.4f} on {result['examples']} test images, "
        f"{result['strategy']} ({result['parallelism']} parallel), mesh {args.mesh}, "
        f"{result['bytes_per_device']:,} bytes/device per image")
  cli.print_result(dict(result, **({"model": args.model} if args.model
                                   else {"workdir": args.workdir})), args.out)


def _pretrained_config(args):
  """The run config ``--model`` is evaluated as: configs/vit_pretrained on the
  dataset, at the model's image size, its images upsampled to fit."""
  from astra_jax.data import images as data
  from astra_jax.io import pretrained_vit
  from astra_jax.run import config
  if not pretrained_vit.is_spec(args.model):
    raise ValueError(f"--model {args.model!r} names no pretrained model; write hf:DIR")
  cfg = config.load("vit_pretrained", [])
  cfg.model, cfg.dataset = args.model, args.dataset
  split = data.load_image_dataset(cfg.dataset, args.data_dir, "test")
  cfg.channels, cfg.num_classes = int(split.images.shape[-1]), int(split.num_classes)
  cfg.image_size = args.image_size or pretrained_vit.image_size(args.model)
  cfg.upsample = max(1, cfg.image_size // max(split.images.shape[1:3]))
  return cfg


if __name__ == "__main__":
  cli.entry(main)
