"""GPT-2: causal sequence-parallel prefill, KV-cache decoding, generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.core import exchange as ex
from astra_jax.run import generate
from astra_jax.models import gpt2
from model_helpers import sequence_logits

TOL = dict(rtol=1e-5, atol=1e-5)
CFG = gpt2.GPT2Config(variant="nano", vocab_size=64, context=32)


def _model(cfg=CFG, seed=0):
  return gpt2.GPT2(cfg, rngs=nnx.Rngs(seed))


def _tokens(batch=2, length=16, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, CFG.vocab_size)


_logits = sequence_logits


def test_exact_sequence_parallel_equals_single_device():
  model, tokens = _model(), _tokens()
  ref = _logits(model, tokens, None)
  for p in (1, 2, 4, 8):
    np.testing.assert_allclose(_logits(model, tokens, p), ref, **TOL)


def test_causality_future_tokens_do_not_change_the_past():
  model, tokens = _model(), _tokens()
  changed = tokens.at[:, 12:].set((tokens[:, 12:] + 1) % CFG.vocab_size)
  a, b = _logits(model, tokens, 4), _logits(model, changed, 4)
  np.testing.assert_allclose(a[:, :12], b[:, :12], **TOL)
  assert float(jnp.abs(a[:, 12:] - b[:, 12:]).max()) > 1e-4


def test_cached_decoding_equals_recomputation():
  model, tokens = _model(), _tokens(batch=1, length=20)
  full = _logits(model, tokens, None)
  logits, views = generate.prefill(model, tokens[:, :8], 4)
  np.testing.assert_allclose(logits, full[:, :8], **TOL)
  cache = generate._pad_cache(views, 3, CFG.context)
  for pos in range(8, 20):
    step, cache = model.decode(tokens[:, pos:pos + 1], jnp.asarray([pos]), cache)
    np.testing.assert_allclose(step[:, 0], full[:, pos], **TOL)


def test_greedy_generation_same_on_any_mesh_with_exact_exchange():
  model = _model()
  prompt = [3, 1, 4, 1, 5, 9, 2]  # 7 tokens: padded to the mesh
  ref = list(generate.generate(model, prompt, 6, mesh_size=1, context=CFG.context))
  # recompute greedily without any cache
  seq = list(prompt)
  for _ in range(6):
    logits = _logits(model, jnp.asarray([seq]), None)
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert ref == seq[len(prompt):]
  for p in (2, 4):
    assert list(generate.generate(model, prompt, 6, mesh_size=p, context=CFG.context)) == ref


def test_vq_prefill_cache_is_own_block_exact_and_others_decoded():
  cfg = gpt2.GPT2Config(variant="nano", vocab_size=64, context=32,
                        exchange=ex.make_exchange("vq", groups=4, codebook_size=8))
  model, tokens = _model(cfg), _tokens(batch=1, length=16)
  _, views = generate.prefill(model, tokens, 4)
  _, exact_views = generate.prefill(_model(), tokens, 1)
  k, k_exact = views[0][0], exact_views[0][0][0]  # layer 0 keys
  for d in range(4):
    own = slice(4 * d, 4 * d + 4)
    np.testing.assert_allclose(k[d][:, own], k_exact[:, own], **TOL)  # exact own block
    others = jnp.concatenate([k[d][:, :4 * d], k[d][:, 4 * d + 4:]], axis=1)
    exact_others = jnp.concatenate([k_exact[:, :4 * d], k_exact[:, 4 * d + 4:]], axis=1)
    assert float(jnp.abs(others - exact_others).max()) > 1e-3  # 12 bits/token: lossy
  out = list(generate.generate(model, [1, 2, 3, 4, 5], 5, mesh_size=4, context=32))
  assert len(out) == 5 and all(0 <= t < 64 for t in out)


def test_generation_errors():
  model = _model()
  with pytest.raises(ValueError, match="exceeds the model's context of 32"):
    list(generate.generate(model, list(range(30)), 5, mesh_size=2, context=32))
  with pytest.raises(ValueError, match="empty"):
    list(generate.generate(model, [], 5, mesh_size=2, context=32))
  with pytest.raises(ValueError, match="unknown GPT-2 variant"):
    gpt2.GPT2Config(variant="huge")


def test_lm_gradients_equal_single_device():
  model, tokens = _model(), _tokens()
  graphdef, params, rest = apply.split_model(model)

  def loss(params, mesh):
    fn = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=True, out_seq_dim=1)
    logits, _, aux = fn(params, rest, tokens, jnp.arange(16))
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux

  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, None)
  g4 = jax.jit(jax.grad(loss), static_argnums=1)(params, mesh_lib.make_seq_mesh(4))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, **TOL)
