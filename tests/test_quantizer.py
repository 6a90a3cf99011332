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


# --- the fast search (encode) against its definition (encode_reference) ---------------------
#
# Bit-for-bit: same codes wherever the reference's own rounding decides, ties to the lowest
# index, NaN like argmin.  No timing here (python -m infer.lab.code_search measures).


def _codes_equal(x, entries):
  # both compiled: run op by op, the reference itself rounds otherwise (unfused)
  want = np.asarray(jax.jit(vq.encode_reference)(x, entries))
  got = np.asarray(jax.jit(vq.encode)(x, entries))
  np.testing.assert_array_equal(got, want)
  return got


def _near_ties(seed, tokens, groups, size, dim, perms=8):
  """x [tokens, G*d] and entries [G, K, d] in which every token sits exactly on an
  anchor and ``perms`` entries around it are equidistant on paper (the anchor plus
  signed permutations of one offset), so only the rounding of |e|^2 - 2 x.e picks
  the winner."""
  rng = np.random.default_rng(seed)
  perms = min(perms, size)
  anchors = 3.0 * rng.standard_normal((groups, size // perms, dim))
  v = rng.standard_normal(dim)
  offsets = np.stack([rng.choice([-1.0, 1.0], dim) * v[rng.permutation(dim)]
                      for _ in range(perms)])
  entries = (anchors[:, :, None, :] + 0.1 * offsets).reshape(groups, -1, dim)
  order = np.stack([rng.permutation(size) for _ in range(groups)])
  entries = np.take_along_axis(entries, order[..., None], 1).astype(np.float32)
  pick = rng.integers(0, size // perms, (tokens, groups))
  x = anchors[np.arange(groups), pick].reshape(tokens, groups * dim).astype(np.float32)
  return x, entries


@pytest.mark.parametrize("groups", [1, 4, 32])
@pytest.mark.parametrize("size", [2, 256, 1024])
def test_encode_equals_reference_on_random_data(groups, size):
  key_x, key_e = jax.random.split(jax.random.PRNGKey(groups * size))
  dim = groups * (24 if groups == 32 else 8)
  x = 2.0 * jax.random.normal(key_x, (3, 100, dim)) + 0.5  # leading dims, 300 tokens
  entries = jax.random.normal(key_e, (groups, size, dim // groups))
  codes = _codes_equal(x, entries)
  assert codes.shape == (3, 100, groups) and codes.dtype == np.int32
  _codes_equal(x.astype(jnp.bfloat16), entries)  # cast to float32 exactly, as the reference does
  _codes_equal(x[0, :37], entries)  # a token count that fills no whole block


@pytest.mark.parametrize("tokens,groups,size,dim", [
    (256, 32, 1024, 24), (512, 32, 1024, 8), (512, 32, 1024, 6), (256, 1, 1024, 768),
    (300, 4, 256, 16), (64, 32, 4096, 2), (100, 3, 128, 5), (40, 2, 2, 64)])
def test_encode_equals_reference_where_only_rounding_decides(tokens, groups, size, dim):
  x, entries = _near_ties(tokens + size + dim, tokens, groups, size, dim)
  codes = _codes_equal(x, entries)
  # the data is a real test of rounding: exact (float64) distances choose otherwise
  xg = x.reshape(tokens, groups, dim).astype(np.float64)
  e64 = entries.astype(np.float64)
  exact = ((e64**2).sum(-1)[None] - 2 * np.einsum("ngd,gkd->ngk", xg, e64)).argmin(-1)
  assert np.mean(exact != codes) > 0.02


@pytest.mark.parametrize("groups,size", [(1, 2), (4, 256), (32, 1024)])
def test_encode_ties_go_to_the_lowest_index(groups, size):
  rng = np.random.default_rng(groups)
  dim = 4
  lo, hi = (0, 1) if size == 2 else (size // 3, size - 1)
  # small integers: every distance is exact in float32, so these ties are exact
  far = 1000.0 + rng.integers(-20, 20, (groups, size, dim))  # out of reach
  center = rng.integers(-20, 20, (groups, dim)).astype(np.float64)
  step = np.eye(dim)[rng.integers(0, dim, groups)]  # [G, d] unit steps
  # two copies of one entry: every token near them ties
  dup = far.copy()
  dup[:, lo] = dup[:, hi] = center
  x = center + rng.integers(-3, 4, (100, groups, dim))
  codes = _codes_equal(x.reshape(100, -1).astype(np.float32), dup.astype(np.float32))
  np.testing.assert_array_equal(codes, lo)
  # tokens exactly halfway between two entries
  half = far.copy()
  half[:, lo], half[:, hi] = center - step, center + step
  x = np.broadcast_to(center, (100, groups, dim)).reshape(100, -1)
  codes = _codes_equal(x.astype(np.float32), half.astype(np.float32))
  np.testing.assert_array_equal(codes, lo)
  half[:, lo], half[:, hi] = center + step, center - step  # the other way round
  codes = _codes_equal(x.astype(np.float32), half.astype(np.float32))
  np.testing.assert_array_equal(codes, lo)


def test_encode_nan_and_inf_like_argmin():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 32)).astype(np.float32)
  entries = rng.standard_normal((4, 256, 8)).astype(np.float32)
  entries[0, 200, 3] = np.nan  # a NaN entry wins in argmin, wherever the minimum is
  entries[1, 5, 0] = np.nan
  entries[2, 100:, 1] = np.inf
  x[3, 0] = np.nan
  x[7, 9] = np.inf
  codes = _codes_equal(x, entries)
  assert (codes[:, 0] == 200).sum() >= 60 and (codes >= 0).all() and (codes < 256).all()


def _gpt2_mini(**options):
  from flax import nnx
  from astra_jax.models import gpt2
  cfg = gpt2.GPT2Config(variant="mini", vocab_size=256, context=256, **options)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 256), 0, 256)
  return gpt2.GPT2(cfg, rngs=nnx.Rngs(0)), tokens


def test_encode_on_gpt2_keys_and_values_with_kmeans_codebooks():
  from astra_jax.run import calibrate
  model, tokens = _gpt2_mini()
  (k0, v0), (k1, v1) = calibrate.record_kv(model, [(tokens, jnp.arange(256))], 512)[:2]
  fit = jax.jit(vq.kmeans_init, static_argnums=(2, 3, 4))
  for i, (x, groups, size) in enumerate([(k0, 32, 1024), (v0, 32, 256), (k1, 1, 1024),
                                         (v1, 4, 64)]):  # [512 tokens, 256]
    _codes_equal(x, fit(jax.random.PRNGKey(i), x, groups, size, 2).entries)
  _codes_equal(k0, fit(jax.random.PRNGKey(0), k0, 32, 256, 0).entries)  # entries = tokens


def test_vq_exchange_is_unchanged_inside_the_model(monkeypatch):
  """GPT-2 mini at mesh 4 with k-means codebooks: the same logits, bit for bit,
  with the reference search in the exchange (each device encodes 2 x 64 tokens)."""
  from astra_jax.core import exchange as ex
  from astra_jax.run import calibrate
  from model_helpers import sequence_logits
  model, tokens = _gpt2_mini(exchange=ex.make_exchange("vq", groups=32, codebook_size=256))
  calibrate.kmeans_codebooks(model, [(tokens, jnp.arange(256))], jax.random.PRNGKey(2), iters=2)
  fast = np.asarray(sequence_logits(model, tokens, 4))
  monkeypatch.setattr(vq, "encode", vq.encode_reference)
  np.testing.assert_array_equal(fast, np.asarray(sequence_logits(model, tokens, 4)))


def test_encode_under_shard_map_vmap_and_grad():
  x, entries = _near_ties(3, 256, 8, 256, 4)
  want = np.asarray(jax.jit(vq.encode_reference)(x, entries))
  mesh = mesh_lib.make_seq_mesh(4)
  sharded = mesh_lib.sequence_parallel(lambda x, e: vq.encode(x, e), mesh,
                                       in_seq_dims=(0, None), out_seq_dims=0)
  np.testing.assert_array_equal(jax.jit(sharded)(x, entries), want)
  batched = jax.vmap(vq.encode, in_axes=(0, None))(x.reshape(4, 64, -1), entries)
  np.testing.assert_array_equal(np.asarray(batched).reshape(want.shape), want)

  def loss(x, search):
    q = vq.decode(search(x, entries), entries)
    return jnp.sum(jnp.sin(vq.straight_through(x, q))) + vq.commitment_loss(x, q)

  np.testing.assert_array_equal(jax.grad(loss)(x, vq.encode),
                                jax.grad(loss)(x, vq.encode_reference))


def test_encode_uses_the_reference_where_blocks_would_round_otherwise():
  entries = jnp.ones((4, 256, 8))
  assert vq._blocked_search_applies(300, entries)
  assert not vq._blocked_search_applies(1, entries)  # one token: a matrix-vector kernel
  assert not vq._blocked_search_applies(300, jnp.ones((32, 256, 1)))  # d = 1
  assert not vq._blocked_search_applies(300, entries.astype(jnp.bfloat16))
  x, e = _near_ties(5, 1, 4, 256, 8)
  _codes_equal(x, e)
  x, e = _near_ties(6, 64, 32, 1024, 1)
  _codes_equal(x, e)
