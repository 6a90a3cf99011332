"""Tensor parallelism and its compressed all-reduces (SPD, Flash Communication)
against single-device references."""

import dataclasses

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from astra_jax.parallel import apply
from astra_jax.core import sync as tp
from astra_jax.core.axes import TP_AXIS
from astra_jax.parallel.tensor_apply import make_tp_mesh, tensor_apply
from astra_jax.netsim import traffic
from astra_jax.models import gpt2, llama, vit

TOL = dict(rtol=1e-5, atol=1e-5)
GPT2 = gpt2.GPT2Config(variant="custom", width=32, layers=3, heads=4, vocab_size=64,
                       context=16)
LLAMA = llama.LlamaConfig(variant="nano", vocab_size=64, context=16)  # 4 heads, 2 K/V heads
VIT = vit.ViTConfig(variant="mu/4", image_size=16, num_classes=10)  # 16 patches, 4 heads


def _inputs(cfg, batch=2):
  key = jax.random.PRNGKey(1)
  if isinstance(cfg, vit.ViTConfig):
    patches = jax.random.normal(key, (batch, cfg.num_patches, cfg.patch ** 2 * cfg.channels))
    return patches, jnp.arange(cfg.num_patches)
  tokens = jax.random.randint(key, (batch, cfg.context), 0, cfg.vocab_size)
  return tokens, jnp.arange(cfg.context)


def _build(cfg, seed=0):
  cls = {gpt2.GPT2Config: gpt2.GPT2, llama.LlamaConfig: llama.Llama, vit.ViTConfig: vit.ViT}
  return cls[type(cfg)](cfg, rngs=nnx.Rngs(seed))


def _forward(model, size, train=False):
  """(jitted apply over ``size`` tp devices or None for one device, params, rest)."""
  graphdef, params, rest = apply.split_model(model)
  mesh = None if size is None else make_tp_mesh(size)
  fn = tensor_apply(graphdef, mesh, model.tensor_layout(), inputs=2, train=train)
  return jax.jit(fn), params, rest


def _outputs(model, size, inputs):
  fn, params, rest = _forward(model, size)
  return fn(params, rest, *inputs)[0]


@pytest.mark.parametrize("cfg,size", [(GPT2, 2), (GPT2, 4), (VIT, 4), (LLAMA, 2),
                                      (LLAMA, 4)], ids=["gpt2-2", "gpt2-4", "vit-4",
                                                        "llama-2", "llama-4-kv-repeat"])
def test_tensor_parallel_equals_single_device(cfg, size):
  model, inputs = _build(cfg), _inputs(cfg)
  reference = _outputs(model, None, inputs)
  np.testing.assert_allclose(_outputs(model, size, inputs), reference, **TOL)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_tensor_parallel_gradients_equal_single_device(cfg):
  model, (tokens, positions) = _build(cfg), _inputs(cfg)

  def loss_grads(size):
    fn, params, rest = _forward(model, size)
    loss = lambda p: jnp.mean(fn(p, rest, tokens, positions)[0] ** 2)
    return jax.jit(jax.grad(loss))(params)

  for got, want in zip(jax.tree.leaves(loss_grads(4 if cfg is GPT2 else 2)),
                       jax.tree.leaves(loss_grads(None))):
    np.testing.assert_allclose(got, want, **TOL)


def test_spd_without_drops_is_exact_and_drops_change_only_the_dropped_blocks():
  tokens, positions = _inputs(GPT2)
  base = _build(GPT2)
  exact = _outputs(base, 4, (tokens, positions))
  none = _build(dataclasses.replace(GPT2, sync=tp.make_sync("spd")))
  np.testing.assert_allclose(_outputs(none, 4, (tokens, positions)), exact, **TOL)
  dropped = _build(dataclasses.replace(GPT2, sync=tp.from_spec("spd:drop=1")))
  out = _outputs(dropped, 4, (tokens, positions))
  assert float(jnp.max(jnp.abs(out - exact))) > 1e-3  # a dropped sync is an approximation
  np.testing.assert_allclose(_outputs(dropped, None, (tokens, positions)),
                             _outputs(base, None, (tokens, positions)), **TOL)


def _spd_block_reference(block, x, size):
  """SPD's block, written per device with explicit head/column slices on one device:
  out = x + sum_r (a_r + mlp_r(x + a_r)), a_r = device r's heads through its rows of
  the projection (plus bias / P), mlp_r its MLP columns."""
  width = x.shape[-1]
  heads = width // block.head_dim
  hd, hl = block.head_dim, heads // size
  q, k, v = block._qkv(x)
  attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, H, Dh]
  wp, bp = block.c_proj.kernel[...], block.c_proj.bias[...]
  wfc, bfc = block.c_fc.kernel[...], block.c_fc.bias[...]
  w2, b2 = block.mlp_proj.kernel[...], block.mlp_proj.bias[...]
  cols = wfc.shape[1] // size
  total = x
  for r in range(size):
    heads_r = attn[:, :, r * hl:(r + 1) * hl].reshape(*x.shape[:2], hl * hd)
    a_r = heads_r @ wp[r * hl * hd:(r + 1) * hl * hd] + bp / size
    h = block.ln_2(x + a_r)
    c = slice(r * cols, (r + 1) * cols)
    m_r = jax.nn.gelu(h @ wfc[:, c] + bfc[c], approximate=True) @ w2[c] + b2 / size
    total = total + a_r + m_r
  return total


def test_spd_block_matches_its_per_device_formula():
  cfg = dataclasses.replace(GPT2, sync=tp.from_spec("spd:drop=0"))
  block = gpt2.Block(cfg, 0, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, cfg.context, 32))
  graphdef, params, rest = apply.split_model(block)
  fn = tensor_apply(graphdef, make_tp_mesh(4), _build(cfg).tensor_layout(), inputs=1)
  got = jax.jit(fn)(params, rest, x)[0]
  np.testing.assert_allclose(got, _spd_block_reference(block, x, 4), **TOL)


def _all_reduce(sync, x, size):
  mesh = make_tp_mesh(size)
  f = jax.shard_map(lambda y: sync.all_reduce(y[0], TP_AXIS), mesh=mesh,
                    in_specs=PartitionSpec(TP_AXIS), out_specs=PartitionSpec())
  return jax.jit(f)(x)


@pytest.mark.parametrize("bits", [4, 8])
def test_flash_all_reduce_error_is_within_its_quantization_bound(bits):
  size, group = 4, 32
  x = jax.random.normal(jax.random.PRNGKey(0), (size, 3, 40))  # 120 values: padded to 128
  got = _all_reduce(tp.make_sync("flash", bits=bits, group_size=group), x, size)
  want = x.sum(0)
  # per value: P first-step errors of half a step of each sender's group, then half
  # a step of the reduced group; a step is the group's range / (2^bits - 1)
  flat = jnp.pad(x.reshape(size, -1), ((0, 0), (0, 8))).reshape(size, size, -1, group)
  step1 = (flat.max(-1) - flat.min(-1)) / (2 ** bits - 1)  # [sender, chunk, group]
  bound1 = jnp.repeat(step1.sum(0) / 2, group, axis=-1).reshape(-1)[:120]
  range2 = jnp.pad(want.reshape(-1), (0, 8)).reshape(-1, group)
  # the reduced group's range grows by at most the first step's errors
  step2 = (range2.max(-1) - range2.min(-1) + step1.sum(0).reshape(-1)) / (2 ** bits - 1)
  bound = bound1 + jnp.repeat(step2 / 2, group)[:120] + 1e-2 * jnp.abs(want.reshape(-1))
  err = jnp.abs(got - want).reshape(-1)
  assert bool(jnp.all(err <= bound)), float(jnp.max(err - bound))
  assert float(jnp.max(err)) > 0  # it is lossy
  assert float(jnp.mean(err)) < (0.05 if bits == 8 else 0.6)


def test_flash_all_reduce_of_group_constant_values_is_exact():
  x = jnp.broadcast_to(jnp.arange(4.0)[:, None, None], (4, 8, 32))  # one value per group
  got = _all_reduce(tp.make_sync("flash", bits=4, group_size=32), x, 4)
  np.testing.assert_allclose(got, jnp.full((8, 32), 6.0), **TOL)


def _hlo(cfg, size):
  model = _build(cfg)
  fn, params, rest = _forward(model, size)
  tokens = jax.ShapeDtypeStruct((1, cfg.context), jnp.int32)
  return traffic.compiled_traffic(fn, params, rest, tokens, jnp.arange(cfg.context))


@pytest.mark.parametrize("spec,all_reduces", [("tp", 6), ("spd:drop=0+2", 4)])
def test_tensor_parallel_traffic_matches_formula(spec, all_reduces):
  cfg = dataclasses.replace(GPT2, sync=tp.from_spec(spec))
  report = _hlo(cfg, 4)
  kinds = report.by_kind()
  assert set(kinds) == {"all-reduce"}, kinds
  values = cfg.context * 32  # one example: T x D float32 per all-reduce
  assert kinds["all-reduce"]["count"] == all_reduces
  assert report.bytes_per_device == all_reduces * cfg.sync.all_reduce_bytes(values, 4)


@pytest.mark.parametrize("bits,group", [(4, 128), (8, 32)])
def test_flash_traffic_matches_formula(bits, group):
  cfg = dataclasses.replace(GPT2, sync=tp.make_sync("flash", bits=bits, group_size=group))
  report = _hlo(cfg, 4)
  kinds = report.by_kind()
  assert set(kinds) == {"all-to-all", "all-gather"}, kinds
  syncs = 2 * 3  # two per block
  assert kinds["all-to-all"]["count"] == kinds["all-gather"]["count"] == 2 * syncs
  values = cfg.context * 32
  assert report.bytes_per_device == syncs * cfg.sync.all_reduce_bytes(values, 4)
  exact = tp.make_sync("tp").all_reduce_bytes(values, 4)
  chunk = values // 4
  per_chunk = chunk * bits // 8 + 4 * chunk // group
  assert cfg.sync.all_reduce_bytes(values, 4) == 5 * per_chunk < exact


def test_errors_name_the_fix():
  with pytest.raises(ValueError, match="4 heads do not split over 8"):
    _forward(_build(GPT2), 8)[0](*_forward(_build(GPT2), None)[1:], *_inputs(GPT2))
  with pytest.raises(ValueError, match="model has 3 blocks"):
    dataclasses.replace(GPT2, sync=tp.from_spec("spd:drop=5"))
  with pytest.raises(ValueError, match="INT4 default"):
    tp.from_spec("flash:bits=3")
  with pytest.raises(ValueError, match="unknown tensor-parallel sync"):
    tp.from_spec("megatron")
  with pytest.raises(ValueError, match="block indices"):
    tp.from_spec("spd:drop=a+b")


def test_spd_classes_and_budget_pick():
  from astra_jax.parallel import spd
  assert [spd.classify(c, 0.01, 0.1) for c in (0.0, 0.01, 0.05, 0.2)] == [
      "insensitive", "insensitive", "sensitive", "extremely sensitive"]
  sens = [spd.Sensitivity(b, 0.0, c, spd.classify(c, 0.01, 0.1))
          for b, c in enumerate([0.5, 0.05, 0.002, 0.02, 0.0])]
  assert spd.pick(sens, 2) == ((2, 4), ())  # insensitive first
  assert spd.pick(sens, 3) == ((2, 3, 4), (3,))  # then the least sensitive, distilled
  assert spd.pick(sens, 4) == ((1, 2, 3, 4), (1, 3))
  with pytest.raises(ValueError, match="between 0 and 4"):
    spd.pick(sens, 5)  # block 0 is extremely sensitive: never dropped


def test_spd_block_io_and_distillation_reduce_the_block_error():
  from astra_jax.parallel import spd
  cfg = dataclasses.replace(GPT2, sync=tp.from_spec("spd:drop=1"))
  teacher, student = _build(GPT2), _build(cfg)
  tokens, positions = _inputs(GPT2)
  x, y = spd.block_io(teacher, 1, (tokens, positions))
  np.testing.assert_allclose(teacher.h[1](x), y, **TOL)
  assert isinstance(spd.blocks(teacher)[1], gpt2.Block)  # the recorder is gone again
  xs, ys = x[None], y[None]
  _, fit = spd.distill(spd.blocks(student)[1], student.tensor_layout(), xs, ys, mesh_size=4,
                       steps=20, lr=1e-3)
  assert fit["mse_after"] < 0.5 * fit["mse_before"]


def test_int8_weights_are_refused_with_the_fix():
  model = _build(dataclasses.replace(LLAMA, quantize_int8=True))
  fn, params, rest = _forward(model, 2)
  with pytest.raises(ValueError, match="run --tp on a float model"):
    fn(params, rest, *_inputs(LLAMA))
