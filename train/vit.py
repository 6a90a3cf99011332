"""Train a ViT sequence-parallel: ``python -m train.vit --mesh=4``.

  --config NAME      a module in configs/ with get_config() (default vit_fashion_mnist)
  --workdir DIR      config.json, checkpoints/, metrics.jsonl; rerunning resumes
                     (one trainer at a time: a second one is refused, naming the first)
  --init-from SRC    start from another run's weights (ASTRA fine-tuning: with
                     --config.exchange=vq the codebooks start from k-means on
                     that model's own K/V), or a pretrained image model: hf:DIR
                     (transformers ViT / DINOv2), onnx:FILE (a DINOv2 ONNX
                     backbone) or dinov2-s (bundled); --config then defaults to
                     vit_pretrained (--config.new_head=true: a fresh head)
  --config.KEY=VALUE typed overrides, e.g. --config.epochs=1 --config.vq.groups=16
  --show-config      print every key (KEY: TYPE = VALUE, overrides applied) and exit

The last line printed is one JSON object with the test accuracy.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli


CONFIG = "vit_fashion_mnist"


def main(argv=None):
  args, overrides = cli.train_args(
      sys.argv[1:] if argv is None else argv, config=CONFIG,
      workdir="workdir/vit", description="Train a ViT with ASTRA sequence parallelism.",
      extra=lambda p: p.add_argument("--data-dir", default=None,
                                     help="folder with the dataset files"))
  if args.show_config:
    cli.show_config(_config_name(args), overrides)
  cli.setup_devices(args)
  import jax.numpy as jnp
  import numpy as np
  from astra_jax.io import checkpoint
  from astra_jax.run import config, recipe, training, workdir
  from astra_jax.parallel import mesh as mesh_lib
  from astra_jax.data import images as data
  from astra_jax.run.tasks import vit as task, vit_pretrained

  try:
    cfg = config.load(_config_name(args), overrides)
    pretrained = vit_pretrained.use(cfg, args.init_from)  # the spec to load, if any
    training.check_settings(
        cfg, at_least_1=("epochs", "batch_size", "checkpoint_every", "log_every",
                         "eval_batch_size"),
        positive=("lr",), non_negative=("weight_decay", "warmup_steps"))
    cli.check_writable(args.workdir, "--workdir", directory=True)
    train_split = data.load_image_dataset(cfg.dataset, args.data_dir, "train")
    test_split = data.load_image_dataset(cfg.dataset, args.data_dir, "test")
    cfg.channels = int(train_split.images.shape[-1])
    cfg.num_classes = int(train_split.num_classes)
    model_cfg = task.model_config(cfg)
    task.check_mesh(model_cfg, args.mesh)
    if pretrained:
      vit_pretrained.check(cfg, model_cfg)  # e.g. its classes vs the data's
    task.prepare(train_split.images[:1], cfg, model_cfg.patch)  # upsample / image_size fit
    steps_per_epoch = len(train_split.labels) // cfg.batch_size
    if steps_per_epoch == 0:
      raise ValueError(f"--config.batch_size={cfg.batch_size} is more than the "
                       f"{len(train_split.labels)} training images; pass a smaller one")
    mesh = mesh_lib.seq_mesh_or_none(args.mesh)
    workdir.lock(args.workdir)  # inputs checked; the first write: one trainer per folder
    ckpt = checkpoint.Checkpointer(workdir.checkpoint_dir(args.workdir),
                                   save_every=cfg.checkpoint_every)
    positions = jnp.arange(model_cfg.num_patches)

    def batch(step):
      epoch, index = divmod(step, steps_per_epoch)  # one permutation per epoch
      order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_split.labels))
      idx = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
      images = train_split.images[idx]
      if cfg.augment:
        images = data.augment_flip_crop(images, np.random.default_rng([cfg.seed, step]))
      return ((task.prepare(images, cfg, model_cfg.patch), positions),
              jnp.asarray(train_split.labels[idx]))

    model = recipe.start_model(
        init_from=pretrained or args.init_from, ckpt=ckpt,
        build=lambda: task.build(model_cfg, cfg.seed),
        restore=(lambda spec: vit_pretrained.load(cfg, model_cfg)) if pretrained
        else (lambda run: task.restore_trained(run, model_cfg)[2]), exchange=cfg.exchange,
        calib_batches=lambda: (batch(steps_per_epoch * 10**6 + i)[0]  # an unseen permutation
                               for i in range(steps_per_epoch)),
        seed=cfg.seed, kmeans_tokens=cfg.get("kmeans_tokens", 4096))
    total, tx = recipe.plan(cfg, steps_per_epoch, args.max_steps)
  except ValueError as e:
    cli.fail(str(e))
  try:
    model = recipe.train(model, tx, cfg=cfg, run=args.workdir, mesh=mesh, ckpt=ckpt,
                         total=total, batch_fn=batch, out_seq_dim=None,
                         items_per_step=cfg.batch_size)
  except training.Stopped as e:  # a signal (checkpoint saved) or a non-finite loss
    cli.fail(str(e), e.code)
  except (checkpoint.CheckpointError, OSError) as e:
    cli.fail(str(e))
  result = task.evaluate(model, cfg, model_cfg, test_split, args.mesh, cfg.eval_batch_size)
  training.MetricsLog(args.workdir).write(total, test_accuracy=result["accuracy"])
  cli.print_result(dict(result, steps=total, workdir=args.workdir))


def _config_name(args) -> str:
  """A pretrained start (or a run made from one) takes configs/vit_pretrained
  unless --config names another."""
  if not args.init_from or args.config != CONFIG:
    return args.config
  from astra_jax.run.tasks import vit_pretrained  # (imports jax)
  return vit_pretrained.config_name(args.init_from, args.config, CONFIG)


if __name__ == "__main__":
  cli.entry(main)
