"""The latency model: FLOP counts, topologies, bandwidth traces, and HLO bytes vs formula."""

import json

import jax
import jax.numpy as jnp
import pytest

from astra_jax.parallel import apply
from astra_jax.netsim import devices, flops, latency, traffic, workloads
from astra_jax.core import exchange as ex

SMALL = flops.LayerShape(tokens=8, width=4, heads=2, mlp=8)


def test_layer_cost_hand_computed():
  # P=2: n=4 queries, Tk=8 keys. 8nD^2 + 4nDM + 4nTkD + 5nHTk = 512+512+512+320
  cost = flops.layer_cost(SMALL, 2)
  assert cost.flops == 1856
  # weights 4D^2+2DM+9D+M = 172; activations n(8D+2M) + 2TkD + 2nHTk = 192+64+128
  assert cost.bytes == 4 * 172 + 2 * 4 * 384
  # a private (class) token adds one query and one key
  assert flops.layer_cost(flops.LayerShape(8, 4, 2, 8, private=1), 2).flops == (
      8 * 5 * 16 + 4 * 5 * 32 + 4 * 5 * 9 * 4 + 5 * 5 * 2 * 9)


def test_vq_encode_cost_and_exact_adds_nothing():
  vq = ex.make_exchange("vq", groups=2, codebook_size=4)
  base = flops.layer_cost(SMALL, 2)
  # per tensor: 2 ns K D + 2 ns G K + 2 K D = 128 + 64 + 32; bytes 4 (2 K D + 2 ns G K)
  assert flops.layer_cost(SMALL, 2, vq) == base + flops.Cost(2 * 224, 2 * 4 * 96)
  assert flops.layer_cost(SMALL, 2, ex.make_exchange("exact")) == base
  assert flops.layer_cost(SMALL, 1, vq) == flops.layer_cost(SMALL, 1)  # no encode alone
  with pytest.raises(ValueError, match="register_exchange_cost"):
    flops.exchange_cost(type("X", (), {"name": "zigzag"})(), SMALL, 2)
  with pytest.raises(ValueError, match="divides 8"):
    flops.layer_cost(SMALL, 3)
  # ring: the online softmax's rescaling at each of the P - 1 received blocks
  n, d, h = 4, SMALL.width, SMALL.heads
  assert flops.exchange_cost(ex.make_exchange("ring"), SMALL, 2) == flops.Cost(
      2 * n * d + 5 * n * h, 8 * (n * d + 2 * n * h))


def test_tensor_parallel_layer_cost_splits_heads_and_mlp():
  from astra_jax.core import sync as tp
  one = flops.layer_cost(SMALL, 1)
  two = flops.tensor_layer_cost(SMALL, 2, tp.make_sync("tp"))
  # every matrix product and attention term halves; nothing else changes in FLOPs
  assert two.flops == pytest.approx(one.flops / 2)
  assert flops.tensor_layer_cost(SMALL, 1) == one
  flash = flops.tensor_layer_cost(SMALL, 2, tp.make_sync("flash"))
  assert flash.flops > two.flops and flash.bytes > two.bytes
  with pytest.raises(ValueError, match="do not split over 3"):
    flops.tensor_layer_cost(SMALL, 3)


def test_roofline_takes_the_slower_of_compute_and_memory():
  assert latency.roofline_seconds(flops.Cost(2e9, 1e6), 1e12, 1e9) == pytest.approx(2e-3)
  assert latency.roofline_seconds(flops.Cost(1e6, 2e9), 1e12, 1e9) == pytest.approx(2.0)
  assert latency.roofline_seconds(flops.Cost(2e9, 0), 1e12, 1e9, 0.5) == pytest.approx(4e-3)
  with pytest.raises(ValueError, match="efficiency"):
    latency.roofline_seconds(flops.Cost(1, 1), 1e12, 1e9, 0)


def test_topologies():
  assert latency.wire_bytes("all-gather", 1000, 4, "switched") == 3000  # (P-1) s
  assert latency.wire_bytes("all-gather", 1000, 4, "shared") == 4000  # P s
  assert latency.wire_bytes("all-reduce", 1000, 4, "switched") == 1500  # 2 (P-1)/P s
  assert latency.wire_bytes("all-gather-start", 1000, 2, "switched") == 1000
  assert latency.wire_bytes("all-gather", 1000, 1, "shared") == 0
  with pytest.raises(ValueError, match="unknown topology"):
    latency.wire_bytes("all-gather", 1, 2, "mesh")
  with pytest.raises(ValueError, match="no wire model"):
    latency.wire_bytes("send", 1, 2, "switched")
  # ViT-B, G=32: 2 all-gathers of 10,240 bytes per layer, 4 devices, 10 Mbit/s, 1 ms each
  net = latency.Network(latency.Trace.constant(10), "switched", 1e-3)
  t = net.seconds(latency.Transfer("all-gather", 2, 20480), 4)
  assert t == pytest.approx(3 * 20480 * 8 / 10e6 + 2e-3)
  shared = latency.Network(latency.Trace.constant(10), "shared", 1e-3)
  assert shared.seconds(latency.Transfer("all-gather", 2, 20480), 4) == pytest.approx(
      4 * 20480 * 8 / 10e6 + 2e-3)


def test_link_efficiency_slows_only_its_kind():
  # all-gathers reach half the link, all-reduces all of it; alpha is not scaled
  net = latency.Network(latency.Trace.constant(8), "switched", 1e-3,
                        (("all-gather", 0.5),))  # 1 MB/s
  assert net.seconds(latency.Transfer("all-gather", 2, 1000), 4) == pytest.approx(
      2 * 3000 / 1e6 + 2e-3)
  assert net.seconds(latency.Transfer("all-gather-start", 1, 1000), 2) == pytest.approx(
      2 * 1000 / 1e6 + 1e-3)
  assert net.seconds(latency.Transfer("all-reduce", 1, 1000), 2) == pytest.approx(
      1000 / 1e6 + 1e-3)
  # a bandwidth trace integrates the inflated bytes: 1 MB/s for 1 s, then 2 MB/s
  traced = latency.Network(latency.Trace(((0, 8), (1, 16))), "switched", 0.0,
                           {"collective-permute": 0.25})
  assert traced.seconds(latency.Transfer("collective-permute", 1, 0.75e6), 2) == \
      pytest.approx(1 + 2e6 / 2e6)
  for bad, msg in [((("all-gather", 0.0),), "in \\(0, 1\\]"),
                   ((("all-gather", 1.5),), "in \\(0, 1\\]"),
                   ((("send", 0.5),), "unknown collective")]:
    with pytest.raises(ValueError, match=msg):
      latency.Network(latency.Trace.constant(8), "switched", 0.0, bad)


def test_trace_integration():
  trace = latency.Trace(((0, 8), (1, 16)))  # 1 MB/s for a second, then 2 MB/s
  assert trace.transfer_seconds(0, 3e6) == pytest.approx(2.0)  # 1 MB + 2 MB
  assert trace.transfer_seconds(0.5, 3e6) == pytest.approx(0.5 + 1.25)
  assert trace.transfer_seconds(2, 3e6) == pytest.approx(1.5)
  assert trace.transfer_seconds(0, 0) == 0
  outage = latency.Trace.parse("0:10,1:0,2:10")  # 1.25 MB/s, nothing for a second
  assert outage.transfer_seconds(0, 2e6) == pytest.approx(1 + 1 + 0.75e6 / 1.25e6)
  assert latency.Trace.constant(10).transfer_seconds(7, 1.25e6) == pytest.approx(1.0)
  for bad, msg in [("0-10", "SECONDS:MBITS"), ("1:10", "start at time 0"),
                   ("0:10,0:5", "increase"), ("0:10,1:0", "last segment"),
                   ("0:-1,1:5", ">= 0")]:
    with pytest.raises(ValueError, match=msg):
      latency.Trace.parse(bad)
  with pytest.raises(ValueError, match="positive"):
    latency.Trace.constant(0)


def test_prefill_latency_walks_the_timeline():
  layer = [latency.Transfer("all-gather", 2, 1000)]
  final = [latency.Transfer("all-reduce", 1, 400)]
  net = latency.Network(latency.Trace.constant(8), "switched", 1e-3)  # 1 MB/s
  kw = dict(layers=3, layer_compute_s=0.01, layer_transfers=layer, mesh_size=4,
            embed_s=0.002, head_s=0.003, final_transfers=final)
  lat = latency.prefill_latency(network=net, **kw)
  assert lat.compute_s == pytest.approx(0.002 + 3 * 0.01 + 0.003)
  assert lat.comm_s == pytest.approx(3 * (3000 / 1e6 + 2e-3) + (600 / 1e6 + 1e-3))
  assert lat.total_s == pytest.approx(lat.compute_s + lat.comm_s)
  one = latency.prefill_latency(network=net, **{**kw, "mesh_size": 1})
  assert one.comm_s == 0
  # the rate drops to a tenth at 20 ms: layers 2 and 3 send at 0.1 MB/s
  drop = latency.Network(latency.Trace(((0, 8), (0.02, 0.8))), "switched", 1e-3)
  slow = latency.prefill_latency(network=drop, **kw)
  assert slow.compute_s == lat.compute_s
  assert slow.comm_s == pytest.approx(
      (3e-3 + 2e-3) + 2 * (3e-2 + 2e-3) + (6e-3 + 1e-3))


@pytest.mark.parametrize("model,name,opts,mesh_size", [
    ("vit-mu7", "vq", {"groups": 32}, 4), ("gpt2-micro", "exact", {}, 2)])
def test_hlo_bytes_of_a_model_layer_equal_the_formula(model, name, opts, mesh_size):
  w = workloads.get(model)
  exchange = ex.make_exchange(name, **opts)
  got = workloads.traffic(w, exchange, mesh_size)
  formula = traffic.sequence_parallel_bytes(
      exchange, layers=1, batch=1, tokens_per_device=w.tokens // mesh_size,
      kv_dim=w.shape.width, dtype=jnp.float32, mesh_size=mesh_size)
  assert got.layer_bytes == formula > 0
  assert {t.kind for t in got.per_layer} == {"all-gather"}
  # ViT: the logits (10 classes, float32) are averaged over the mesh once
  assert got.final_bytes == (40 if model.startswith("vit") else 0)
  assert got.total_bytes(w.layers) == w.layers * formula + got.final_bytes


@pytest.mark.parametrize("model,tolerance", [("gpt2-micro", 0.02), ("vit-mu7", 0.05)])
def test_flop_formula_matches_xla_cost_analysis(model, tolerance):
  w = workloads.get(model)
  counts = []
  for layers in (1, 2):
    graphdef, params, rest = apply.split_model(
        workloads._model(w, ex.make_exchange("exact"), layers, abstract=True))
    fn = jax.jit(apply.sequence_apply(graphdef, None, in_seq_dims=(1, 0), train=False))
    counts.append(fn.lower(params, rest, *workloads._inputs(w)).compile()
                  .cost_analysis()["flops"])
  xla = counts[1] - counts[0]
  assert flops.layer_cost(w.shape, 1).flops == pytest.approx(xla, rel=tolerance)


def test_device_profiles(tmp_path):
  for name, p in devices.PROFILES.items():
    assert p.name == name and p.peak_flops > 0 and p.mem_bandwidth > 0
    assert p.precision == "fp32" and len(p.source) > 40
  assert devices.get("gtx1660ti").peak_flops == pytest.approx(5.437e12, rel=1e-3)
  path = tmp_path / "host.json"
  with pytest.raises(ValueError, match="python -m infer.lab.profile_host"):
    devices.get("host", str(path))
  path.write_text("{}")
  with pytest.raises(ValueError, match="not a host profile"):
    devices.get("host", str(path))
  path.write_text(json.dumps({"description": "d", "peak_flops": 1e11,
                              "mem_bandwidth": 2e10, "source": "measured"}))
  assert devices.get("host", str(path)).peak_flops == 1e11
  with pytest.raises(ValueError, match="unknown device profile"):
    devices.get("tpu")


def test_token_bucket_refills_while_the_link_idles():
  # 1 MB/s, a 5000-byte bucket, 8000 bytes per layer to receive (all-gather, P=2)
  net = latency.Network(latency.Trace.constant(8), "switched", 0.0, burst_bytes=5000)
  layer = [latency.Transfer("all-gather", 1, 8000)]

  def total(compute_s):
    return latency.prefill_latency(layers=3, layer_compute_s=compute_s, layer_transfers=layer,
                                   mesh_size=2, network=net).total_s

  # 10 ms of compute refills the bucket (10 kB > 5000): every layer sends 3000 bytes
  assert total(0.01) == pytest.approx(3 * (0.01 + 0.003))
  # 2 ms refills 2000 bytes: the first layer sends 3000, the next two 6000 each
  assert total(0.002) == pytest.approx(3 * 0.002 + 0.003 + 2 * 0.006)
  # no bucket: bytes / bandwidth
  plain = latency.Network(latency.Trace.constant(8), "switched", 0.0)
  assert latency.prefill_latency(layers=3, layer_compute_s=0.002, layer_transfers=layer,
                                 mesh_size=2, network=plain).total_s == \
      pytest.approx(3 * (0.002 + 0.008))
  # tokens never make a transfer negative; efficiency slows only what the bucket did not cover
  slow = latency.Network(latency.Trace.constant(8), "switched", 1e-3, (("all-gather", 0.5),),
                         burst_bytes=5000)
  assert slow.seconds(layer[0], 2, tokens=5000) == pytest.approx(2 * 3000 / 1e6 + 1e-3)
  assert slow.seconds(layer[0], 2, tokens=9000) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="burst"):
    latency.Network(latency.Trace.constant(8), burst_bytes=-1)


def test_trace_bytes_between():
  trace = latency.Trace(((0, 8), (1, 16)))  # 1 MB/s for a second, then 2 MB/s
  assert trace.bytes_between(0.5, 0.75) == pytest.approx(0.25e6)
  assert trace.bytes_between(0.5, 2.0) == pytest.approx(0.5e6 + 2e6)
  assert trace.bytes_between(3.0, 3.0) == 0.0
