"""The train step donates its state: one state in memory, never the model's own arrays."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astra_jax.core import exchange
from astra_jax.models import llama
from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.run import training


def _llama(exchange_name="vq"):
  ex = exchange.make_exchange(exchange_name, **({"groups": 4, "codebook_size": 16}
                                                 if exchange_name == "vq" else {}))
  cfg = llama.LlamaConfig(variant="custom", vocab_size=64, context=32, exchange=ex, width=32,
                          layers=2, heads=2, kv_heads=1, mlp_dim=48)
  return llama.Llama(cfg, rngs=nnx.Rngs(0))


def _step_and_state(model, mesh_size):
  tx = training.make_optimizer(lr=1e-3, weight_decay=0.0, warmup_steps=1, total_steps=4)
  graphdef, params, rest = apply.split_model(model)
  mesh = mesh_lib.seq_mesh_or_none(mesh_size)
  state = mesh_lib.replicate(training.owned(training.init_state(params, rest, tx)), mesh)
  step = training.make_train_step(
      apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=True, out_seq_dim=1),
      training.classification_loss, tx)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 32)).astype(np.int32)
  batch = mesh_lib.to_global(((tokens, jnp.arange(32)), tokens), mesh, ((1, 0), 1))
  return step, state, batch, params


def test_fresh_vq_codebooks_share_a_buffer_but_the_state_owns_one_each():
  # a fresh codebook's ema_sum *is* its entries; donating both would fail in XLA
  cb = jax.tree.leaves(nnx.state(_llama(), nnx.Not(nnx.Param)))
  pointers = [x.unsafe_buffer_pointer() for x in cb if hasattr(x, "unsafe_buffer_pointer")]
  assert len(set(pointers)) < len(pointers)
  tx = training.make_optimizer(lr=1e-3, weight_decay=0.0, warmup_steps=1, total_steps=4)
  state = training.owned(training.init_state(*apply.split_model(_llama())[1:], tx))
  pointers = [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(state)
              for s in x.addressable_shards]
  assert len(set(pointers)) == len(pointers)


def test_step_donates_the_state_and_keeps_the_models_weights():
  for mesh_size in (1, 4):
    model = _llama()
    step, state, batch, params = _step_and_state(model, mesh_size)
    old = jax.tree.leaves((state.params, state.opt_state))  # all but a few scalars
    new, metrics = step(state, *batch)
    new, metrics = step(new, *batch)  # the second call runs on donated buffers
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.is_deleted() for x in old)
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))
    # the model the weights came from is untouched
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def test_donated_steps_equal_steps_on_copies():
  step, state, batch, _ = _step_and_state(_llama(), 4)
  _, copy, _, _ = _step_and_state(_llama(), 4)  # the same model, built again
  for _ in range(2):
    state, _ = step(state, *batch)
  undonated = jax.jit(step.__wrapped__)
  for _ in range(2):
    copy, _ = undonated(copy, *batch)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(copy)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
