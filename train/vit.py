"""Train a ViT sequence-parallel: ``python -m train.vit --mesh=4``.

Options: --config NAME (a module in configs/, default vit_fashion_mnist),
--workdir DIR (checkpoints + metrics.jsonl; rerunning with the same DIR
resumes), --data-dir DIR, --exchange-from-config overrides such as
--config.exchange=vq --config.vq.groups=16 --config.epochs=1.
The last line printed is one JSON object with the test accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys

from astra_jax import cli


def parse(argv):
  p = argparse.ArgumentParser(description="Train a ViT with ASTRA sequence parallelism.")
  p.add_argument("--config", default="vit_fashion_mnist")
  p.add_argument("--mesh", type=int, default=4, help="devices on the seq axis")
  p.add_argument("--workdir", default="workdir/vit")
  p.add_argument("--data-dir", default=None, help="folder with the dataset files")
  p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
  return p.parse_known_args(argv)


def build(cfg, mesh_size):
  """(ViTConfig, graphdef, params, rest, apply_fn) for a config."""
  import jax
  from flax import nnx
  from astra_jax import apply, exchange, mesh as mesh_lib
  from astra_jax.models import vit

  options = dict(cfg.vq) if cfg.exchange == "vq" else {}
  model_cfg = vit.ViTConfig(variant=cfg.variant, image_size=cfg.image_size,
                            class_token=cfg.class_token,
                            exchange=exchange.make_exchange(cfg.exchange, **options))
  model = vit.ViT(model_cfg, rngs=nnx.Rngs(cfg.seed))
  graphdef, params, rest = apply.split_model(model)
  mesh = mesh_lib.make_seq_mesh(mesh_size) if mesh_size > 1 else None
  mesh_lib.check_divisible(model_cfg.num_patches, mesh_size, what="patch sequence")
  return model_cfg, graphdef, params, rest, mesh


def main(argv=None):
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  cli.ensure_cpu_devices(args.mesh)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from tqdm import tqdm
  from astra_jax import apply, checkpoint, config, training
  from astra_jax import mesh as mesh_lib
  from astra_jax.data import images as data
  from astra_jax.models import vit

  try:
    cfg = config.load(args.config, overrides)
    train_split = data.load_image_dataset(cfg.dataset, args.data_dir, "train")
    test_split = data.load_image_dataset(cfg.dataset, args.data_dir, "test")
    model_cfg, graphdef, params, rest, mesh = build(cfg, args.mesh)
  except ValueError as e:
    cli.fail(str(e))

  def prepare(images):
    x = data.normalize(data.pad_to(images, cfg.image_size), cfg.dataset)
    return vit.patchify(jnp.asarray(x), model_cfg.patch)

  positions = jnp.arange(model_cfg.num_patches)
  steps_per_epoch = len(train_split.labels) // cfg.batch_size
  total = steps_per_epoch * cfg.epochs
  if args.max_steps:
    total = min(total, args.max_steps)
  tx = training.make_optimizer(lr=cfg.lr, weight_decay=cfg.weight_decay,
                               warmup_steps=cfg.warmup_steps, total_steps=total)
  state = training.init_state(params, rest, tx)
  ckpt = checkpoint.Checkpointer(os.path.join(args.workdir, "checkpoints"),
                                 save_every=cfg.checkpoint_every)
  start = ckpt.latest_step()
  if start is not None:
    try:
      state = ckpt.restore(jax.eval_shape(lambda: state))
    except ValueError as e:
      cli.fail(str(e))
    print(f"resuming from step {start} in {args.workdir}")
  state = mesh_lib.replicate(state, mesh)

  def loss_fn(logits, labels):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  train_apply = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=True)
  step_fn = training.make_train_step(train_apply, loss_fn, tx)
  log = training.MetricsLog(args.workdir)
  first = int(state.step)
  epoch_batches, batches_epoch = None, None
  bar = tqdm(range(first, total), initial=first, total=total, desc="train", unit="step")
  for step in bar:
    epoch, index = divmod(step, steps_per_epoch)
    if batches_epoch != epoch:
      # the same permutation for an epoch, whether it started here or was resumed
      order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_split.labels))
      epoch_batches = order[: steps_per_epoch * cfg.batch_size].reshape(steps_per_epoch, -1)
      batches_epoch = epoch
    idx = epoch_batches[index]
    images = data.augment_flip_crop(train_split.images[idx],
                                    np.random.default_rng([cfg.seed, step]))
    state, metrics = step_fn(state, (prepare(images), positions),
                             jnp.asarray(train_split.labels[idx]))
    if (step + 1) % cfg.log_every == 0 or step + 1 == total:
      m = jax.device_get(metrics)
      bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}")
      log.write(step + 1, epoch=epoch, **m, images_per_s=bar.format_dict["rate"] and
                bar.format_dict["rate"] * cfg.batch_size)
    ckpt.save(step + 1, state)
  ckpt.save(total, state, force=ckpt.latest_step() != total)
  ckpt.wait()

  eval_apply = jax.jit(apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=False))
  correct = 0
  for images, labels in data.batches(test_split, cfg.eval_batch_size, rng=None,
                                     drop_remainder=False):
    logits, _, _ = eval_apply(state.params, state.rest, prepare(images), positions)
    correct += int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(labels)))
  accuracy = correct / len(test_split.labels)
  log.write(total, test_accuracy=accuracy)
  ckpt.close()
  cli.print_result({"accuracy": accuracy, "exchange": cfg.exchange, "mesh": args.mesh,
                    "steps": total, "examples": len(test_split.labels),
                    "workdir": args.workdir})


if __name__ == "__main__":
  main()
