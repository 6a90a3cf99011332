"""Sample images from a trained DiT run, sequence-parallel, into a labelled PNG grid.

  python -m infer.dit --workdir workdir/dit --mesh=4 --exchange vq:groups=32 --out grid.png
  python -m infer.dit --workdir workdir/dit --mesh=4 --exchange distrifusion:warmup=2
  python -m infer.dit --workdir workdir/dit --mesh=4 \\
      --exchange vq:groups=32,boundary_rows=1,refresh=2 --steps 20 --guidance 2

Each device holds a band of patch rows; the sampler is deterministic (Euler
steps of the rectified flow), so the same --seed gives the same noise and the
same images at any mesh with the exact exchange.  A ``vq`` exchange on a run
trained without one gets k-means codebooks fitted on the run's own K/V
(zero-shot, cached); a run fine-tuned with vq uses its own.  Exchange
options for images: ``boundary_rows=r`` (the r rows next to a band travel
exactly), ``refresh=k`` (codes re-sent every k steps), ``code_attention=true``
(attention over the received code tuples instead of tokens); baselines
``exact``, ``ring``, ``distrifusion:warmup=W``.

Prints one JSON object as its last line: the exchange, mesh, steps, guidance,
images, seconds (all of it) and sampling_s (the sampling runs, compile
excluded; per image with ``--batch-size 1``), ``bytes_per_device`` of one
sampling run of one image read from the compiled program, and
``bytes_per_device_formula`` with the formula.  Under ``infer.launch`` every
process joins each sampling run and process 0 writes the grid.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a run folder made by train.dit")
  p.add_argument("--mesh", type=cli.at_least(1), default=4, help="devices (bands of patch rows)")
  p.add_argument("--exchange", default=None,
                 help="exact | ring | distrifusion | vq, or a spec such as "
                      "vq:groups=32,boundary_rows=1 (default: the run's own)")
  p.add_argument("--steps", type=int, default=None,
                 help="Euler steps from noise to image (default: the run's sample_steps)")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale s >= 0 (1: conditional only; default: "
                      "the run's)")
  p.add_argument("--per-class", type=cli.at_least(1), default=8,
                 help="samples of each class (one grid row per class)")
  p.add_argument("--seed", type=cli.at_least(0), default=0, help="the noise's seed")
  p.add_argument("--batch-size", type=cli.at_least(1), default=100,
                 help="images per sampling run (1: one image at a time, as on an edge device)")
  p.add_argument("--step", type=cli.at_least(0), default=None,
                 help="checkpoint step (default latest)")
  p.add_argument("--data-dir", default=None, help="the dataset (for k-means calibration)")
  p.add_argument("--out", default="workdir/dit_samples.png", help="the PNG grid to write")
  p.add_argument("--json", default=None, help="also write the JSON result here")
  from astra_jax.parallel import distributed
  distributed.add_flags(p)
  return p.parse_args(argv)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.setup_devices(args)
  import time
  import jax
  import numpy as np
  from astra_jax.data import images as data
  from astra_jax.diffusion import grid, sample
  from astra_jax.run import workdir
  from astra_jax.run.tasks import dit as task

  try:
    if not args.out.lower().endswith(".png"):
      raise ValueError(f"--out {args.out} is not a .png file; name the grid FILE.png")
    cli.check_writable(args.out, "--out", directory=False)
    cfg = workdir.load_config(args.workdir, "dit")
    settings = sample.Sampling(args.steps if args.steps is not None else cfg.sample_steps,
                               args.guidance if args.guidance is not None else cfg.guidance)
    model_cfg, model = task.load_for_sampling(args.workdir, args.exchange, args.mesh,
                                              data_dir=args.data_dir, step=args.step)
    labels = np.repeat(np.arange(model_cfg.num_classes), args.per_class)
    start = time.perf_counter()
    images, traffic = task.generate(model, args.mesh, settings, labels, seed=args.seed,
                                    batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    split_shape = data.load_image_dataset(cfg.dataset, args.data_dir, "test").images.shape
    images = task.crop(images, split_shape[1], split_shape[2])
    names = [data.class_name(cfg.dataset, c) for c in range(model_cfg.num_classes)]
    if jax.process_index() == 0:  # every process holds the images; one writes them
      grid.save_grid(images, args.out, columns=args.per_class, row_labels=names)
  except ValueError as e:
    cli.fail(str(e))
  ex = model_cfg.exchange
  print(f"{len(labels)} images in {seconds:.1f} s ({settings.steps} steps, mesh {args.mesh}, "
        f"{ex.name}): {args.out}; {traffic['bytes_per_device']:,} bytes/device per image")
  cli.print_result({
      "exchange": ex.name, "spec": args.exchange or cfg.exchange, "mesh": args.mesh,
      "steps": settings.steps, "guidance": settings.guidance, "images": int(len(labels)),
      "seconds": round(seconds, 2), "sampling_s": traffic["sampling_s"],
      "sampling_s_per_image": round(traffic["sampling_s"] / len(labels), 4),
      "batch_size": min(args.batch_size, len(labels)), "out": args.out,
      "workdir": args.workdir,
      **{k: v for k, v in traffic.items() if k != "sampling_s"},
      "formula": task.FORMULA}, args.json)


if __name__ == "__main__":
  cli.entry(main)
