"""Ring attention (exchange "ring") equals the exact all-gather exchange, forward
and gradients, on raw attention and on GPT-2, ViT and Llama; its traffic is
2 (P - 1) collective-permutes per layer moving what the all-gather moves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.core import axes
from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.core import attention, exchange as ex
from astra_jax.netsim import latency
from astra_jax.models import gpt2, llama, vit
from infer import traffic as traffic_cli

B, TS, H, HKV, DH = 2, 4, 4, 2, 8  # TS: shared tokens per device
TOL = dict(rtol=1e-5, atol=1e-5)
EXACT, RING = ex.make_exchange("exact"), ex.from_spec("ring")
ROPE = llama.Rope(DH, 10000.0, None)


def _inputs(mesh_size, private, hkv, seed=0):
  t = mesh_size * (private + TS)
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(kq, (B, t, H, DH)), jax.random.normal(kk, (B, t, hkv, DH)),
          jax.random.normal(kv, (B, t, hkv, DH)), jax.random.normal(kw, (B, t, H, DH)))


def _loss_and_grads(fn):
  """fn(params, w) -> (output, *aux)  =>  jitted params, w -> ((sum(output w), aux), grads)."""
  def loss(params, w):
    out, *aux = fn(params, w)
    return jnp.sum(out * w), (out, *aux)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _sharded_attend(exchange, mesh_size, *, causal, private, rope):
  """Loss and gradients w.r.t. (q, k, v) split over the mesh; aux: the output and
  the whole shared K and V each device saw."""
  def body(q, k, v):
    out, seen = attention.attend(exchange, (), q, k, v, causal=causal, private=private,
                                 axis_name=axes.current_seq_axis(),
                                 query_transform=rope, key_transform=rope)
    return out, seen.k[None], seen.v[None]

  fn = mesh_lib.sequence_parallel(body, mesh_lib.make_seq_mesh(mesh_size),
                                  in_seq_dims=(1, 1, 1), out_seq_dims=(1, 0, 0))
  return _loss_and_grads(lambda qkv, w: fn(*qkv))


@pytest.mark.parametrize("mesh_size", [2, 4])
@pytest.mark.parametrize("causal,private,hkv,rope", [
    (True, 0, H, None),  # plain causal
    (True, 0, HKV, ROPE),  # Llama-style: GQA + RoPE
    (False, 1, HKV, ROPE),  # bidirectional, ViT-style private class token, GQA + RoPE on top
])
def test_ring_attend_equals_exact_forward_and_gradients(mesh_size, causal, private, hkv, rope):
  q, k, v, w = _inputs(mesh_size, private, hkv)
  kw = dict(causal=causal, private=private, rope=rope)
  ((_, (out_r, k_r, v_r)), g_r), ((_, (out_e, k_e, v_e)), g_e) = (
      _sharded_attend(e, mesh_size, **kw)((q, k, v), w) for e in (RING, EXACT))
  np.testing.assert_allclose(out_r, out_e, **TOL)
  # what SequenceAttention records: every device saw the whole shared K/V exactly
  for seen_r, seen_e in ((k_r, k_e), (v_r, v_e)):
    np.testing.assert_array_equal(seen_r, seen_e)
  for a, b in zip(g_r, g_e):
    np.testing.assert_allclose(a, b, **TOL)


def test_ring_gather_is_the_all_gather():
  _, k, v, _ = _inputs(4, 0, HKV)

  def body(k, v):
    axis = axes.current_seq_axis()
    return tuple(jnp.stack([out.k, out.v])[None] for out in (
        e.gather((), k, v, axis_name=axis) for e in (RING, EXACT)))

  ring, exact = jax.jit(mesh_lib.sequence_parallel(
      body, mesh_lib.make_seq_mesh(4), in_seq_dims=(1, 1), out_seq_dims=0))(k, v)
  np.testing.assert_array_equal(ring, exact)
  np.testing.assert_array_equal(exact[0], jnp.stack([k, v]))


def test_single_device_ring_is_dense_attention():
  q, k, v, _ = _inputs(1, 0, HKV)
  out, seen = jax.jit(lambda q, k, v: attention.attend(RING, (), q, k, v, causal=True))(q, k, v)
  pos = jnp.arange(q.shape[1])
  np.testing.assert_allclose(out, attention.dot_product_attention(
      q, k, v, q_pos=pos, k_pos=pos, causal=True), **TOL)
  assert seen.k.shape == k.shape


# --- models: same parameters, exchange ring vs exact, mesh 4 ------------------------------

def _gpt2(exchange):
  return gpt2.GPT2(gpt2.GPT2Config(variant="nano", vocab_size=64, context=32,
                                   exchange=exchange), rngs=nnx.Rngs(0))


def _llama(exchange):
  cfg = llama.LlamaConfig(variant="nano", vocab_size=64, context=32, rope_theta=10000.0,
                          exchange=exchange)
  assert cfg.sizes.kv_heads < cfg.sizes.heads  # grouped-query attention
  return llama.Llama(cfg, rngs=nnx.Rngs(0))


def _vit(exchange):
  cfg = vit.ViTConfig(image_size=16, exchange=exchange)  # 16 patches + a class token each
  return vit.ViT(cfg, rngs=nnx.Rngs(0))


def _lm_inputs():
  """Tokens, positions; logits [B, T, V] split over the sequence (dim 1); labels [B, T]."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
  return (tokens, jnp.arange(16)), 1, jnp.roll(tokens, -1, axis=1)


def _vit_inputs():
  """Patches, positions; logits [B, classes] replicated; labels [B]."""
  imgs = jax.random.normal(jax.random.PRNGKey(7), (2, 16, 16, 1))
  return (vit.patchify(imgs, 4), jnp.arange(16)), None, jnp.arange(2)


@pytest.mark.parametrize("build,inputs", [(_gpt2, _lm_inputs), (_vit, _vit_inputs),
                                          (_llama, _lm_inputs)],
                         ids=["gpt2", "vit", "llama"])
def test_models_with_ring_equal_exact_forward_and_gradients(build, inputs):
  """Logits and the gradient of the mean cross-entropy (the training objective)."""
  args, out_dim, labels = inputs()
  mesh = mesh_lib.make_seq_mesh(4)
  _, params, rest = apply.split_model(build(EXACT))
  # a non-trivial head (ViT's is zero-initialised), the same for both exchanges
  params = jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)

  def run(exchange):
    graphdef = apply.split_model(build(exchange))[0]
    fn = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=False,
                              out_seq_dim=out_dim)

    def loss(params):
      logits = fn(params, rest, *args)[0]
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)
      return -jnp.mean(logp), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  ((_, out_r), g_r), ((_, out_e), g_e) = run(RING), run(EXACT)
  assert float(jnp.abs(out_e).max()) > 0.1
  np.testing.assert_allclose(out_r, out_e, **TOL)
  for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_e)):
    np.testing.assert_allclose(a, b, **TOL)


# --- traffic and configuration ------------------------------------------------------------

@pytest.mark.parametrize("mesh_size", [2, 4])
def test_ring_traffic_is_2_p_minus_1_permutes_moving_the_all_gathers_bytes(mesh_size):
  layers, p = 2, mesh_size
  kw = dict(mesh_size=p, layers=layers, batch=2, seq_len=16, dim=32, heads=4,
            dtype="float32")
  ring, ring_formula = traffic_cli.attention_stack_traffic(RING, **kw)
  exact, exact_formula = traffic_cli.attention_stack_traffic(EXACT, **kw)
  assert exact_formula == exact.bytes_per_device > 0
  assert ring_formula == ring.bytes_per_device == (p - 1) * exact_formula  # P - 1 sends
  kinds = ring.by_kind()
  assert set(kinds) == {"collective-permute"}  # no all-gather: K/V never gathered whole
  assert kinds["collective-permute"]["count"] == layers * 2 * (p - 1)
  # each permute carries one block (B Tl Dkv floats), so the operand bytes summed
  # over the P - 1 steps are P - 1 times the all-gather's one contributed block ...
  assert ring.bytes_per_device == (p - 1) * exact_formula
  # ... and the bytes reaching each device are the all-gather's (latency wire model)
  wire = lambda report: sum(latency.wire_bytes(c.kind, c.operand_bytes, p, "switched")
                            for c in report.collectives)
  assert wire(ring) == wire(exact) == (p - 1) * exact_formula


def test_ring_refuses_a_lossy_link():
  with pytest.raises(ValueError, match="ring.*drop_rate=0.1.*use exact or vq for a lossy link"):
    ex.from_spec("ring:drop_rate=0.1")
  assert RING.bytes_per_token(32, jnp.float32) == EXACT.bytes_per_token(32, jnp.float32)
  assert ex.same_state(RING, ex.make_exchange("ring"))
