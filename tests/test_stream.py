"""The stream exchange: K/V (codes) only forward, to later devices (issue 28).

In a causal model a device reads only earlier devices' blocks, so sending
them forward alone must give the all-gather exchanges' outputs: bit for bit
for vq (same codebooks; the blocks not received are masked either way) and
for exact.  The compiled program's permutes all go from a device to a later
one.  Across processes the blocks go on host threads instead
(tests/test_multiprocess.py).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.core import exchange
from astra_jax.models import gpt2, llama, vit
from astra_jax.parallel import apply, mesh as mesh_lib


def _forward(model, mesh_size, inputs, out=1):
  graphdef, params, rest = apply.split_model(model)
  fn = jax.jit(apply.sequence_apply(graphdef, mesh_lib.seq_mesh_or_none(mesh_size),
                                    in_seq_dims=(1, 0), train=False, out_seq_dim=out))
  return fn, params, rest


def _gpt2(spec):
  return gpt2.GPT2(gpt2.GPT2Config(variant="nano", exchange=exchange.from_spec(spec)),
                   rngs=nnx.Rngs(0))


def _llama(spec):
  return llama.Llama(llama.LlamaConfig(variant="nano", exchange=exchange.from_spec(spec)),
                     rngs=nnx.Rngs(0))


TOKENS = jax.random.randint(jax.random.PRNGKey(3), (2, 32), 0, 256)


def _logits(build, spec, mesh_size):
  fn, params, rest = _forward(build(spec), mesh_size, None)
  return np.asarray(fn(params, rest, TOKENS, jnp.arange(32))[0])


@pytest.mark.parametrize("mesh_size", [1, 2, 4, 8])
def test_stream_equals_the_all_gather_exchanges(mesh_size):
  np.testing.assert_array_equal(_logits(_gpt2, "stream:groups=4,codebook_size=16", mesh_size),
                                _logits(_gpt2, "vq:groups=4,codebook_size=16", mesh_size))
  np.testing.assert_allclose(_logits(_gpt2, "stream:quantize=false", mesh_size),
                             _logits(_gpt2, "exact", mesh_size), atol=1e-6)


def test_stream_in_llama_with_rope_and_grouped_kv_heads():
  np.testing.assert_array_equal(_logits(_llama, "stream:groups=4,codebook_size=16", 4),
                                _logits(_llama, "vq:groups=4,codebook_size=16", 4))


def test_no_message_goes_backwards():
  fn, params, rest = _forward(_gpt2("stream:groups=4,codebook_size=16"), 4, None)
  hlo = fn.lower(params, rest, TOKENS, jnp.arange(32)).compile().as_text()
  pairs = re.findall(r"source_target_pairs=\{([^}]*)\}", hlo)
  assert pairs and "all-gather" not in hlo.replace("all-gather-done", "")
  sent = [tuple(map(int, p.split(","))) for group in pairs
          for p in re.findall(r"\{?(\d+,\d+)\}?", group)]
  assert sent and all(src < dst for src, dst in sent), sent
  # 2 layers x (P - 1) = 3 shifts, each from every device that has a later one
  assert len(pairs) == 2 * 3


def test_stream_refuses_bidirectional_models_and_training():
  model = vit.ViT(vit.ViTConfig(variant="mu/4", image_size=16,
                                exchange=exchange.from_spec("stream:quantize=false")),
                  rngs=nnx.Rngs(0))
  fn, params, rest = _forward(model, 2, None, out=None)
  with pytest.raises(ValueError, match="bidirectional model"):
    fn(params, rest, jnp.zeros((1, 16, 16)), jnp.arange(16))
  with pytest.raises(ValueError, match="stream exchange takes no boundary_rows"):
    exchange.from_spec("stream:groups=4,boundary_rows=1")
  graphdef, params, rest = apply.split_model(_gpt2("stream:quantize=false"))
  train = apply.sequence_apply(graphdef, mesh_lib.seq_mesh_or_none(2), in_seq_dims=(1, 0),
                               train=True, out_seq_dim=1)
  with pytest.raises(ValueError, match="for inference"):
    jax.jit(train)(params, rest, TOKENS, jnp.arange(32))
