"""Traffic read from compiled HLO agrees with the analytic formula."""

import json
import os
import subprocess
import sys

import jax
import pytest

from astra_jax.core import exchange as ex
from astra_jax.netsim import traffic
from infer import traffic as traffic_cli


def _measure(exchange, mesh_size, dtype="float32", layers=1, dim=768, seq_len=64):
  return traffic_cli.attention_stack_traffic(
      exchange, mesh_size=mesh_size, layers=layers, batch=2, seq_len=seq_len,
      dim=dim, heads=12, dtype=dtype)


@pytest.mark.parametrize("mesh_size", [2, 4])
@pytest.mark.parametrize("name,opts", [("exact", {}), ("vq", {"groups": 32}),
                                       ("vq", {"groups": 1}), ("vq", {"groups": 3, "codebook_size": 8})])
def test_hlo_bytes_equal_formula(mesh_size, name, opts):
  report, analytic = _measure(ex.make_exchange(name, **opts), mesh_size, layers=2)
  assert report.bytes_per_device == analytic > 0
  assert set(report.by_kind()) == {"all-gather"}
  assert report.by_kind()["all-gather"]["count"] == 2  # K and V of a layer in one message


@pytest.mark.parametrize("flags", [["--exchange=exact"], ["--exchange=vq", "--groups=32"]])
def test_cli_one_all_gather_per_layer(flags):
  """The README's traffic command as a user runs it (a fresh process: the CLI
  must set up its fake devices before anything imports jax)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # conftest's 8
  proc = subprocess.run([sys.executable, "-m", "infer.traffic", "--mesh=4", "--layers=3",
                         "--seq-len=256", *flags], capture_output=True, text=True, timeout=300,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "  all-gather: 3 ops, " in proc.stdout
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["bytes_per_device"] == result["bytes_per_device_formula"] > 0


def test_vq_g32_is_76_8x_below_exact_float32():
  vq_report, _ = _measure(ex.make_exchange("vq", groups=32, codebook_size=1024), 4)
  exact_report, _ = _measure(ex.make_exchange("exact"), 4)
  ratio = exact_report.bytes_per_device / vq_report.bytes_per_device
  assert ratio == pytest.approx(76.8, rel=0.01)


def test_bfloat16_exact_wire_size():
  f32, f32_formula = _measure(ex.make_exchange("exact"), 2)
  bf16, bf16_formula = _measure(ex.make_exchange("exact"), 2, dtype="bfloat16")
  assert bf16_formula * 2 == f32_formula == f32.bytes_per_device
  if jax.default_backend() == "cpu":
    # XLA:CPU has no bf16 collectives: it converts to f32 around the all-gather,
    # so the compiled CPU program really moves 4 bytes per element.
    assert bf16.bytes_per_device == f32.bytes_per_device
  else:
    assert bf16.bytes_per_device == bf16_formula


def test_single_device_has_no_collectives():
  report, analytic = _measure(ex.make_exchange("vq"), 1)
  assert report.bytes_per_device == analytic == 0


def test_parser_handles_tuple_all_reduce_and_inline_operand_shapes():
  hlo = """HloModule m
ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %q = bf16[2,3]{1,0} parameter(1)
  %ar = (f32[4]{0}, /*index=1*/bf16[2,3]{1,0}) all-reduce(%p, %q), replica_groups={{0,1}}
  %ag = u8[8,5]{1,0} all-gather(u8[4,5]{1,0} %r), dimensions={0}
  %ags = (s32[3]{0}, s32[6]{0}) all-gather-start(%s), dimensions={0}
  %s = s32[3]{0} parameter(2)
  %r = u8[4,5]{1,0} parameter(3)
  ROOT %x = f32[4]{0} copy(%p)
}
"""
  report = traffic.hlo_traffic(hlo)
  kinds = report.by_kind()
  assert kinds["all-reduce"] == {"count": 1, "operand_bytes": 16 + 12}
  assert kinds["all-gather"] == {"count": 2, "operand_bytes": 20 + 12}
  assert [c.result_bytes for c in report.collectives] == [28, 40, 24]


def test_collectives_in_loops_are_rejected():
  mesh = jax.make_mesh((2,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))

  def body(x):
    return jax.lax.fori_loop(0, 3, lambda i, y: jax.lax.ppermute(y, "seq", [(0, 1), (1, 0)]), x)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=jax.P("seq"), out_specs=jax.P("seq")))
  with pytest.raises(ValueError, match="loop body.*Unroll"):
    traffic.compiled_traffic(f, jax.numpy.ones(4))


def test_cli_prints_json_last_and_explains_bad_input(tmp_path):
  out = tmp_path / "t.json"
  run = lambda *a: subprocess.run([sys.executable, "-m", "infer.traffic", *a],
                                  capture_output=True, text=True, timeout=300)
  ok = run("--mesh", "4", "--seq-len", "64", "--exchange", "vq", "--out", str(out))
  assert ok.returncode == 0, ok.stderr
  result = json.loads(ok.stdout.strip().splitlines()[-1])
  assert result["bytes_per_device"] == result["bytes_per_device_formula"]
  assert result["reduction_vs_exact"] == pytest.approx(76.8, rel=0.01)
  assert json.loads(out.read_text()) == result
  bad = run("--mesh", "3", "--seq-len", "64")
  assert bad.returncode == 2 and "not divisible by the mesh size 3" in bad.stderr
  assert "Traceback" not in bad.stderr
  bad = run("--exchange", "vq", "--codebook-size", "1000", "--seq-len", "64")
  assert bad.returncode == 2 and "power of two" in bad.stderr
