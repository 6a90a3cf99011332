"""Sequence-parallel attention against a dense single-device reference."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astra_jax.core import axes
from astra_jax.core import attention, exchange as ex, quantizer as vq
from astra_jax.parallel import mesh as mesh_lib

B, T, H, HKV, DH = 2, 16, 4, 2, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(seed=0, hkv=H):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (B, T, H, DH)), jax.random.normal(kk, (B, T, hkv, DH)),
          jax.random.normal(kv, (B, T, hkv, DH)))


def dense(q, k, v, causal):
  pos = jnp.arange(q.shape[1])
  return attention.dot_product_attention(q, k, v, q_pos=pos, k_pos=pos, causal=causal)


def naive(q, k, v, causal):
  """Independent reference: per-head softmax written out, K/V heads repeated."""
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def sharded(exchange, state, mesh_size, causal, train=False, key=None):
  mesh = mesh_lib.make_seq_mesh(mesh_size)

  def body(state, q, k, v):
    out, _ = attention.attend(exchange, state, q, k, v, causal=causal, train=train,
                              key=key, axis_name=axes.current_seq_axis())
    return out

  return jax.jit(mesh_lib.sequence_parallel(body, mesh, in_seq_dims=(None, 1, 1, 1),
                                            out_seq_dims=1))


@pytest.mark.parametrize("hkv", [H, HKV])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_reference_matches_naive(causal, hkv):
  q, k, v = _qkv(hkv=hkv)
  np.testing.assert_allclose(dense(q, k, v, causal), naive(q, k, v, causal), **TOL)


@pytest.mark.parametrize("mesh_size", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_forward_and_gradients_equal_dense(mesh_size, causal):
  q, k, v = _qkv(1)
  exact = ex.make_exchange("exact")
  fn = sharded(exact, (), mesh_size, causal)
  np.testing.assert_allclose(fn((), q, k, v), dense(q, k, v, causal), **TOL)
  w = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  loss_sp = lambda q, k, v: jnp.sum(fn((), q, k, v) * w)
  loss_dense = lambda q, k, v: jnp.sum(dense(q, k, v, causal) * w)
  for g_sp, g_d in zip(jax.grad(loss_sp, (0, 1, 2))(q, k, v),
                       jax.grad(loss_dense, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_sp, g_d, **TOL)


@pytest.mark.parametrize("mesh_size", [2, 4])
def test_exact_grouped_query_attention(mesh_size):
  q, k, v = _qkv(2, hkv=HKV)
  fn = sharded(ex.make_exchange("exact"), (), mesh_size, True)
  np.testing.assert_allclose(fn((), q, k, v), naive(q, k, v, True), **TOL)


def _codebooks_holding(k, v, groups):
  """A VQ state whose codebooks contain every token's K and V group vectors."""
  def book(x):
    flat = x.reshape(-1, x.shape[2] * x.shape[3])  # [B*T, D]: K = B*T entries
    entries = jnp.swapaxes(vq.split_groups(flat, groups), 0, 1)
    return vq.Codebook(entries, jnp.ones(entries.shape[:2]), entries,
                       jnp.zeros((groups,)))
  return ex.VQState(book(k), book(v))


@pytest.mark.parametrize("mesh_size", [2, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_vq_with_exact_codebook_equals_exact(mesh_size, causal):
  q, k, v = _qkv(3)
  vq_ex = ex.make_exchange("vq", groups=4, codebook_size=B * T)
  state = _codebooks_holding(k, v, 4)
  out = sharded(vq_ex, state, mesh_size, causal)(state, q, k, v)
  np.testing.assert_allclose(out, dense(q, k, v, causal), **TOL)


def _mixed_kv_error_bound(q, k, v, k_hat, v_hat, mesh_size):
  """Per-query bound on |vq - exact| from the measured quantization error.

  Each device sees its own block exactly.  With logits perturbed by at most
  e_l = |q|_2 max_j |dK_j|_2 / sqrt(Dh), the softmax moves by at most 2 e_l in
  L1, so |d out| <= 2 e_l max|V'| + max_j |dV_j|_inf.
  """
  tl = T // mesh_size
  dk = jnp.linalg.norm(k_hat - k, axis=-1)  # [B, T, H]
  dv = jnp.max(jnp.abs(v_hat - v), axis=-1)
  dev = jnp.arange(T) // tl
  bounds = []
  for i in range(mesh_size):
    remote = (dev != i)[None, :, None]
    e_k = jnp.max(jnp.where(remote, dk, 0.0), axis=1)  # [B, H]
    e_v = jnp.max(jnp.where(remote, dv, 0.0), axis=1)
    qn = jnp.linalg.norm(q[:, i * tl:(i + 1) * tl], axis=-1)  # [B, tl, H]
    vmax = jnp.maximum(jnp.abs(v).max(), jnp.abs(v_hat).max())
    bounds.append(2 * qn * e_k[:, None] / np.sqrt(DH) * vmax + e_v[:, None])
  return jnp.concatenate(bounds, axis=1)[..., None]


def _flat(x):
  return x.reshape(-1, H * DH)


def _learned_state(k, v):
  """k-means codebooks (G=4, K=16): lossy for these 32 tokens."""
  return ex.VQState(vq.kmeans_init(jax.random.PRNGKey(5), _flat(k), 4, 16),
                    vq.kmeans_init(jax.random.PRNGKey(6), _flat(v), 4, 16))


def _reconstruct(x, cb):
  return vq.decode(vq.encode(_flat(x), cb.entries), cb.entries).reshape(x.shape)


@pytest.mark.parametrize("causal", [False, True])
def test_vq_learned_codebook_error_is_bounded_by_quantization_error(causal):
  q, k, v = _qkv(4)
  vq_ex = ex.make_exchange("vq", groups=4, codebook_size=16)
  state = _learned_state(k, v)
  mesh_size = 4
  out = sharded(vq_ex, state, mesh_size, causal)(state, q, k, v)
  ref = dense(q, k, v, causal)
  k_hat, v_hat = _reconstruct(k, state.k), _reconstruct(v, state.v)
  err = jnp.abs(out - ref)
  assert float(err.max()) > 1e-3  # the codebook is lossy: the test is not vacuous
  bound = _mixed_kv_error_bound(q, k, v, k_hat, v_hat, mesh_size)
  assert bool(jnp.all(err <= bound + 1e-6)), float((err - bound).max())
  # and it is exactly attention over the mixed K/V each device sees
  tl = T // mesh_size
  for i in range(mesh_size):
    own = (jnp.arange(T) // tl == i)[None, :, None, None]
    km, vm = jnp.where(own, k, k_hat), jnp.where(own, v, v_hat)
    rows = slice(i * tl, (i + 1) * tl)
    np.testing.assert_allclose(out[:, rows], dense(q, km, vm, causal)[:, rows], **TOL)


def test_vq_train_forward_equals_inference_without_noise():
  q, k, v = _qkv(5)
  state = _learned_state(k, v)
  quiet = ex.make_exchange("vq", groups=4, codebook_size=16, noise_scale=0.0)
  noisy = ex.make_exchange("vq", groups=4, codebook_size=16, noise_scale=1.0)
  key = jax.random.PRNGKey(0)
  infer = sharded(quiet, state, 4, True)(state, q, k, v)
  train = sharded(quiet, state, 4, True, train=True, key=key)(state, q, k, v)
  np.testing.assert_allclose(train, infer, **TOL)
  # noise is applied in training only; inference ignores noise_scale entirely
  train_noisy = sharded(noisy, state, 4, True, train=True, key=key)(state, q, k, v)
  assert float(jnp.abs(train_noisy - infer).max()) > 1e-3
  np.testing.assert_array_equal(sharded(noisy, state, 4, True)(state, q, k, v), infer)


def test_vq_training_gradient_flows_straight_through_to_the_sender():
  q, k, v = _qkv(6)
  state = _learned_state(k, v)
  quiet = ex.make_exchange("vq", groups=4, codebook_size=16, noise_scale=0.0)
  fn = sharded(quiet, state, 4, False, train=True, key=jax.random.PRNGKey(0))
  w = jax.random.normal(jax.random.PRNGKey(1), q.shape)
  g_k = jax.grad(lambda k: jnp.sum(fn(state, q, k, v) * w))(k)
  # reference: each device's rows use [own exact | others decoded]; STE makes the
  # gradient w.r.t. a remote K the gradient w.r.t. its decoded value.
  k_hat, v_hat = _reconstruct(k, state.k), _reconstruct(v, state.v)
  tl = T // 4

  def mixed_loss(k_exact, k_dec):
    total = 0.0
    for i in range(4):
      own = (jnp.arange(T) // tl == i)[None, :, None, None]
      km, vm = jnp.where(own, k_exact, k_dec), jnp.where(own, v, v_hat)
      rows = slice(i * tl, (i + 1) * tl)
      total += jnp.sum(dense(q, km, vm, False)[:, rows] * w[:, rows])
    return total

  g_exact, g_dec = jax.grad(mixed_loss, (0, 1))(k, k_hat)
  np.testing.assert_allclose(g_k, g_exact + g_dec, **TOL)


def test_training_keeps_codebooks_identical_and_matches_single_device_ema():
  q, k, v = _qkv(7)
  state = _learned_state(k, v)
  exch = ex.make_exchange("vq", groups=4, codebook_size=16, dead_threshold=0.0)
  mesh = mesh_lib.make_seq_mesh(4)

  def body(state, q, k, v):
    _, out = attention.attend(exch, state, q, k, v, causal=True, train=True,
                              key=jax.random.PRNGKey(3), axis_name=axes.current_seq_axis())
    return out.state, out.loss

  # out_specs P() for the state: shard_map's replication check proves every
  # device holds the same codebook.
  new_state, loss = jax.jit(mesh_lib.sequence_parallel(
      body, mesh, in_seq_dims=(None, 1, 1, 1), out_seq_dims=None))(state, q, k, v)
  for x, cb, got in ((k, state.k, new_state.k), (v, state.v, new_state.v)):
    want = vq.ema_update(cb, _flat(x), vq.encode(_flat(x), cb.entries), decay=exch.ema_decay)
    for a, b in zip(want, got):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  want_loss = exch.commitment * sum(
      vq.commitment_loss(_flat(x), vq.decode(vq.encode(_flat(x), cb.entries), cb.entries))
      for x, cb in ((k, state.k), (v, state.v)))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


def test_sequence_not_divisible_by_mesh():
  q, k, v = _qkv()
  fn = sharded(ex.make_exchange("exact"), (), 3, False)
  with pytest.raises(ValueError, match="not divisible by the mesh size 3.*multiple of 3"):
    fn((), q, k, v)


def test_mesh_larger_than_devices():
  with pytest.raises(ValueError, match="JAX_NUM_CPU_DEVICES=16"):
    mesh_lib.make_seq_mesh(16)


def test_bad_exchange_configs():
  with pytest.raises(ValueError, match="power of two"):
    ex.make_exchange("vq", codebook_size=1000)
  with pytest.raises(ValueError, match="unknown exchange 'ring2'.*exact"):
    ex.make_exchange("ring2")
  with pytest.raises(ValueError, match="no option"):
    ex.make_exchange("vq", group=3)
  with pytest.raises(ValueError, match="does not divide"):
    ex.make_exchange("vq", groups=7).init_state(jax.random.PRNGKey(0), 32)
  with pytest.raises(ValueError, match="multiple of Hkv"):
    q, k, v = _qkv(hkv=3)
    dense(q, k, v, False)


@pytest.mark.parametrize("causal", [False, True])
def test_lost_tokens_are_masked_out_as_the_reference_says(causal):
  """Link loss: each device attends over exactly the tokens ``received_tokens``
  says arrived (dense reference with that mask), never to zero-filled ones."""
  p, rate = 4, 0.3
  q, k, v = _qkv(5)
  lossy = ex.make_exchange("exact", drop_rate=rate)
  key = jax.random.PRNGKey(3)
  out = sharded(lossy, (), p, causal, key=key)((), q, k, v)
  _, drop_key = jax.random.split(key)  # as attend splits it
  mesh = mesh_lib.make_seq_mesh(p)
  masks = jax.jit(mesh_lib.sequence_parallel(
      lambda x: attention.received_tokens(drop_key, rate, B, T, T // p,
                                          axes.current_seq_axis())[None],
      mesh, in_seq_dims=(1,), out_seq_dims=0))(q)  # [P, B, T]
  tl, pos = T // p, jnp.arange(T)
  for d in range(p):
    mask = np.asarray(masks[d])
    assert mask[:, d * tl:(d + 1) * tl].all()  # own block always present
    rows = slice(d * tl, (d + 1) * tl)
    want = attention.dot_product_attention(q[:, rows], k, v, q_pos=pos[rows], k_pos=pos,
                                           causal=causal, kv_valid=masks[d])
    np.testing.assert_allclose(out[:, rows], want, **TOL)
  lost = 1 - np.asarray(masks).mean()
  assert 0.1 < lost < 0.4  # about rate * 3/4 of the tokens are non-local
  # tokens lost on the way to device d have no influence on d's outputs
  for d in range(p):
    v_changed = jnp.where(masks[d][..., None, None], v, 1e3)
    out2 = sharded(lossy, (), p, causal, key=key)((), q, k, v_changed)
    rows = slice(d * tl, (d + 1) * tl)
    np.testing.assert_allclose(out[:, rows], out2[:, rows], **TOL)


def test_drop_rate_out_of_range_is_refused():
  with pytest.raises(ValueError, match="drop_rate must be in"):
    ex.make_exchange("vq", drop_rate=1.0)
