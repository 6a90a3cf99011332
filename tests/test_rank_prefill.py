"""One rank of a sequence split over processes that share no program (the
multi-rank server, ``astra_jax.serve.group``): each rank's ``Generator`` with a
``HostAxis`` prefills only its block, the stream exchange's K/V (codes) coming
from the earlier ranks over real TCP links (``parallel.peer_links``).  Here the
ranks are threads of one process, each with its own links; their logits put
together equal the one-program sequence-parallel prefill (mesh P, all-gather
exchange), and the rank holding the prompt's last token decodes the same
tokens.  A lost rank fails the request at once (closed link) or after the
timeout (silence), never hangs, and the next request goes on.  The planner's
choice follows the latency model it is built on.
"""

import socket
import struct
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astra_jax.core import axes, exchange, streaming
from astra_jax.models import llama, vit
from astra_jax.netsim import pipeline
from astra_jax.parallel import apply, peer_links
from astra_jax.run import generate
from astra_jax.serve import plan as plan_lib

PROMPT = list(range(1, 30))
LENGTH, CONTEXT, NEW = 32, 64, 5


def _llama(spec):
  return llama.Llama(llama.LlamaConfig(variant="nano", exchange=exchange.from_spec(spec)),
                     rngs=nnx.Rngs(0))


@pytest.fixture
def group():
  """``make(P)`` -> P links on 127.0.0.1, registered as this process's host
  transport (dispatched by the calling rank's index)."""
  made = []

  def make(size, timeout_s=30.0):
    links = [peer_links.Links("127.0.0.1", timeout_s=timeout_s) for _ in range(size)]
    made.extend(links)
    streaming.set_host(lambda index, block: links[int(index)](index, block))
    return links

  yield make
  streaming.set_host(None)
  for links in made:
    links.close()


def _run_ranks(model, links, request, prompt=PROMPT):
  """Every rank's (logits block, decoded tokens), the ranks as threads."""
  size = len(links)
  out, errors = {}, {}

  def rank(r):
    try:
      g = generate.Generator(model, mesh_size=size, context=CONTEXT,
                             rank=axes.HostAxis(r, size))
      links[r].begin(request, [x.address for x in links], r)
      logits, views = g.prefill_prompt(prompt, NEW, LENGTH)
      out[r] = (np.asarray(logits), list(g.decode(logits, views, len(prompt), NEW)))
    except Exception as e:  # noqa: BLE001 - reported below
      errors[r] = e

  threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  return out, errors


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("spec,reference", [("stream:groups=4,codebook_size=16",
                                             "vq:groups=4,codebook_size=16"),
                                            ("stream:quantize=false", "exact")])
def test_ranks_together_equal_the_one_program_prefill(group, size, spec, reference):
  out, errors = _run_ranks(_llama(spec), group(size), request=1)
  assert not errors, errors
  ref = generate.Generator(_llama(reference), mesh_size=size, context=CONTEXT)
  logits, views = ref.prefill_prompt(PROMPT, NEW, LENGTH)
  np.testing.assert_allclose(np.concatenate([out[r][0] for r in range(size)], axis=1),
                             np.asarray(logits), atol=1e-5, rtol=1e-5)
  owner = (len(PROMPT) - 1) // (LENGTH // size)
  assert out[owner][1] == list(ref.decode(logits, views, len(PROMPT), NEW))
  assert all(out[r][1] == [] for r in range(size) if r != owner)


def test_a_closed_link_fails_the_request_at_once_and_the_next_one_runs(group):
  model = _llama("stream:groups=4,codebook_size=16")
  links = group(2, timeout_s=60.0)
  # a rank 0 that connects, sends half a block and dies (its socket closes, as kill -9's)
  dead = "127.0.0.1:1"
  sock = socket.create_connection(peer_links.split_address(links[1].address))
  sock.sendall(struct.pack("!I", len(dead)) + dead.encode()
               + peer_links.HEADER.pack(1, 1000) + b"x" * 10)
  sock.close()
  g = generate.Generator(model, mesh_size=2, context=CONTEXT, rank=axes.HostAxis(1, 2))
  links[1].begin(1, [dead, links[1].address], 1)
  start = time.monotonic()
  with pytest.raises(Exception, match=r"rank at 127.0.0.1:1 closed its link \(did it die\?\)"):
    jax.block_until_ready(g.prefill_prompt(PROMPT, NEW, LENGTH))
  assert time.monotonic() - start < 10  # not the 60 s timeout
  out, errors = _run_ranks(model, links, request=2)  # with a live rank 0 it goes on
  assert not errors and len(out[1][1]) == NEW


def test_a_silent_rank_fails_the_request_after_the_timeout(group):
  model = _llama("stream:quantize=false")
  links = group(2, timeout_s=1.0)
  g = generate.Generator(model, mesh_size=2, context=CONTEXT, rank=axes.HostAxis(1, 2))
  links[1].begin(1, [x.address for x in links], 1)  # rank 0 never runs
  with pytest.raises(Exception, match="sent nothing for 1 s"):
    jax.block_until_ready(g.prefill_prompt(PROMPT, NEW, LENGTH))
  out, errors = _run_ranks(model, links, request=2)  # both ranks now: it goes on
  assert not errors and out[0][1] == [] and len(out[1][1]) == NEW


def test_only_the_stream_exchange_and_causal_models_cross_processes(group):
  group(2)
  net = _llama("vq:groups=4,codebook_size=16")
  with pytest.raises(ValueError, match="across processes without one, use the stream exchange"):
    generate.Generator(net, mesh_size=2, context=CONTEXT,
                       rank=axes.HostAxis(0, 2)).prefill_prompt(PROMPT, NEW, LENGTH)
  model = vit.ViT(vit.ViTConfig(variant="mu/4", image_size=16, num_classes=10,
                                class_token="distributed",
                                exchange=exchange.from_spec("stream:quantize=false")),
                  rngs=nnx.Rngs(0))
  graphdef, params, rest = apply.split_model(model)

  def body(patches):
    with axes.seq_axis(axes.HostAxis(0, 2)):
      return nnx.merge(graphdef, params, rest)(patches, jnp.arange(patches.shape[1]))

  with pytest.raises(ValueError, match="needs every device of the sequence in one program|"
                     "bidirectional"):
    body(jnp.zeros((1, 8, model.cfg.patch ** 2 * model.cfg.channels)))
  with pytest.raises(ValueError, match="device 2 of a 2-device sequence does not exist"):
    axes.HostAxis(2, 2)


def test_the_planner_follows_the_streaming_model():
  p = plan_lib.Planner(layers=10, message_bytes={"exact": 800, "G=32": 80},
                       link=plan_lib.Link(latency_s=0.001, mbit=10.0),
                       one={1024: 5.0, 32: 0.05},
                       block={("exact", 2, 1024): 2.1, ("G=32", 2, 1024): 2.3,
                              ("exact", 2, 32): 0.04, ("G=32", 2, 32): 0.045},
                       loss={"exact": 0.0, "G=32": 12.0})
  expected = pipeline.streaming_prefill(layers=10, layer_compute_s=0.23,
                                        message_s=80 * 512 * 8 / 10e6, latency_s=0.001,
                                        mesh_size=2).total_s + 0.002
  assert p.predict("G=32", 2, 1024) == pytest.approx(expected)
  candidates = [(plan_lib.ONE, 1, 1024), ("exact", 2, 1024), ("G=32", 2, 1024)]
  assert p.choose(candidates)[0][0] == "G=32"  # exact's 0.4 MB a layer is 0.33 s at 10 Mbit
  p.max_loss = 10.0  # G=32 costs 12 % perplexity: out; exact pays its link
  best, predicted = p.choose(candidates)
  assert best[0] == "exact" and predicted["exact@2"] > predicted["G=32@2"]
  short = [(plan_lib.ONE, 1, 32), ("exact", 2, 32), ("G=32", 2, 32)]
  assert p.choose(short)[0][0] == plan_lib.ONE  # a short prompt stays on one device
  link = plan_lib.link_from_probe(0.002, 0.002 + 8.0, 10_000_000)
  assert link.latency_s == pytest.approx(0.001) and link.mbit == pytest.approx(10.0)
