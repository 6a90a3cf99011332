"""The evaluation forward every CLI uses: a model at P devices, jitted, with
its inputs' placement (sequence-parallel, or tensor-parallel over ``tp``);
and ``timed_compile`` / ``say_compiled``, which tell a user waiting for a big
compile how long it took."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from astra_jax.parallel import mesh as mesh_lib
from astra_jax.parallel.apply import sequence_apply, split_model
from astra_jax.parallel.tensor_apply import make_tp_mesh, tensor_apply


@dataclasses.dataclass(frozen=True)
class Forward:
  """A jitted evaluation forward and where its inputs go.

  ``fn(params, rest, *inputs) -> (outputs, rest, aux)``; ``place(arrays,
  seq_dims)`` puts host inputs on the mesh: split along their sequence
  dimensions for sequence parallelism, whole on every device for tensor
  parallelism.
  """

  fn: Callable[..., Any]
  params: Any
  rest: Any
  mesh: Mesh | None
  tensor: bool = False

  def place(self, arrays: Any, seq_dims: Any) -> Any:
    if self.tensor:
      return mesh_lib.replicate(arrays, self.mesh)
    return mesh_lib.to_global(arrays, self.mesh, seq_dims)


def inference_forward(model: nnx.Module, mesh_size: int, *, out_seq_dim: Any = None,
                      tensor: bool = False) -> Forward:
  """The forward that evaluates ``model`` at ``mesh_size`` devices (eval mode, no
  training noise): sequence-parallel, or tensor-parallel over a ``tp`` axis
  with ``tensor=True`` (the model's ``cfg.sync`` at every sync point).  Params
  and rest are replicated over the mesh (checkpoints restore onto one device).
  """
  graphdef, params, rest = split_model(model)
  if tensor:
    mesh = make_tp_mesh(mesh_size) if mesh_size > 1 else None
    fn = tensor_apply(graphdef, mesh, model.tensor_layout(), inputs=2)
  else:
    mesh = mesh_lib.seq_mesh_or_none(mesh_size)
    fn = sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=False,
                        out_seq_dim=out_seq_dim)
  params, rest = mesh_lib.replicate((params, rest), mesh)
  return Forward(jax.jit(fn), params, rest, mesh, tensor)


def timed_compile(jitted: Callable, what: str, *, stderr: bool = False) -> Callable:
  """``jitted`` that says ``compiled WHAT in N s`` at its first call (``say_compiled``).

  That call compiles ahead of time (``jitted.lower(*args).compile()``), to time
  the compile alone, then calls ``jitted``, which finds the executable in jax's
  cache: nothing compiles twice.  Later calls go straight to ``jitted``.
  """
  first = True

  def call(*args):
    nonlocal first
    if first:
      first = False
      start = time.perf_counter()
      jitted.lower(*args).compile()
      say_compiled(what, time.perf_counter() - start, stderr=stderr)
    return jitted(*args)

  return call


def say_compiled(what: str, seconds: float, *, stderr: bool = False) -> None:
  """Prints ``compiled WHAT in N s`` (process 0) on stdout, before a CLI's closing
  JSON line, or on stderr with ``stderr``, where stdout is the output itself (as
  generated text is).  Written through tqdm: an open progress bar is not torn."""
  if jax.process_index() == 0:
    out = sys.stderr if stderr else sys.stdout
    tqdm.write(f"compiled {what} in {seconds:.1f} s", file=out)
    out.flush()
