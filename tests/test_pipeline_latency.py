"""The forward-streaming schedule model (astra_jax.netsim.pipeline) against hand
timelines and its two regimes."""

import pytest

from astra_jax.netsim import pipeline


def test_one_device_is_pure_compute():
  s = pipeline.streaming_prefill(layers=5, layer_compute_s=0.1, message_s=9.0, mesh_size=1,
                                 embed_s=0.01, head_s=0.02)
  assert s.total_s == pytest.approx(0.53) and s.messages == 0 and s.waited == (0.0,)


def test_two_devices_by_hand():
  """c = 1, kv at 0.25, m = 0.5: device 1's first layer waits for device 0's
  message (ready 0.25 -> arrives 0.75), then the link is always early."""
  s = pipeline.streaming_prefill(layers=3, layer_compute_s=1.0, message_s=0.5, mesh_size=2,
                                 kv_fraction=0.25)
  # device 0: no waits, 3.0. device 1: layer 1 goes at 0.75 (waited 0.5), ends 1.5;
  # layer 2 ready 1.75, msg of layer 2 ready at 1.25 -> arrives 1.75: no wait; ...
  assert s.end == pytest.approx((3.0, 3.5)) and s.waited == pytest.approx((0.0, 0.5))
  assert s.messages == 3


def test_device_0_never_waits_and_messages_only_go_forward():
  s = pipeline.streaming_prefill(layers=10, layer_compute_s=0.01, message_s=1.0, mesh_size=4)
  assert s.waited[0] == 0.0 and s.end[0] == pytest.approx(0.1)
  assert s.messages == 10 * (3 + 2 + 1)  # to every later device, none backwards


def test_compute_bound_hides_the_link():
  """(P - 1) m < c: about L c plus one layer of link, far below the barrier."""
  kw = dict(layers=30, layer_compute_s=0.08, message_s=0.03, mesh_size=2)
  s = pipeline.streaming_prefill(**kw)
  assert s.total_s == pytest.approx(30 * 0.08 + 0.03, rel=1e-9)
  assert pipeline.all_gather_prefill(**kw) == pytest.approx(30 * 0.11)


def test_link_bound_is_paced_by_the_last_downlink():
  kw = dict(layers=40, layer_compute_s=0.01, message_s=0.1, mesh_size=4)
  s = pipeline.streaming_prefill(**kw)
  # device 0's uplink and device 3's downlink each carry 3 messages a layer:
  # L (P - 1) m, plus the pipeline's fill (at most (P - 1) m + c)
  assert 40 * 3 * 0.1 <= s.total_s <= 40 * 3 * 0.1 + 3 * 0.1 + 0.01
  assert s.total_s < pipeline.all_gather_prefill(**kw)


def test_the_message_latency_does_not_hold_the_link():
  """Three messages a layer into the last device: only their bytes queue on
  its downlink; the latency is paid once per hop of the chain 0 -> 1 -> 2 -> 3
  (each device lags the one before it), not once per message."""
  kw = dict(layers=10, layer_compute_s=0.001, mesh_size=4, kv_fraction=0.0)
  base = pipeline.streaming_prefill(message_s=0.01, **kw)
  late = pipeline.streaming_prefill(message_s=0.01, latency_s=0.05, **kw)
  held = pipeline.streaming_prefill(message_s=0.06, **kw)  # latency holding the link
  assert base.total_s < late.total_s <= base.total_s + 3 * 0.05 + 1e-9
  assert held.total_s > 4 * late.total_s


def test_bad_arguments():
  with pytest.raises(ValueError, match="kv_fraction"):
    pipeline.streaming_prefill(layers=1, layer_compute_s=1, message_s=1, mesh_size=2,
                               kv_fraction=2)
  with pytest.raises(ValueError, match="layers >= 1"):
    pipeline.streaming_prefill(layers=0, layer_compute_s=1, message_s=1, mesh_size=2)


def test_a_shared_medium_carries_one_message_at_a_time():
  """4 devices, link-bound: on switched links device 0's uplink and device 3's
  downlink each carry 3 messages a layer; on one shared medium all 6 queue."""
  kw = dict(layers=20, layer_compute_s=0.001, message_s=0.1, mesh_size=4)
  switched = pipeline.streaming_prefill(**kw)
  shared = pipeline.streaming_prefill(**kw, shared=True)
  assert 20 * 6 * 0.1 <= shared.total_s <= 20 * 6 * 0.1 + 0.2
  assert shared.total_s > 1.9 * switched.total_s


def test_streaming_latency_reads_the_layers_shifts():
  """The bench's entry: the message is one shift's block at the link's rate
  (with the permute's measured efficiency), arriving the per-message latency
  after it left the link."""
  from astra_jax.netsim import latency
  block = 40_960  # SmolLM2 at G=32: 512 tokens x 2 (K, V) x 32 codes x 10 bits / 8
  net = latency.Network(latency.Trace.constant(10.0), message_latency_s=0.002,
                        link_efficiency=(("collective-permute", 0.8),))
  shifts = [latency.Transfer("collective-permute", 3, 3 * block)]  # P = 4: shifts 1, 2, 3
  lat = pipeline.streaming_latency(layers=30, layer_compute_s=0.02, layer_transfers=shifts,
                                   mesh_size=4, network=net, embed_s=0.1, head_s=0.2)
  m = block * 8 / (10e6 * 0.8)
  s = pipeline.streaming_prefill(layers=30, layer_compute_s=0.02, message_s=m, mesh_size=4,
                                 embed_s=0.1, head_s=0.2, latency_s=0.002)
  assert lat.total_s == pytest.approx(s.total_s, rel=1e-12)
  assert lat.compute_s == pytest.approx(0.1 + 30 * 0.02 + 0.2)
  assert lat.comm_s == pytest.approx(s.waited[-1]) and lat.comm_s > 0
  with pytest.raises(ValueError, match="one-way shifts"):
    pipeline.streaming_latency(layers=1, layer_compute_s=1, mesh_size=2, network=net,
                               layer_transfers=[latency.Transfer("all-gather", 1, 10)])
