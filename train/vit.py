"""Train a ViT sequence-parallel: ``python -m train.vit --mesh=4``.

  --config NAME      a module in configs/ with get_config() (default vit_fashion_mnist)
  --workdir DIR      config.json, checkpoints/, metrics.jsonl; rerunning resumes
  --init-from DIR    start from another run's weights (ASTRA fine-tuning: with
                     --config.exchange=vq the codebooks start from k-means on
                     that model's own K/V)
  --config.KEY=VAL   typed overrides, e.g. --config.epochs=1 --config.vq.groups=16

The last line printed is one JSON object with the test accuracy.
"""

from __future__ import annotations

import sys

from astra_jax import cli


def main(argv=None):
  args, overrides = cli.train_args(
      sys.argv[1:] if argv is None else argv, config="vit_fashion_mnist",
      workdir="workdir/vit", description="Train a ViT with ASTRA sequence parallelism.",
      extra=lambda p: p.add_argument("--data-dir", default=None,
                                     help="folder with the dataset files"))
  cli.ensure_cpu_devices(args.mesh)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from astra_jax import apply, calibrate, checkpoint, config, training, workdir
  from astra_jax import mesh as mesh_lib
  from astra_jax.data import images as data
  from astra_jax.tasks import vit as task

  try:
    cfg = config.load(args.config, overrides)
    train_split = data.load_image_dataset(cfg.dataset, args.data_dir, "train")
    test_split = data.load_image_dataset(cfg.dataset, args.data_dir, "test")
    cfg.channels = int(train_split.images.shape[-1])
    cfg.num_classes = int(train_split.num_classes)
    model_cfg = task.model_config(cfg)
    task.check_mesh(model_cfg, args.mesh)
    mesh = mesh_lib.seq_mesh_or_none(args.mesh)
    ckpt = checkpoint.Checkpointer(workdir.checkpoint_dir(args.workdir),
                                   save_every=cfg.checkpoint_every)
    positions = jnp.arange(model_cfg.num_patches)
    steps_per_epoch = len(train_split.labels) // cfg.batch_size

    def batch(step):
      epoch, index = divmod(step, steps_per_epoch)  # one permutation per epoch
      order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_split.labels))
      idx = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
      images = train_split.images[idx]
      if cfg.augment:
        images = data.augment_flip_crop(images, np.random.default_rng([cfg.seed, step]))
      return ((task.prepare(images, cfg, model_cfg.patch), positions),
              jnp.asarray(train_split.labels[idx]))

    if args.init_from and ckpt.latest_step() is None:
      _, _, model = task.restore_trained(args.init_from, model_cfg)
      if cfg.exchange == "vq":
        calib = (batch(steps_per_epoch * 10**6 + i)[0] for i in range(steps_per_epoch))
        calibrate.kmeans_codebooks(model, calib, jax.random.PRNGKey(cfg.seed),
                                   max_tokens=cfg.get("kmeans_tokens", 4096))
        print(f"codebooks initialised by k-means on {args.init_from}'s K/V", flush=True)
    else:
      model = task.build(model_cfg, cfg.seed)
    total = steps_per_epoch * cfg.epochs
    if args.max_steps is not None:
      total = min(total, args.max_steps)
    tx = training.make_optimizer(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 warmup_steps=cfg.warmup_steps, total_steps=total)
    graphdef, params, rest = apply.split_model(model)
    state = training.resume(ckpt, training.init_state(params, rest, tx), args.workdir)
  except ValueError as e:
    cli.fail(str(e))
  workdir.save_config(args.workdir, cfg)
  state = mesh_lib.replicate(state, mesh)

  step_fn = training.make_train_step(
      apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=True),
      training.classification_loss, tx)
  log = training.MetricsLog(args.workdir)
  state = training.fit(step_fn, state, total=total, batch_fn=batch, ckpt=ckpt, log=log,
                       log_every=cfg.log_every, items_per_step=cfg.batch_size)
  ckpt.close()

  model = nnx.merge(graphdef, state.params, state.rest)
  result = task.evaluate(model, cfg, model_cfg, test_split, args.mesh, cfg.eval_batch_size)
  log.write(total, test_accuracy=result["accuracy"])
  cli.print_result(dict(result, steps=total, workdir=args.workdir))


if __name__ == "__main__":
  main()
