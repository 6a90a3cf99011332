"""Running a model the way the library does, for the model tests."""

import jax
import jax.numpy as jnp

from astra_jax.parallel import apply, mesh as mesh_lib


def sequence_logits(model, tokens, mesh_size):
  """Logits of a causal LM over ``mesh_size`` devices (None: one device, no shard_map)."""
  graphdef, params, rest = apply.split_model(model)
  mesh = None if mesh_size is None else mesh_lib.make_seq_mesh(mesh_size)
  fn = apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=False, out_seq_dim=1)
  return jax.jit(fn)(params, rest, tokens, jnp.arange(tokens.shape[1]))[0]
