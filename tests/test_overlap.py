"""Overlapped attend (``overlap=true``): the all-gather issued first, the own block
folded in before the gathered rest.  Equal to the dense path and to a reference
written out device by device, forward and gradients; the same one all-gather
per layer; the own block's attention does not wait for the collective."""

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.core import attention, axes, exchange as ex, quantizer as vq
from astra_jax.models import gpt2, llama, vit
from astra_jax.parallel import apply, mesh as mesh_lib
from infer import traffic as traffic_cli

B, TS, H, HKV, DH = 2, 4, 4, 2, 8  # TS: shared tokens per device
TOL = dict(rtol=1e-5, atol=1e-5)
GROUPS, CODES = 4, 16
ROPE = llama.Rope(DH, 10000.0, None)


def _warp(x, pos):
  """A position-dependent map that is not RoPE (scales and shifts each token)."""
  t = pos.astype(jnp.float32)[None, :, None, None]
  return x * (1.0 + 0.1 * jnp.cos(t)) + 0.01 * t


def _exchange(name, overlap, **opts):
  if name == "vq":
    opts = dict(groups=GROUPS, codebook_size=CODES, **opts)
  return ex.make_exchange(name, overlap=overlap, **opts)


def _inputs(p, private, hkv, seed=0):
  t = p * (private + TS)
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(kq, (B, t, H, DH)), jax.random.normal(kk, (B, t, hkv, DH)),
          jax.random.normal(kv, (B, t, hkv, DH)), jax.random.normal(kw, (B, t, H, DH)))


def _shared(x, p, private):
  """[B, P (private + Ts), ...] -> the shared tokens [B, P Ts, ...] in device order."""
  tl = x.shape[1] // p
  return jnp.concatenate([x[:, d * tl + private:(d + 1) * tl] for d in range(p)], axis=1)


def _codebooks(k, v, p, private):
  """k-means codebooks of the shared tokens (lossy: 16 entries per group)."""
  flat = lambda x: _shared(x, p, private).reshape(-1, x.shape[2] * DH)
  return ex.VQState(vq.kmeans_init(jax.random.PRNGKey(5), flat(k), GROUPS, CODES),
                    vq.kmeans_init(jax.random.PRNGKey(6), flat(v), GROUPS, CODES))


def _decoded(x, cb):
  flat = x.reshape(*x.shape[:2], -1)
  return vq.decode(vq.encode(flat, cb.entries), cb.entries).reshape(x.shape)


def reference(q, k, v, p, *, causal, private=0, transform=None, k_hat=None, v_hat=None,
              valid=None):
  """Device by device, written out: device d's queries against its own private
  tokens and every device's shared tokens (its own exact, the others as
  ``k_hat``/``v_hat`` when given); ``valid[d]`` [B, private + P Ts]: the keys d
  received."""
  tl = q.shape[1] // p
  ts = tl - private
  outs = []
  for d in range(p):
    own = (jnp.arange(p * ts) // ts == d)[None, :, None, None]
    seen = lambda x, x_hat: (_shared(x, p, private) if x_hat is None else
                             jnp.where(own, _shared(x, p, private), _shared(x_hat, p, private)))
    rows = slice(d * tl, (d + 1) * tl)
    kd = jnp.concatenate([k[:, d * tl:d * tl + private], seen(k, k_hat)], axis=1)
    vd = jnp.concatenate([v[:, d * tl:d * tl + private], seen(v, v_hat)], axis=1)
    qd, q_pos, k_pos = q[:, rows], d * tl + jnp.arange(tl), jnp.arange(kd.shape[1])
    if transform is not None:
      qd, kd = transform(qd, q_pos), transform(kd, k_pos)
    rep = H // k.shape[2]
    kd, vd = jnp.repeat(kd, rep, axis=2), jnp.repeat(vd, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qd, kd) / np.sqrt(DH)
    mask = (k_pos[None] <= q_pos[:, None]) if causal else jnp.ones(s.shape[-2:], bool)
    mask = mask[None, None] if valid is None else mask[None, None] & valid[d][:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    outs.append(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vd))
  return jnp.concatenate(outs, axis=1)


def _sharded(exchange, p, *, causal, private=0, transform=None, train=False, key=None):
  """Jitted (state, q, k, v, w) -> ((out, new state, aux loss), grads of sum(out w)
  w.r.t. (q, k, v)) on a mesh of ``p`` devices."""
  def body(state, q, k, v):
    out, got = attention.attend(exchange, state, q, k, v, causal=causal, train=train,
                                key=key, axis_name=axes.current_seq_axis(), private=private,
                                query_transform=transform, key_transform=transform)
    return out, got.state, got.loss

  fn = mesh_lib.sequence_parallel(body, mesh_lib.make_seq_mesh(p), in_seq_dims=(None, 1, 1, 1),
                                  out_seq_dims=(1, None, None))

  def loss(qkv, state, w):
    out, new_state, aux = fn(state, *qkv)
    return jnp.sum(out * w), (out, new_state, aux)

  run = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return lambda state, q, k, v, w: (lambda r: (r[0][1], r[1]))(run((q, k, v), state, w))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, **TOL)


# --- one attention layer ------------------------------------------------------------------

CASES = {
    "causal": (True, 0, H, None),
    "causal-gqa-rope": (True, 0, HKV, ROPE),  # Llama-style
    "bidirectional-private-gqa-warp": (False, 1, HKV, _warp),  # ViT-style class token
}


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["exact", "vq"])
def test_overlap_equals_dense_path_and_reference(name, case, p):
  """Inference (vq: packed codes): outputs and gradients w.r.t. q, k, v."""
  causal, private, hkv, transform = CASES[case]
  q, k, v, w = _inputs(p, private, hkv, seed=p)
  state = _codebooks(k, v, p, private) if name == "vq" else ()
  kw = dict(causal=causal, private=private, transform=transform)
  (out_o, _, _), g_o = _sharded(_exchange(name, True), p, **kw)(state, q, k, v, w)
  (out_d, _, _), g_d = _sharded(_exchange(name, False), p, **kw)(state, q, k, v, w)
  _assert_same((out_o, g_o), (out_d, g_d))
  hat = dict(k_hat=_decoded(k, state.k), v_hat=_decoded(v, state.v)) if name == "vq" else {}
  ref = lambda q, k, v: reference(q, k, v, p, **kw, **hat)
  want, vjp = jax.vjp(ref, q, k, v)
  np.testing.assert_allclose(out_o, want, **TOL)
  if name == "exact":  # vq at inference sends codes: no gradient reaches a remote K/V
    _assert_same(g_o, vjp(w))
  if name == "vq" and p == 4:  # 32 shared tokens, 16 entries: the codes are lossy
    assert float(jnp.abs(out_o - reference(q, k, v, p, **kw)).max()) > 1e-3


@pytest.mark.parametrize("case", ["causal-gqa-rope", "bidirectional-private-gqa-warp"])
def test_vq_training_overlap_equals_dense_path(case):
  """Training: straight-through, noise and codebook update from the same key give
  the same values, gradients, codebooks and commitment loss."""
  causal, private, hkv, transform = CASES[case]
  p = 4
  q, k, v, w = _inputs(p, private, hkv, seed=11)
  state = _codebooks(k, v, p, private)
  kw = dict(causal=causal, private=private, transform=transform, train=True,
            key=jax.random.PRNGKey(3))
  got_o, g_o = _sharded(_exchange("vq", True), p, **kw)(state, q, k, v, w)
  got_d, g_d = _sharded(_exchange("vq", False), p, **kw)(state, q, k, v, w)
  _assert_same((got_o, g_o), (got_d, g_d))
  assert float(jnp.abs(g_o[1]).max()) > 0  # gradients reach the keys
  # the noise is there: without it the output is the decoded reference
  quiet = _sharded(_exchange("vq", True, noise_scale=0.0), p, **kw)(state, q, k, v, w)[0][0]
  np.testing.assert_allclose(quiet, reference(
      q, k, v, p, causal=causal, private=private, transform=transform,
      k_hat=_decoded(k, state.k), v_hat=_decoded(v, state.v)), **TOL)
  assert float(jnp.abs(got_o[0] - quiet).max()) > 1e-3


@pytest.mark.parametrize("case", ["causal", "bidirectional-private-gqa-warp"])
@pytest.mark.parametrize("name", ["exact", "vq"])
def test_lossy_link_overlap_equals_dense_path_and_reference(name, case):
  """drop_rate > 0: the same tokens are lost (same key) and masked out."""
  causal, private, hkv, transform = CASES[case]
  p, rate, key = 4, 0.3, jax.random.PRNGKey(7)
  q, k, v, w = _inputs(p, private, hkv, seed=13)
  state = _codebooks(k, v, p, private) if name == "vq" else ()
  kw = dict(causal=causal, private=private, transform=transform, key=key)
  (out_o, _, _), g_o = _sharded(_exchange(name, True, drop_rate=rate), p, **kw)(
      state, q, k, v, w)
  (out_d, _, _), g_d = _sharded(_exchange(name, False, drop_rate=rate), p, **kw)(
      state, q, k, v, w)
  _assert_same((out_o, g_o), (out_d, g_d))
  _, drop_key = jax.random.split(key)  # as attend splits it
  masks = jax.jit(mesh_lib.sequence_parallel(
      lambda x: attention.received_tokens(drop_key, rate, B, p * TS, TS,
                                          axes.current_seq_axis())[None],
      mesh_lib.make_seq_mesh(p), in_seq_dims=(1,), out_seq_dims=0))(q)  # [P, B, P Ts]
  assert 0.1 < 1 - float(masks.mean()) < 0.4  # tokens really are lost
  valid = jnp.concatenate([jnp.ones((p, B, private), bool), masks], axis=2)
  hat = dict(k_hat=_decoded(k, state.k), v_hat=_decoded(v, state.v)) if name == "vq" else {}
  np.testing.assert_allclose(out_o, reference(
      q, k, v, p, causal=causal, private=private, transform=transform, valid=valid, **hat),
      **TOL)


def test_without_a_mesh_overlap_changes_nothing():
  q, k, v, _ = _inputs(1, 0, HKV)
  run = lambda e: jax.jit(lambda q, k, v: attention.attend(
      e, (), q, k, v, causal=True, query_transform=ROPE, key_transform=ROPE)[0])(q, k, v)
  np.testing.assert_array_equal(run(_exchange("exact", True)), run(_exchange("exact", False)))


# --- what the compiler gets ---------------------------------------------------------------

def _dots(jaxpr, tainted_in) -> tuple[list[bool], list[bool]]:
  """(for each dot_general in ``jaxpr``: whether it waits for an all_gather, for
  each output: whether it does).  Calls (jit, shard_map, custom_jvp) are walked
  into with their inputs mapped one to one."""
  tainted = {v for v, t in zip(jaxpr.invars, tainted_in) if t}
  dots = []
  for eqn in jaxpr.eqns:
    dep = [not isinstance(x, jcore.Literal) and x in tainted for x in eqn.invars]
    subs = [s.jaxpr if isinstance(s, jcore.ClosedJaxpr) else s
            for s in eqn.params.values() if isinstance(s, (jcore.Jaxpr, jcore.ClosedJaxpr))]
    if eqn.primitive.name == "all_gather":
      out = [True] * len(eqn.outvars)
    elif subs:
      inner, out = _dots(subs[0], dep)
      dots += inner
    else:
      out = [any(dep)] * len(eqn.outvars)
      if eqn.primitive.name == "dot_general":
        dots.append(any(dep))
    tainted |= {x for x, t in zip(eqn.outvars, out) if t}
  return dots, [not isinstance(x, jcore.Literal) and x in tainted for x in jaxpr.outvars]


@pytest.mark.parametrize("name", ["exact", "vq"])
def test_own_block_attention_does_not_wait_for_the_all_gather(name):
  """With overlap, the own block's logits and weighted values (2 dots) depend on
  nothing the all-gather returns; without it, every attention dot does."""
  q, k, v, _ = _inputs(4, 0, HKV)
  state = _codebooks(k, v, 4, 0) if name == "vq" else ()

  def free_dots(overlap):
    e = _exchange(name, overlap)
    fn = mesh_lib.sequence_parallel(
        lambda s, q, k, v: attention.attend(e, s, q, k, v, causal=True,
                                            axis_name=axes.current_seq_axis())[0],
        mesh_lib.make_seq_mesh(4), in_seq_dims=(None, 1, 1, 1), out_seq_dims=1)
    jaxpr = jax.make_jaxpr(fn)(state, q, k, v).jaxpr
    dots, _ = _dots(jaxpr, [False] * len(jaxpr.invars))
    return dots.count(False), dots.count(True)

  encode = 2 if name == "vq" else 0  # vq's distances to the codebook entries (K and V)
  assert free_dots(False) == (encode, 2)
  assert free_dots(True) == (encode + 2, 2)


@pytest.mark.parametrize("name,opts", [("exact", {}), ("vq", {"groups": 32})])
def test_one_all_gather_per_layer_with_the_same_bytes(name, opts):
  kw = dict(mesh_size=4, layers=2, batch=2, seq_len=64, dim=768, heads=12, dtype="float32")
  over, formula = traffic_cli.attention_stack_traffic(
      ex.make_exchange(name, overlap=True, **opts), **kw)
  dense, _ = traffic_cli.attention_stack_traffic(ex.make_exchange(name, **opts), **kw)
  assert over.by_kind() == dense.by_kind()
  assert over.by_kind()["all-gather"]["count"] == 2  # one per layer
  assert over.bytes_per_device == dense.bytes_per_device == formula > 0


def test_specs_and_state():
  assert ex.from_spec("vq:groups=32,overlap=true") == ex.make_exchange("vq", groups=32,
                                                                        overlap=True)
  assert ex.from_spec("exact:overlap=true").overlap
  assert not ex.from_spec("exact").overlap
  # a vq run trained without overlap evaluates with it (the same codebooks)
  assert ex.same_state(ex.from_spec("vq:groups=32"),
                       ex.from_spec("vq:groups=32,overlap=true,drop_rate=0.1"))
  assert not ex.same_state(ex.from_spec("vq:groups=32"), ex.from_spec("vq:groups=8,overlap=true"))
  with pytest.raises(ValueError, match="ring.*already attends block by block.*overlap"):
    ex.from_spec("ring:overlap=true")


# --- whole models: same parameters, overlap on and off, mesh 4 ---------------------------

VQ = "vq:groups=4,codebook_size=16"


def _gpt2(spec):
  return gpt2.GPT2(gpt2.GPT2Config(variant="nano", vocab_size=64, context=32,
                                   exchange=ex.from_spec(spec)), rngs=nnx.Rngs(0))


def _llama(spec):
  cfg = llama.LlamaConfig(variant="nano", vocab_size=64, context=32, rope_theta=10000.0,
                          exchange=ex.from_spec(spec))
  assert cfg.sizes.kv_heads < cfg.sizes.heads  # grouped-query attention, RoPE
  return llama.Llama(cfg, rngs=nnx.Rngs(0))


def _vit(spec):
  cfg = vit.ViTConfig(image_size=16, exchange=ex.from_spec(spec))  # a class token per device
  return vit.ViT(cfg, rngs=nnx.Rngs(0))


def _lm_inputs():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
  return (tokens, jnp.arange(16)), 1, jnp.roll(tokens, -1, axis=1)


def _vit_inputs():
  imgs = jax.random.normal(jax.random.PRNGKey(7), (2, 16, 16, 1))
  return (vit.patchify(imgs, 4), jnp.arange(16)), None, jnp.arange(2)


@pytest.mark.parametrize("build,inputs,spec", [(_gpt2, _lm_inputs, VQ), (_llama, _lm_inputs, VQ),
                                               (_vit, _vit_inputs, "exact")],
                         ids=["gpt2-vq", "llama-vq", "vit-exact"])
def test_models_with_overlap_equal_without(build, inputs, spec):
  """Logits and the gradient of the mean cross-entropy, 4 devices."""
  args, out_dim, labels = inputs()
  mesh = mesh_lib.make_seq_mesh(4)
  _, params, rest = apply.split_model(build(spec))
  params = jax.tree.map(  # a non-trivial head (ViT's is zero-initialised)
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)

  def run(spec):
    graphdef = apply.split_model(build(spec))[0]
    fn = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=False,
                              out_seq_dim=out_dim)

    def loss(params):
      logits = fn(params, rest, *args)[0]
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)
      return -jnp.mean(logp), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  ((_, out_o), g_o), ((_, out_d), g_d) = run(spec + (",overlap=true" if ":" in spec
                                                     else ":overlap=true")), run(spec)
  assert float(jnp.abs(out_d).max()) > 0.1
  _assert_same((out_o, g_o), (out_d, g_d))
