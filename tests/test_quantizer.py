import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astra_jax.parallel import mesh as mesh_lib
from astra_jax.core import noise
from astra_jax.core import quantizer as vq


def _data(n=256, dim=16, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, dim))


def test_encode_is_nearest_entry_per_group():
  x = _data(64, 12)
  cb = vq.init_codebook(jax.random.PRNGKey(1), 12, 3, 32)
  codes = np.asarray(vq.encode(x, cb.entries))
  xg = np.asarray(x).reshape(64, 3, 4)
  e = np.asarray(cb.entries)
  brute = np.stack([np.argmin(((xg[:, g, None] - e[g][None]) ** 2).sum(-1), -1)
                    for g in range(3)], -1)
  np.testing.assert_array_equal(codes, brute)
  dec = np.asarray(vq.decode(jnp.asarray(codes), cb.entries)).reshape(64, 3, 4)
  for g in range(3):
    np.testing.assert_array_equal(dec[:, g], e[g][codes[:, g]])


def test_codebook_holding_the_data_reconstructs_it_exactly():
  x = _data(32, 8)
  entries = jnp.swapaxes(vq.split_groups(x, 2), 0, 1)  # [G, 32, d]
  codes = vq.encode(x, entries)
  np.testing.assert_array_equal(np.asarray(vq.decode(codes, entries)), np.asarray(x))


def test_straight_through_gradient_equals_gradient_at_decoded():
  x = _data(16, 8)
  cb = vq.init_codebook(jax.random.PRNGKey(2), 8, 4, 16)
  q = vq.decode(vq.encode(x, cb.entries), cb.entries)
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  f = lambda y: jnp.sum(jnp.sin(y) * w)
  g_ste = jax.grad(lambda x: f(vq.straight_through(x, q)))(x)
  g_dec = jax.grad(f)(q)
  np.testing.assert_allclose(g_ste, g_dec, rtol=1e-5, atol=1e-6)
  # the value is the decoded one
  np.testing.assert_allclose(vq.straight_through(x, q), q, atol=1e-6)


def test_commitment_loss_pulls_only_the_encoder():
  x = _data(16, 8)
  q = x + 0.5
  gx, gq = jax.grad(vq.commitment_loss, argnums=(0, 1))(x, q)
  np.testing.assert_allclose(gx, 2 * (x - q) / x.size, rtol=1e-5)
  assert float(jnp.abs(gq).max()) == 0.0


def test_ema_with_zero_decay_moves_entries_to_cluster_means():
  x = _data(512, 8)
  cb = vq.init_codebook(jax.random.PRNGKey(4), 8, 2, 8)
  codes = vq.encode(x, cb.entries)
  new = vq.ema_update(cb, x, codes, decay=0.0, eps=0.0)
  xg = np.asarray(vq.split_groups(x, 2))
  c = np.asarray(codes)
  for g in range(2):
    for k in range(8):
      members = xg[c[:, g] == k, g]
      if len(members):
        np.testing.assert_allclose(new.entries[g, k], members.mean(0), rtol=1e-5, atol=1e-5)
  # residual variance is the mean squared distance to the assigned entry
  resid = xg - np.asarray(cb.entries)[np.arange(2), c]
  np.testing.assert_allclose(new.resid_var, (resid**2).mean((0, 2)), rtol=1e-5)


def test_ema_statistics_reduced_over_mesh_equal_single_device():
  x = _data(256, 8)
  cb = vq.init_codebook(jax.random.PRNGKey(5), 8, 2, 16)
  codes = vq.encode(x, cb.entries)
  single = vq.ema_update(cb, x, codes, decay=0.9)
  mesh = mesh_lib.make_seq_mesh(4)

  def per_device(cb, x, codes):
    return vq.ema_update(cb, x, codes, decay=0.9, axis_name=mesh_lib.SEQ_AXIS)

  sharded = mesh_lib.sequence_parallel(per_device, mesh, in_seq_dims=(None, 0, 0),
                                       out_seq_dims=None)(cb, x, codes)
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_kmeans_beats_random_init_and_fits_small_data_exactly():
  x = 3.0 + 0.5 * _data(1024, 16)  # activations are rarely centred unit normals
  rand = vq.init_codebook(jax.random.PRNGKey(6), 16, 4, 64)
  seeds = vq.kmeans_init(jax.random.PRNGKey(7), x, 4, 64, iters=0)
  km = vq.kmeans_init(jax.random.PRNGKey(7), x, 4, 64, iters=8)

  def distortion(entries):
    return float(jnp.mean((vq.decode(vq.encode(x, entries), entries) - x) ** 2))

  assert distortion(km.entries) < 0.5 * distortion(rand.entries)
  assert distortion(km.entries) < distortion(seeds.entries)  # Lloyd steps help
  np.testing.assert_allclose(km.resid_var.mean(), distortion(km.entries), rtol=1e-4)
  few = x[:32]
  exact = vq.kmeans_init(jax.random.PRNGKey(8), few, 4, 32, iters=3)
  assert distortion(exact.entries) > 0  # of all of x ...
  rec = vq.decode(vq.encode(few, exact.entries), exact.entries)
  np.testing.assert_allclose(rec, few, atol=1e-5)  # ... but the 32 seeds are exact


def test_kmeans_with_fewer_samples_than_entries():
  x = _data(10, 8)
  cb = vq.kmeans_init(jax.random.PRNGKey(9), x, 2, 64, iters=3)
  assert cb.entries.shape == (2, 64, 4)
  rec = vq.decode(vq.encode(x, cb.entries), cb.entries)
  np.testing.assert_allclose(rec, x, atol=1e-3)


def test_reseed_moves_only_dead_entries():
  cb = vq.init_codebook(jax.random.PRNGKey(10), 8, 2, 16)
  counts = jnp.ones((2, 16)).at[:, :4].set(0.0).at[:, 4].set(100.0)
  cb = cb._replace(ema_count=counts, resid_var=jnp.ones(2))
  assert float(vq.usage_metrics(cb)["dead_fraction"]) == pytest.approx(4 / 16)
  new = vq.reseed_dead(jax.random.PRNGKey(11), cb)
  np.testing.assert_array_equal(new.entries[:, 4:], cb.entries[:, 4:])
  assert not np.allclose(new.entries[:, :4], cb.entries[:, :4])
  # re-seeded entries sit next to a donor (mostly the busy entry 4)
  dist = jnp.min(jnp.sum((new.entries[:, :4, None] - cb.entries[:, None, 4:]) ** 2, -1), -1)
  assert float(dist.max()) < 0.01
  assert float(vq.usage_metrics(new)["dead_fraction"]) == 0.0


def test_usage_metrics_uniform():
  cb = vq.init_codebook(jax.random.PRNGKey(12), 8, 2, 16)
  m = vq.usage_metrics(cb)
  assert float(m["code_perplexity"]) == pytest.approx(16.0, rel=1e-5)
  assert float(m["dead_fraction"]) == 0.0


def test_noise_matches_residual_scale_and_is_noop_at_zero():
  x = jnp.zeros((50_000, 8))
  var = jnp.array([0.25, 4.0])
  out = noise.residual_noise(jax.random.PRNGKey(13), x, var, 1.5)
  std = np.asarray(vq.split_groups(out, 2)).std(axis=(0, 2))
  np.testing.assert_allclose(std, 1.5 * np.sqrt(var), rtol=0.01)
  assert noise.residual_noise(jax.random.PRNGKey(13), x, var, 0.0) is x


@pytest.mark.parametrize("dim,groups,size,match", [
    (768, 7, 1024, "does not divide"), (768, 32, 1000, "power of two"),
    (768, 0, 1024, "does not divide")])
def test_bad_config(dim, groups, size, match):
  with pytest.raises(ValueError, match=match):
    vq.check_config(dim, groups, size)
