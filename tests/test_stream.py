"""The stream exchange: K/V (codes) only forward, to later devices (issue 28).

In a causal model a device reads only earlier devices' blocks, so sending
them forward alone must give the all-gather exchanges' outputs: bit for bit
for vq (same codebooks; the blocks not received are masked either way) and
for exact.  The compiled program's permutes all go from a device to a later
one.  Across processes the blocks go on host threads instead
(tests/test_multiprocess.py).
"""

import json
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


def test_the_first_rank_does_not_wait_for_a_slowed_later_rank(tmp_path):
  """2 processes on the host transport, rank 1 sleeping 0.1 s before handing
  over each layer's block: rank 0 ends its forward without waiting for it,
  every layer's block goes 0 -> 1 and none back (counted by the transport),
  and the timeline's plot is written."""
  from cli_helpers import last_json, run
  timeline = tmp_path / "timeline.json"
  out = last_json(run("infer.launch", "--procs=2", "--", "infer.lab.prefill_time",
                      "--model=gpt2:nano", "--tokens=64", "--mesh=2", "--repeats=1",
                      "--exchange=stream:groups=4,codebook_size=16", f"--timeline={timeline}",
                      "--slow-rank=1:0.1", timeout=300))
  first, second = out["timeline"]["ranks"]
  layers = out["layers"]
  assert first["exchanges"] == second["exchanges"] == layers == 2
  assert (first["messages_sent"], first["messages_received"]) == (layers, 0)
  assert (second["messages_sent"], second["messages_received"]) == (0, layers)
  assert second["slept_s"] >= 0.1 * layers and first["slept_s"] == 0
  assert first["waited_s"] < 0.02, first  # rank 0 has nobody to wait for
  assert first["finished_at_s"] + 0.15 < second["finished_at_s"], out["timeline"]
  assert json.loads(timeline.read_text())["summary"] == out["timeline"]
  assert timeline.with_suffix(".png").stat().st_size > 10_000
  timeline.with_suffix(".png").unlink()
  replot = last_json(run("infer.lab.timeline_plot", str(timeline)))
  assert replot["ranks"] == out["timeline"]["ranks"] and timeline.with_suffix(".png").exists()


def test_timeline_flags_need_the_stream_host_transport(tmp_path):
  from cli_helpers import assert_clean_errors
  not_a_timeline = tmp_path / "result.json"
  not_a_timeline.write_text('{"latency_s": 1.0}')  # a prefill_time result, not its timeline
  assert_clean_errors([
      (("infer.lab.prefill_time", "--model=gpt2:nano", "--tokens=64", "--mesh=2",
        f"--timeline={tmp_path}/t.json"), "add --exchange stream"),
      (("infer.lab.prefill_time", "--model=gpt2:nano", "--tokens=64", "--mesh=2",
        "--exchange=stream", "--slow-rank=one"), "--slow-rank is RANK:SECONDS"),
      (("infer.lab.prefill_time", "--model=gpt2:nano", "--tokens=64", "--mesh=2",
        "--exchange=stream", "--slow-rank=2:0.1", "--num-processes=2"),
       "--slow-rank 2: the run has 2 process(es), ranks 0-1"),
      (("infer.lab.prefill_time", "--model=gpt2:nano", "--tokens=64", "--mesh=2",
        "--exchange=stream", f"--timeline={tmp_path}/t.json"),
       "need the stream exchange's host transport: launch one process per device"),
      (("infer.lab.timeline_plot", str(tmp_path / "none.json")), "no file"),
      (("infer.lab.timeline_plot", str(not_a_timeline)), "is not a timeline from "
       "infer.lab.prefill_time --timeline"),
  ])
