"""Llama: RoPE with Llama 3 scaling, GQA, sequence-parallel prefill, KV-cache decoding,
VQ exchange of the (unrotated) K/V heads, int8 weight-only and bf16 weights."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.core import exchange as ex, quantizer
from astra_jax.run import generate
from astra_jax.core.attention import SequenceAttention, attention_layers
from astra_jax.models import llama
from model_helpers import sequence_logits

TOL = dict(rtol=1e-5, atol=1e-5)
# plain theta and a short "original" context, so Llama 3's scaling changes
# frequencies that matter within 16 tokens; untied head
CFG = llama.LlamaConfig(variant="nano", vocab_size=64, context=32, rope_theta=10000.0,
                        rope_scaling=llama.RopeScaling(factor=4.0,
                                                       original_max_position_embeddings=16),
                        tie_embeddings=False)


def _model(cfg=CFG, seed=0):
  return llama.Llama(cfg, rngs=nnx.Rngs(seed))


def _tokens(batch=2, length=16, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, CFG.vocab_size)


_logits = sequence_logits


# --- RoPE -----------------------------------------------------------------------------

def _llama3_reference(head_dim, theta, factor, low, high, original):
  """The Llama 3 frequency rule written out per frequency, in Python floats."""
  out = []
  for i in range(0, head_dim, 2):
    freq = theta ** (-i / head_dim)
    wavelength = 2 * math.pi / freq
    if wavelength < original / high:  # high frequency: unchanged
      out.append(freq)
    elif wavelength > original / low:  # low frequency: slowed by `factor`
      out.append(freq / factor)
    else:  # in between: interpolate on original / wavelength
      t = (original / wavelength - low) / (high - low)
      out.append((1 - t) * freq / factor + t * freq)
  return np.asarray(out)


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 500000.0, llama.RopeScaling(8.0, 1.0, 4.0, 8192)),  # Llama 3.1 8B
    (64, 500000.0, llama.RopeScaling(32.0, 1.0, 4.0, 8192)),  # Llama 3.2 1B
    (16, 10000.0, llama.RopeScaling(4.0, 1.0, 4.0, 32)),  # tests/hf_reference.py's
    (8, 10000.0, CFG.rope_scaling),  # this file's model
])
def test_llama3_frequencies_match_the_formula(head_dim, theta, scaling):
  s = scaling
  want = _llama3_reference(head_dim, theta, s.factor, s.low_freq_factor, s.high_freq_factor,
                           s.original_max_position_embeddings)
  got = llama.rope_frequencies(head_dim, theta, scaling)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  plain = llama.rope_frequencies(head_dim, theta, None)
  np.testing.assert_allclose(plain, theta ** (-np.arange(0, head_dim, 2) / head_dim), rtol=1e-6)
  if head_dim >= 16:  # every band occurs: kept, interpolated, slowed by `factor`
    ratio = plain / got
    assert ratio.min() == pytest.approx(1.0) and ratio.max() == pytest.approx(s.factor, rel=1e-5)
    assert ((ratio > 1.001) & (ratio < s.factor * 0.999)).any()


def test_rope_rotates_half_pairs_and_is_relative():
  rope = llama.Rope(16, 10000.0, llama.RopeScaling(4.0, 1.0, 4.0, 32))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 3, 16))
  pos = jnp.asarray([0, 3, 7, 40, 63])
  got = np.asarray(rope(x, pos))
  # independent: dimension i and i + 8 as one complex number, turned by pos * freq
  xn = np.asarray(x, np.float64)
  z = (xn[..., :8] + 1j * xn[..., 8:]) * np.exp(
      1j * np.asarray(pos)[None, :, None, None] * rope_freqs(rope)[None, None, None, :])
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)
  # q.k after rotation depends only on the distance between the positions
  q, k = x[:, :1], x[:, 1:2]
  dots = [float(jnp.sum(rope(q, jnp.asarray([m + 5])) * rope(k, jnp.asarray([m]))))
          for m in (0, 11, 30)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-5)


def rope_freqs(rope):
  return llama.rope_frequencies(rope.head_dim, rope.theta, rope.scaling).astype(np.float64)


# --- sequence parallel, exact -------------------------------------------------------

def test_exact_sequence_parallel_equals_single_device():
  model, tokens = _model(), _tokens()
  ref = _logits(model, tokens, None)
  assert ref.dtype == jnp.float32 and ref.shape == (2, 16, 64)
  for p in (1, 2, 4):
    np.testing.assert_allclose(_logits(model, tokens, p), ref, **TOL)


def test_causality_future_tokens_do_not_change_the_past():
  model, tokens = _model(), _tokens()
  changed = tokens.at[:, 12:].set((tokens[:, 12:] + 1) % CFG.vocab_size)
  a, b = _logits(model, tokens, 4), _logits(model, changed, 4)
  np.testing.assert_allclose(a[:, :12], b[:, :12], **TOL)
  assert float(jnp.abs(a[:, 12:] - b[:, 12:]).max()) > 1e-4


def test_lm_gradients_equal_single_device():
  model, tokens = _model(), _tokens()
  graphdef, params, rest = apply.split_model(model)

  def loss(params, mesh):
    fn = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=True, out_seq_dim=1)
    logits, _, aux = fn(params, rest, tokens, jnp.arange(16))
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux

  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, None)
  g4 = jax.jit(jax.grad(loss), static_argnums=1)(params, mesh_lib.make_seq_mesh(4))
  leaves = jax.tree.leaves(g1)
  assert len(leaves) == 2 * 9 + 3  # per layer 7 kernels + 2 norms; embedding, norm, head
  for a, b in zip(leaves, jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, **TOL)


def test_cached_decoding_equals_recomputation():
  model, tokens = _model(), _tokens(batch=1, length=20)
  full = _logits(model, tokens, None)
  logits, views = generate.prefill(model, tokens[:, :8], 4)
  np.testing.assert_allclose(logits, full[:, :8], **TOL)
  cache = generate._pad_cache(views, 3, CFG.context)
  assert cache[0][0].shape == (1, 32, 2, 8)  # [B, S, kv_heads, head_dim]
  for pos in range(8, 20):
    step, cache = model.decode(tokens[:, pos:pos + 1], jnp.asarray([pos]), cache)
    np.testing.assert_allclose(step[:, 0], full[:, pos], **TOL)


def test_greedy_generation_same_on_any_mesh_with_exact_exchange():
  model = _model()
  prompt = [3, 1, 4, 1, 5, 9, 2]  # 7 tokens: padded to the mesh
  ref = list(generate.generate(model, prompt, 6, mesh_size=1, context=CFG.context))
  seq = list(prompt)  # greedy without any cache
  for _ in range(6):
    logits = _logits(model, jnp.asarray([seq]), None)
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert ref == seq[len(prompt):]
  for p in (2, 4):
    assert list(generate.generate(model, prompt, 6, mesh_size=p, context=CFG.context)) == ref


# --- ASTRA: VQ of the K/V heads, before RoPE ------------------------------------------

def test_vq_quantizes_unrotated_kv_heads():
  vq = ex.make_exchange("vq", groups=4, codebook_size=8)
  cfg = dataclasses.replace(CFG, exchange=vq)
  model, tokens = _model(cfg), _tokens(batch=1, length=16)
  layers = attention_layers(model)
  assert (cfg.sizes.kv_heads, cfg.sizes.head_dim, cfg.kv_dim, cfg.sizes.width) == (2, 8, 16, 32)
  assert layers[0].state.get_value().k.entries.shape[-1] == 16 // 4  # codebooks span kv_dim
  _, views = generate.prefill(model, tokens, 4)
  _, exact = generate.prefill(model, tokens, 1)
  k, k_exact = views[0][0], exact[0][0][0]  # layer 0 keys, as sent: unrotated
  entries = layers[0].state.get_value().k.entries
  flat = k_exact.reshape(1, 16, 16)
  decoded = quantizer.decode(quantizer.encode(flat, entries), entries).reshape(k_exact.shape)
  for d in range(4):
    own = slice(4 * d, 4 * d + 4)
    np.testing.assert_allclose(k[d][:, own], k_exact[:, own], **TOL)  # own block exact
    for o in range(4):  # the others: the codes of their unrotated keys, decoded
      if o != d:
        block = slice(4 * o, 4 * o + 4)
        np.testing.assert_allclose(k[d][:, block], decoded[:, block], **TOL)
  assert float(jnp.abs(decoded - k_exact).max()) > 1e-3  # 12 bits per token: lossy
  out = list(generate.generate(model, [1, 2, 3, 4, 5], 5, mesh_size=4, context=32))
  assert len(out) == 5 and all(0 <= t < 64 for t in out)


def test_vq_with_every_key_in_the_codebook_equals_exact():
  """Codebooks holding every (unrotated) K/V token exactly: the rotation after the
  exchange then reproduces exact attention, so the logits equal the exact model's."""
  vq = ex.make_exchange("vq", groups=1, codebook_size=16)
  cfg = dataclasses.replace(CFG, exchange=vq)
  model, tokens = _model(cfg), _tokens(batch=1, length=16)
  _, views = generate.prefill(model, tokens, 1)  # one device: exact K/V of every layer
  for layer, (k, v) in zip(attention_layers(model), views):
    state = layer.state.get_value()
    layer.state.set_value(type(state)(
        state.k._replace(entries=k.reshape(1, 16, 16)),
        state.v._replace(entries=v.reshape(1, 16, 16))))
  exact = _logits(model, tokens, None)
  np.testing.assert_allclose(_logits(model, tokens, 4), exact, **TOL)


# --- weights: int8 weight-only, bf16 ----------------------------------------------

def test_int8_weight_only_close_to_float():
  """Each weight is off by at most half a quantization step (max|w_col| / 254); the
  logits of the nano model move by less than 2% of their spread (RMS about their mean;
  measured: 0.6%)."""
  model = _model()
  q = llama.quantize_weights(model)
  assert q.cfg.quantize_int8 and not model.cfg.quantize_int8
  kernel = model.layers[1].gate_proj.kernel.get_value()
  qk, scale = q.layers[1].gate_proj.kernel.get_value(), q.layers[1].gate_proj.scale.get_value()
  assert qk.dtype == jnp.int8 and scale.shape == (CFG.sizes.mlp_dim,)
  np.testing.assert_allclose(scale, jnp.abs(kernel).max(0) / 127, rtol=1e-6)
  assert bool((jnp.abs(qk * scale - kernel) <= scale / 2 * (1 + 1e-6)).all())
  trainable = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(q, nnx.Param))}
  assert trainable == {"embedding", "scale"}  # int8 kernels are not nnx.Params (RMSNorm scales are)
  tokens = _tokens()
  a, b = _logits(model, tokens, 4), _logits(q, tokens, 4)
  rel = float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean((a - a.mean()) ** 2)))
  assert 0 < rel < 0.02, rel  # measured 0.6%
  np.testing.assert_allclose(_logits(q, tokens, None), b, **TOL)  # exact P=4 == P=1


def test_bf16_weights_close_to_float():
  bf16 = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16")
  model = _model()
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  half = llama.assemble(bf16, lambda path: params[path].get_value())
  assert half.layers[0].q_proj.kernel.get_value().dtype == jnp.bfloat16
  tokens = _tokens()
  a, b = _logits(model, tokens, 4), _logits(half, tokens, 4)
  assert b.dtype == jnp.float32
  rel = float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean((a - a.mean()) ** 2)))
  assert rel < 0.02, rel  # bf16 keeps 8 significant bits; measured 0.5%
  views = generate.prefill(half, tokens, 4)[1]
  assert views[0][0].dtype == jnp.bfloat16  # bf16 K/V cross the link and fill the cache


# --- shapes and configs ----------------------------------------------------------

def _param_count(cfg):
  return sum(int(np.prod(s)) for s in llama.weight_shapes(cfg).values())


def test_released_shapes():
  eight = llama.release_config("8b")
  s = eight.sizes
  assert (s.width, s.layers, s.heads, s.kv_heads, s.mlp_dim, s.head_dim) == (
      4096, 32, 32, 8, 14336, 128)
  assert eight.kv_dim == 1024  # ASTRA quantizes 8 K/V heads x 128, not the 4096 width
  assert _param_count(eight) == 8_030_261_248  # Llama 3.1 8B
  assert _param_count(llama.release_config("1b")) == 1_235_814_400  # Llama 3.2 1B (tied)
  assert llama.release_config("3b").sizes.head_dim == 128


def test_config_errors():
  with pytest.raises(ValueError, match="unknown Llama variant"):
    llama.LlamaConfig(variant="70b")
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    llama.LlamaConfig(variant="nano", kv_heads=3)
  with pytest.raises(ValueError, match="'custom' needs"):
    llama.LlamaConfig(variant="custom", width=64)
  with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor"):
    llama.RopeScaling(low_freq_factor=4.0, high_freq_factor=4.0)
  with pytest.raises(ValueError, match="float type"):
    llama.LlamaConfig(dtype="int8")
  with pytest.raises(ValueError, match="no released Llama"):
    llama.release_config("nano")


def test_attention_layers_get_the_rope_hooks():
  layer = attention_layers(_model())[0]
  assert isinstance(layer, SequenceAttention)
  assert layer.query_transform == layer.key_transform == CFG.rope
