"""ViT on fake CPU devices: sequence-parallel exact equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.core import axes
from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.core import attention, exchange as ex
from astra_jax.models import vit

TOL = dict(rtol=1e-5, atol=1e-5)


def _model(cfg, seed=0):
  model = vit.ViT(cfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = apply.split_model(model)
  # non-trivial head (it is zero-initialised) so logits differ per class
  params = jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), params)
  return graphdef, params, rest


def _inputs(cfg, batch=4):
  imgs = jax.random.normal(jax.random.PRNGKey(7), (batch, cfg.image_size, cfg.image_size,
                                                   cfg.channels))
  return vit.patchify(imgs, cfg.patch), jnp.arange(cfg.num_patches)


def _run(cfg, graphdef, params, rest, mesh_size, train=False):
  mesh = None if mesh_size is None else mesh_lib.make_seq_mesh(mesh_size)
  fn = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=train)
  return jax.jit(fn)(params, rest, *_inputs(cfg))


@pytest.mark.parametrize("class_token", ["distributed", "single"])
def test_exact_sequence_parallel_equals_single_device(class_token):
  cfg = vit.ViTConfig(class_token=class_token)
  graphdef, params, rest = _model(cfg)
  ref, _, _ = _run(cfg, graphdef, params, rest, None)
  assert float(jnp.abs(ref).max()) > 0.1
  for p in (1, 2, 4):
    out, _, aux = _run(cfg, graphdef, params, rest, p)
    np.testing.assert_allclose(out, ref, **TOL)
    assert float(aux) == 0.0


def test_gradients_equal_single_device():
  cfg = vit.ViTConfig()
  graphdef, params, rest = _model(cfg)
  patches, pos = _inputs(cfg)
  labels = jnp.arange(4) % 10

  def loss(params, mesh):
    fn = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=True)
    logits, _, aux = fn(params, rest, patches, pos)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]) + aux

  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, None)
  g4 = jax.jit(jax.grad(loss), static_argnums=1)(params, mesh_lib.make_seq_mesh(4))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, **TOL)


def test_vq_training_step_updates_codebooks_and_reports_commitment():
  cfg = vit.ViTConfig(exchange=ex.make_exchange("vq", groups=16, codebook_size=64))
  graphdef, params, rest = _model(cfg)
  out, new_rest, aux = _run(cfg, graphdef, params, rest, 4, train=True)
  assert out.shape == (4, 10) and float(aux) > 0
  old = nnx.state(nnx.merge(graphdef, params, rest), attention.ExchangeState)
  new = nnx.state(nnx.merge(graphdef, params, new_rest), attention.ExchangeState)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))]
  assert any(changed)
  # inference is deterministic and does not touch the state
  a, rest_a, aux_a = _run(cfg, graphdef, params, rest, 4)
  b, _, _ = _run(cfg, graphdef, params, rest, 4)
  np.testing.assert_array_equal(a, b)
  assert float(aux_a) == 0.0


def test_single_and_distributed_class_tokens_differ_only_with_lossy_exchange():
  lossy = ex.make_exchange("vq", groups=4, codebook_size=4)
  outs = {}
  for ct in ("distributed", "single"):
    cfg = vit.ViTConfig(class_token=ct, exchange=lossy)
    graphdef, params, rest = _model(cfg)
    outs[ct] = _run(cfg, graphdef, params, rest, 4)[0]
    np.testing.assert_allclose(_run(cfg, graphdef, params, rest, None)[0],
                               _run(vit.ViTConfig(class_token="distributed"),
                                    *_model(vit.ViTConfig()), None)[0], **TOL)
  assert float(jnp.abs(outs["distributed"] - outs["single"]).max()) > 1e-4


def test_private_tokens_never_cross_the_mesh():
  # a private token's K/V changes must not affect other devices' outputs
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 2, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 2, 4))
  exact = ex.make_exchange("exact")
  mesh = mesh_lib.make_seq_mesh(2)
  fn = jax.jit(mesh_lib.sequence_parallel(
      lambda q, k: attention.attend(exact, (), q, k, k, causal=False, private=1,
                                    axis_name=axes.current_seq_axis())[0],
      mesh, in_seq_dims=(1, 1), out_seq_dims=1))
  base = fn(q, k)
  bumped = fn(q, k.at[:, 4].add(10.0))  # device 1's private token
  np.testing.assert_array_equal(base[:, :4], bumped[:, :4])
  assert float(jnp.abs(base[:, 4:] - bumped[:, 4:]).max()) > 1e-3
  with pytest.raises(ValueError, match="bidirectional"):
    attention.attend(exact, (), q, k, k, causal=True, private=1)


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "XL/4"}, "unknown ViT variant"), ({"variant": "mu/5"}, "not a multiple"),
    ({"class_token": "many"}, "class_token must be")])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vit.ViTConfig(**kwargs)


def test_mesh_must_divide_patches():
  cfg = vit.ViTConfig()  # 64 patches
  graphdef, params, rest = _model(cfg)
  with pytest.raises(ValueError, match="not divisible by the mesh size 3"):
    _run(cfg, graphdef, params, rest, 3)
