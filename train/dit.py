"""Train a class-conditional DiT by flow matching: ``python -m train.dit --mesh=4``.

  --config NAME      a module in configs/ with get_config() (default dit_fashion_mnist)
  --workdir DIR      config.json, checkpoints/, metrics.jsonl; rerunning resumes
                     (one trainer at a time)
  --init-from RUN    start from another DiT run's weights (with
                     --config.exchange=vq: codebooks from k-means on its K/V,
                     then ASTRA fine-tuning)
  --config.KEY=VALUE typed overrides, e.g. --config.epochs=1 --config.width=64
  --show-config      print every key and exit

The last line printed is one JSON object with the final training loss.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli

CONFIG = "dit_fashion_mnist"


def main(argv=None):
  args, overrides = cli.train_args(
      sys.argv[1:] if argv is None else argv, config=CONFIG, workdir="workdir/dit",
      description="Train a DiT (flow matching) with ASTRA sequence parallelism.",
      extra=lambda p: p.add_argument("--data-dir", default=None,
                                     help="folder with the dataset files"))
  if args.show_config:
    cli.show_config(args.config, overrides)
  cli.setup_devices(args)
  from astra_jax.io import checkpoint
  from astra_jax.data import images as data
  from astra_jax.parallel import mesh as mesh_lib
  from astra_jax.run import config, recipe, training, workdir
  from astra_jax.run.tasks import dit as task

  try:
    cfg = config.load(args.config, overrides)
    if "sample_steps" not in cfg:
      raise ValueError(f"--config {args.config} is not a DiT config (no sample_steps); use "
                       f"--config {CONFIG}")
    training.check_settings(
        cfg, at_least_1=("epochs", "batch_size", "checkpoint_every", "log_every",
                         "sample_steps"),
        positive=("lr",), non_negative=("weight_decay", "warmup_steps", "class_dropout"))
    cli.check_writable(args.workdir, "--workdir", directory=True)
    train_split = data.load_image_dataset(cfg.dataset, args.data_dir, "train")
    cfg.channels = int(train_split.images.shape[-1])
    cfg.num_classes = int(train_split.num_classes)
    model_cfg = task.model_config(cfg)
    task.check_mesh(model_cfg, args.mesh)
    task.to_unit(train_split.images[:1], cfg.image_size)  # the images fit image_size
    steps_per_epoch = len(train_split.labels) // cfg.batch_size
    if steps_per_epoch == 0:
      raise ValueError(f"--config.batch_size={cfg.batch_size} is more than the "
                       f"{len(train_split.labels)} training images; pass a smaller one")
    mesh = mesh_lib.seq_mesh_or_none(args.mesh)
    workdir.lock(args.workdir)
    ckpt = checkpoint.Checkpointer(workdir.checkpoint_dir(args.workdir),
                                   save_every=cfg.checkpoint_every)
    batch = lambda step: task.training_batch(train_split, cfg, model_cfg, step, steps_per_epoch)
    model = recipe.start_model(
        init_from=args.init_from, ckpt=ckpt, build=lambda: task.build(model_cfg, cfg.seed),
        restore=lambda run: task.restore_trained(run, model_cfg)[2], exchange=cfg.exchange,
        calib_batches=lambda: task.calibration_batches(train_split, cfg, model_cfg,
                                                       steps_per_epoch),
        seed=cfg.seed, kmeans_tokens=cfg.get("kmeans_tokens", 4096))
    total, tx = recipe.plan(cfg, steps_per_epoch, args.max_steps)
  except ValueError as e:
    cli.fail(str(e))
  try:
    recipe.train(model, tx, cfg=cfg, run=args.workdir, mesh=mesh, ckpt=ckpt, total=total,
                 batch_fn=batch, out_seq_dim=1, items_per_step=cfg.batch_size,
                 in_seq_dims=(1, 0, None, None), loss_fn=task.mse_loss)
  except training.Stopped as e:
    cli.fail(str(e), e.code)
  except (checkpoint.CheckpointError, OSError) as e:
    cli.fail(str(e))
  cli.print_result({"loss": _last_loss(args.workdir), "steps": total,
                    "workdir": args.workdir, "mesh": args.mesh, "exchange": cfg.exchange})


def _last_loss(run: str) -> float | None:
  """The training loss of the last logged step (metrics.jsonl)."""
  import json
  import os
  path = os.path.join(run, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  losses = [r["loss"] for r in rows if r.get("loss") is not None]
  return losses[-1] if losses else None


if __name__ == "__main__":
  cli.entry(main)
