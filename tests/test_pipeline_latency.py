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


def test_bad_arguments():
  with pytest.raises(ValueError, match="kv_fraction"):
    pipeline.streaming_prefill(layers=1, layer_compute_s=1, message_s=1, mesh_size=2,
                               kv_fraction=2)
  with pytest.raises(ValueError, match="layers >= 1"):
    pipeline.streaming_prefill(layers=0, layer_compute_s=1, message_s=1, mesh_size=2)
