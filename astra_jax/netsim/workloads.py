"""The models the latency bench runs, and what it needs from each: bytes and seconds.

A workload is a model family and config plus the sequence it prefills
(ViT-B/16 on 512x512 images = 1024 patches, GPT-2 S/M on 1024 tokens, and the
tiny CPU models this project trains).  For the latency model it supplies:

  ``traffic``  collectives per layer and after the last layer, read from the
               compiled program of a 1-layer and a 2-layer slice of the real
               model (built abstractly with ``nnx.eval_shape``: compiled, never
               run): per layer = (2 layers) - (1 layer), final = (1 layer) -
               per layer, by collective kind.  Compiling 24 layers of GPT-2
               medium on a CPU is slow; the slices give the same bytes.
  ``costs``    analytic FLOPs/bytes (``astra_jax.netsim.flops``) of a layer and of the
               embedding / head on one of P devices.
  Every function takes a strategy: a K/V exchange (sequence parallel) or a
  tensor-parallel sync (``astra_jax.core.sync``; ``is_tensor``).
  ``measure``  seconds on this host for one device's share: the per-device
               program of a 1- and a 4-layer slice is ``vmap``-ed over P (the
               collectives become in-memory gathers), timed, and divided by P.

The JAX imports sit inside the functions, so the CLI can set the number of
fake CPU devices before jax starts.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from astra_jax.core import axes
from astra_jax.netsim import flops
from astra_jax.netsim.latency import Transfer


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  family: str  # "vit" | "gpt2" | "llama"
  description: str
  # ViTConfig / GPT2Config / LlamaConfig fields, or a function returning them
  # (lets options that need the model module wait until JAX may start)
  options: Any
  tiny: bool = False

  def config(self, strategy=None):
    """The model config; ``strategy``: a K/V exchange (default exact) or a
    tensor-parallel sync (``astra_jax.core.sync``)."""
    from astra_jax.core import exchange as exchange_lib
    options = dict(self.options() if callable(self.options) else self.options)
    if is_tensor(strategy):
      options["sync"] = strategy
    else:
      options["exchange"] = strategy or exchange_lib.make_exchange("exact")
    return _family(self.family)[0](**options)

  @property
  def tokens(self) -> int:
    cfg = self.config()
    return cfg.num_patches if self.family == "vit" else cfg.context

  @property
  def layers(self) -> int:
    return self.config().sizes[1]

  @property
  def shape(self) -> flops.LayerShape:
    cfg = self.config()
    if self.family == "vit":
      width, _, heads, mlp = cfg.sizes
      return flops.LayerShape(self.tokens, width, heads, mlp, private=1)
    if self.family == "llama":
      s = cfg.sizes
      return flops.LayerShape(self.tokens, s.heads * s.head_dim, s.heads, s.mlp_dim,
                              kv_width=cfg.kv_dim, mlp_matrices=3,
                              itemsize=jnp_itemsize(cfg.param_dtype))
    width, _, heads = cfg.sizes
    return flops.LayerShape(self.tokens, width, heads, 4 * width)


def is_tensor(strategy) -> bool:
  """Whether ``strategy`` is a tensor-parallel sync (else a K/V exchange or None)."""
  from astra_jax.core import sync
  return isinstance(strategy, sync.Sync)


def parse_strategy(spec: str):
  """A bench spec string -> a K/V exchange or a tensor-parallel sync."""
  from astra_jax.core import exchange
  from astra_jax.core import sync
  if sync.is_spec(spec):
    return sync.from_spec(spec)
  if spec.partition(":")[0].strip() not in exchange.available():
    raise ValueError(f"unknown strategy {spec!r}: choose a K/V exchange "
                     f"{exchange.available()} or a tensor-parallel sync "
                     f"{sync.available()}")
  return exchange.from_spec(spec)


def jnp_itemsize(dtype: str) -> int:
  import numpy as np
  return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _family(name: str):
  """(config class, model class) of a model family."""
  from astra_jax.models import gpt2, llama, vit
  return {"vit": (vit.ViTConfig, vit.ViT), "gpt2": (gpt2.GPT2Config, gpt2.GPT2),
          "llama": (llama.LlamaConfig, llama.Llama)}[name]


def _llama8b_options():
  from astra_jax.models import llama
  opts = dict(llama.RELEASES["8b"], context=1024)  # the prefill length, not the RoPE limit
  return tuple(opts.items()) + (("variant", "8b"),)


def _smollm2_options():
  """The bundled SmolLM2-135M's shape, read from its GGUF metadata (the file must be
  installed: ``bash setup.sh``), with a 1024-token prefill."""
  from astra_jax.io import pretrained
  cfg = pretrained.model_config(pretrained.parse("smollm2"))
  keep = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in ("exchange", "sync")}
  return tuple(dict(keep, context=1024).items())


WORKLOADS = {w.name: w for w in [
    Workload("vit-b16", "vit", "ViT-B/16, 512x512 RGB image = 1024 patches, 1000 classes",
             (("variant", "B/16"), ("image_size", 512), ("channels", 3),
              ("num_classes", 1000))),
    Workload("gpt2-small", "gpt2", "GPT-2 small (124M), prefill of 1024 tokens",
             (("variant", "small"), ("vocab_size", 50257), ("context", 1024))),
    Workload("gpt2-medium", "gpt2", "GPT-2 medium (355M), prefill of 1024 tokens",
             (("variant", "medium"), ("vocab_size", 50257), ("context", 1024))),
    Workload("gpt2-mini", "gpt2", "GPT-2 mini (256 x 6), byte tokens, prefill of 1024 "
             "(the testbed's mid-size model)",
             (("variant", "mini"), ("vocab_size", 256), ("context", 1024))),
    Workload("llama3-8b", "llama", "Llama 3.1 8B shape (32 x 4096, 8 K/V heads of 128), "
             "prefill of 1024 tokens", _llama8b_options),
    Workload("smollm2", "llama", "SmolLM2-135M-Instruct, the bundled pretrained model "
             "(30 x 576, 9 heads, 3 K/V heads of 64), prefill of 1024 tokens", _smollm2_options),
    Workload("vit-mu7", "vit", "ViT-mu/7 on 28x28 Fashion-MNIST = 16 patches (tiny)",
             (("variant", "mu/7"), ("image_size", 28), ("channels", 1),
              ("num_classes", 10)), tiny=True),
    Workload("gpt2-micro", "gpt2", "GPT-2 micro, byte tokens, prefill of 256 (tiny)",
             (("variant", "micro"), ("vocab_size", 256), ("context", 256)), tiny=True),
]}


def get(name: str) -> Workload:
  if name not in WORKLOADS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(WORKLOADS)}")
  return WORKLOADS[name]


def costs(workload: Workload, mesh_size: int, strategy=None):
  """(layer, embed, head) ``flops.Cost`` on one of ``mesh_size`` devices.

  ViT: patch embedding of the local patches; head on the class token.
  GPT-2: embedding lookups (memory only); the LM head on the last token only,
  which is what a prefill returns (the next-token distribution).  Tensor
  parallel: every device embeds every token.
  """
  shape = workload.shape
  if is_tensor(strategy):
    head_dim = shape.attn // shape.heads
    layer = flops.tensor_layer_cost(shape, mesh_size, strategy, head_dim)
    tl = shape.tokens
  else:
    layer = flops.layer_cost(shape, mesh_size, strategy)
    tl = shape.local_tokens(mesh_size)
  cfg = workload.config()
  s = shape.itemsize
  if workload.family == "vit":
    embed = flops.dense_cost(tl, cfg.patch * cfg.patch * cfg.channels, shape.width, s)
    head = flops.dense_cost(1, shape.width, cfg.num_classes, s)
  else:
    embed = flops.Cost(0, 3 * tl * shape.width * s)  # two table rows read, sum written
    head = flops.dense_cost(1, shape.width, cfg.vocab_size, s)
  return layer, embed, head


_BLOCKS = {"vit": "blocks", "gpt2": "h", "llama": "layers"}


def _model(workload: Workload, exchange, layers: int, abstract: bool):
  """The workload's model cut to its first ``layers`` blocks."""
  from flax import nnx
  cfg = workload.config(exchange)
  cls = _family(workload.family)[1]
  attr = _BLOCKS[workload.family]

  def make():
    model = cls(cfg, rngs=nnx.Rngs(0))
    setattr(model, attr, nnx.List(list(getattr(model, attr))[:layers]))
    return model

  return nnx.eval_shape(make) if abstract else make()


def _inputs(workload: Workload, batch: int = 1):
  """(inputs, positions) as ShapeDtypeStructs for the whole sequence."""
  import jax
  import jax.numpy as jnp
  cfg = workload.config()
  t = workload.tokens
  if workload.family == "vit":
    x = jax.ShapeDtypeStruct((batch, t, cfg.patch * cfg.patch * cfg.channels), jnp.float32)
  else:
    x = jax.ShapeDtypeStruct((batch, t), jnp.int32)
  return x, jax.ShapeDtypeStruct((t,), jnp.int32)


def _out_seq_dim(workload: Workload):
  return None if workload.family == "vit" else 1  # ViT logits are mesh-averaged


def _by_kind(report) -> dict[str, tuple[int, int]]:
  out = {}
  for kind, row in report.by_kind().items():
    out[kind] = (row["count"], row["operand_bytes"])
  return out


@dataclasses.dataclass(frozen=True)
class LayerTraffic:
  """Collectives of one layer and of the rest of the forward, from compiled HLO."""

  per_layer: tuple[Transfer, ...]
  final: tuple[Transfer, ...]

  @property
  def layer_bytes(self) -> int:
    return sum(t.operand_bytes for t in self.per_layer)

  @property
  def final_bytes(self) -> int:
    return sum(t.operand_bytes for t in self.final)

  def total_bytes(self, layers: int) -> int:
    return layers * self.layer_bytes + self.final_bytes


def traffic(workload: Workload, strategy, mesh_size: int) -> LayerTraffic:
  """Per-layer and final collectives of ``workload`` on ``mesh_size`` devices (HLO),
  sequence-parallel with an exchange or tensor-parallel with a sync."""
  if mesh_size == 1:
    return LayerTraffic((), ())
  import jax
  from astra_jax.parallel import apply, mesh as mesh_lib
  from astra_jax.parallel import tensor_apply as tp_apply
  from astra_jax.netsim import traffic as traffic_lib
  tensor = is_tensor(strategy)
  if tensor:
    if getattr(strategy, "drop", "all") not in ("all", ()):
      raise ValueError(f"the bench scales one layer's traffic to all layers; SPD must drop "
                       f"every block or none there (spd:drop=all), not {strategy.drop}")
    mesh = tp_apply.make_tp_mesh(mesh_size)
  else:
    mesh_lib.check_divisible(workload.tokens, mesh_size)
    mesh = mesh_lib.make_seq_mesh(mesh_size)
  kinds = []
  for layers in (1, 2):
    model = _model(workload, strategy, layers, True)
    graphdef, params, rest = apply.split_model(model)
    if tensor:
      fn = jax.jit(tp_apply.tensor_apply(graphdef, mesh, model.tensor_layout(),
                                                inputs=2))
    else:
      fn = jax.jit(apply.sequence_apply(graphdef, mesh, in_seq_dims=(1, 0), train=False,
                                        out_seq_dim=_out_seq_dim(workload)))
    kinds.append(_by_kind(traffic_lib.compiled_traffic(fn, params, rest, *_inputs(workload))))
  one, two = kinds
  per_layer, final = [], []
  for kind in sorted(set(one) | set(two)):
    c1, b1 = one.get(kind, (0, 0))
    c2, b2 = two.get(kind, (0, 0))
    layer = (c2 - c1, b2 - b1)
    rest_ = (c1 - layer[0], b1 - layer[1])
    if min(*layer, *rest_) < 0:
      raise ValueError(f"{workload.name}: the {kind} traffic of 1 and 2 layers is not "
                       "one per-layer part plus a fixed part; cannot scale it to all layers")
    if layer[0]:
      per_layer.append(Transfer(kind, *layer))
    if rest_[0]:
      final.append(Transfer(kind, *rest_))
  return LayerTraffic(tuple(per_layer), tuple(final))


def _time(fn, args, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


SLICE_LAYERS = 4


def measure(workload: Workload, exchange, mesh_size: int, repeats: int = 5):
  """(layer seconds, embed + head seconds) of one device's share, timed on this host.

  The forward runs on a mesh of ``mesh_size`` fake CPU devices sharing this
  host's cores (collectives are memory copies), so the time divided by
  ``mesh_size`` is one device's compute when the devices' work serialises on
  the cores (run under ``taskset -c 0`` to model one core per device).  Timed
  for 1- and n-layer slices, n = min(SLICE_LAYERS, layers), at least 2 (median of
  ``repeats`` after a warm-up): per layer = (tn - t1) / (n - 1), the rest =
  t1 - per layer (a 1- and 2-layer difference put SmolLM2's one-device prefill
  27% above the testbed's; more layers average the per-program noise down).
  Without enough devices the
  per-device program is vmapped over the shares on one device instead.
  """
  import jax
  import jax.numpy as jnp
  from astra_jax.parallel import apply, forward, mesh as mesh_lib
  tl = mesh_lib.check_divisible(workload.tokens, mesh_size)
  x_sds, _ = _inputs(workload)
  key = jax.random.PRNGKey(0)
  if workload.family == "vit":
    x = jax.random.normal(key, x_sds.shape, x_sds.dtype)
  else:
    x = jax.random.randint(key, x_sds.shape, 0, workload.config().vocab_size)
  positions = jnp.arange(workload.tokens)
  on_mesh = mesh_size == 1 or len(jax.devices()) >= mesh_size
  tensor = is_tensor(exchange)
  if tensor and not on_mesh:
    raise ValueError(f"timing tensor parallelism needs {mesh_size} devices; set "
                     f"JAX_NUM_CPU_DEVICES={mesh_size} (the bench does) ")
  seconds = []
  top = max(2, min(SLICE_LAYERS, workload.layers))  # slices are built, not cut
  for layers in (1, top):
    model = _model(workload, exchange, layers, False)
    if on_mesh:
      fwd = forward.inference_forward(
          model, mesh_size, out_seq_dim=None if workload.family == "vit" else 1, tensor=tensor)
      inputs = fwd.place((x, positions), (1, 0))
      seconds.append(_time(fwd.fn, (fwd.params, fwd.rest, *inputs), repeats) / mesh_size)
      continue
    graphdef, params, rest = apply.split_model(model)
    body = apply.sequence_apply(graphdef, None, in_seq_dims=(1, 0), train=False)
    shares = jnp.stack(jnp.split(x, mesh_size, axis=1))  # [P, B, Tl, ...]
    pos = positions.reshape(mesh_size, tl)

    def vmapped(params, rest, shares, pos, body=body):
      with axes.seq_axis(axes.SEQ_AXIS):
        return jax.vmap(body, in_axes=(None, None, 0, 0),
                        axis_name=mesh_lib.SEQ_AXIS)(params, rest, shares, pos)

    seconds.append(_time(jax.jit(vmapped), (params, rest, shares, pos), repeats) / mesh_size)
  t1, t_top = seconds
  layer = (t_top - t1) / (top - 1)
  if layer <= 0:  # timing noise on a loaded machine: split the longer slice's time evenly
    return t_top / top, 0.0
  return layer, max(t1 - layer, 0.0)



def measure_layer(workload: Workload, exchange, mesh_size: int, repeats: int = 3,
                  dtype: str = "float32") -> float:
  """Seconds of ONE layer for one device's share, timed on this host.

  Only the first block of the workload's model runs (random weights and
  hidden states, batch 1), so a layer of a model too big for this host's
  memory can still be timed: the latency model scales it by the layer count.
  On ``mesh_size`` fake CPU devices (sharing the cores) the time is divided
  by ``mesh_size``, as in ``measure``.
  """
  import jax
  from flax import nnx
  from astra_jax.parallel import apply, mesh as mesh_lib
  mesh_lib.check_divisible(workload.tokens, mesh_size)
  cfg = workload.config(exchange)
  if workload.family == "llama":
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, layers=1)
  elif dtype != "float32":
    raise ValueError(f"--dtype {dtype} is only wired for the llama family")
  if workload.family == "llama":  # the block alone: no 128k-entry embedding or head
    from astra_jax.models import llama
    block = llama.Block(cfg, rngs=nnx.Rngs(0))
  else:
    block = getattr(_model(workload, exchange, 1, False), _BLOCKS[workload.family])[0]
  graphdef, params, rest = apply.split_model(block)
  mesh = mesh_lib.seq_mesh_or_none(mesh_size)
  fn = jax.jit(apply.sequence_apply(graphdef, mesh, in_seq_dims=(1,), train=False,
                                    out_seq_dim=1))
  params, rest = mesh_lib.replicate((params, rest), mesh)
  width = workload.shape.width
  x = jax.random.normal(jax.random.PRNGKey(1), (1, workload.tokens, width)).astype(dtype)
  x = mesh_lib.to_global(x, mesh, 1)
  return _time(fn, (params, rest, x), repeats) / mesh_size


def peak_memory_bytes() -> int:
  """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
