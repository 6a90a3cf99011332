"""Hugging Face GPT-2 import: parity with transformers, and clear import errors.

The reference (logits, greedy generation, saved checkpoints) comes from
tests/hf_reference.py run by ``.venv-hf/bin/python`` (tests/hf_helpers.py).
Without it the parity tests skip, saying why; the error and custom-size tests
need no torch and always run.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors", reason="these tests write checkpoints with safetensors: "
                    ".venv/bin/python -m pip install safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

import hf_helpers  # noqa: E402
from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.run import generate
from astra_jax.io import hf  # noqa: E402


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """Folder with single/, sharded/ and reference.npz written by transformers."""
  return hf_helpers.reference(tmp_path_factory.mktemp("hf_gpt2"), "gpt2")


@pytest.fixture(scope="module")
def loaded(ref):
  return hf.load_gpt2(ref[0] / "single")


def test_config_maps_to_named_variant(loaded):
  cfg, _ = loaded
  assert (cfg.variant, cfg.sizes, cfg.vocab_size, cfg.context) == ("nano", (32, 2, 2), 256, 64)
  assert cfg.layer_norm_eps == 1e-5


def test_logits_match_transformers_one_device(ref, loaded):
  _, want = ref
  _, model = loaded
  tokens = jnp.asarray(want["tokens"])
  got = model(tokens, jnp.arange(tokens.shape[1]))
  np.testing.assert_allclose(np.asarray(got), want["logits"], rtol=0, atol=1e-4)


def test_logits_match_transformers_mesh4(ref, loaded):
  _, want = ref
  _, model = loaded
  graphdef, params, rest = apply.split_model(model)
  fn = apply.sequence_apply(graphdef, mesh_lib.make_seq_mesh(4), in_seq_dims=(1, 0),
                            train=False, out_seq_dim=1)
  tokens = jnp.asarray(want["tokens"])
  got, _, _ = jax.jit(fn)(params, rest, tokens, jnp.arange(tokens.shape[1]))
  np.testing.assert_allclose(np.asarray(got), want["logits"], rtol=0, atol=1e-4)


def test_greedy_generation_matches_transformers(ref, loaded):
  _, want = ref
  _, model = loaded
  assert want["min_gap"] > 1e-3  # the reference's argmax is not a near tie
  got = list(generate.generate(model, want["prompt"].tolist(), 20, mesh_size=4, context=64))
  assert got == want["generated"].tolist()


def test_sharded_checkpoint_loads_the_same(ref, loaded):
  folder = ref[0] / "sharded"
  assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
  assert not (folder / "model.safetensors").exists()
  cfg, model = hf.load_gpt2(folder)
  assert cfg == loaded[0]
  a, b = nnx.state(model, nnx.Param), nnx.state(loaded[1], nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --- no torch needed below: checkpoints written with safetensors.numpy ---------------

def _hf_config(**over):
  cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50,
         "n_positions": 16, "n_embd": 24, "n_layer": 3, "n_head": 4,
         "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
  return {**cfg, **over}


def _hf_tensors(c, prefix="", seed=0):
  rng = np.random.default_rng(seed)
  d, v, t = c["n_embd"], c["vocab_size"], c["n_positions"]
  shapes = {"wte.weight": (v, d), "wpe.weight": (t, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for i in range(c["n_layer"]):
    for name, shape in [("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("ln_2.weight", (d,)),
                        ("ln_2.bias", (d,)), ("attn.c_attn.weight", (d, 3 * d)),
                        ("attn.c_attn.bias", (3 * d,)), ("attn.c_proj.weight", (d, d)),
                        ("attn.c_proj.bias", (d,)), ("mlp.c_fc.weight", (d, 4 * d)),
                        ("mlp.c_fc.bias", (4 * d,)), ("mlp.c_proj.weight", (4 * d, d)),
                        ("mlp.c_proj.bias", (d,))]:
      shapes[f"h.{i}.{name}"] = shape
  out = {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  for i in range(c["n_layer"]):  # transformers' causal-mask buffers, which the loader skips
    out[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, t, t), np.float32))
    out[f"{prefix}h.{i}.attn.masked_bias"] = np.full((), -1e4, np.float32)
  return out


def _write(folder, cfg, tensors):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg))
  save_file(tensors, str(folder / "model.safetensors"))
  return folder


def test_custom_sizes_without_prefix(tmp_path):
  c = _hf_config()
  tensors = _hf_tensors(c)  # keys like "h.0..." (GPT2Model), not "transformer.h.0..."
  cfg, model = hf.load_gpt2(_write(tmp_path / "m", c, tensors))
  assert cfg.variant == "custom" and cfg.sizes == (24, 3, 4)
  assert (cfg.vocab_size, cfg.context) == (50, 16)
  np.testing.assert_array_equal(model.wte.embedding.get_value(), tensors["wte.weight"])
  np.testing.assert_array_equal(model.h[2].mlp_proj.kernel.get_value(),
                                tensors["h.2.mlp.c_proj.weight"])
  np.testing.assert_array_equal(model.h[1].ln_2.scale.get_value(), tensors["h.1.ln_2.weight"])
  logits = model(jnp.zeros((1, 16), jnp.int32), jnp.arange(16))
  assert logits.shape == (1, 16, 50) and bool(jnp.isfinite(logits).all())


def test_tied_lm_head_accepted_untied_rejected(tmp_path):
  c = _hf_config()
  tensors = _hf_tensors(c, prefix="transformer.")
  tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
  hf.load_gpt2(_write(tmp_path / "tied", c, tensors))
  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
  with pytest.raises(hf.HFImportError, match="lm_head.weight"):
    hf.load_gpt2(_write(tmp_path / "untied", c, tensors))


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(hf.HFImportError, match="not a folder"):
    hf.load_gpt2(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf.HFImportError, match="no config.json"):
    hf.load_gpt2(tmp_path / "empty")
  folder = tmp_path / "no_weights"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(_hf_config()))
  (folder / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf.HFImportError, match=r"neither model.safetensors.*pytorch_model.bin"):
    hf.load_gpt2(folder)


def test_other_architecture_rejected(tmp_path):
  c = _hf_config(model_type="llama", architectures=["LlamaForCausalLM"])
  with pytest.raises(hf.HFImportError, match="'llama' model.*not GPT-2"):
    hf.load_gpt2(_write(tmp_path / "m", c, _hf_tensors(_hf_config())))


def test_other_activation_rejected(tmp_path):
  c = _hf_config(activation_function="relu")
  with pytest.raises(hf.HFImportError, match="activation_function 'relu'"):
    hf.load_gpt2(_write(tmp_path / "m", c, _hf_tensors(c)))


def test_missing_extra_and_misshaped_tensors(tmp_path):
  c = _hf_config()
  tensors = _hf_tensors(c, prefix="transformer.")
  removed = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
  with pytest.raises(hf.HFImportError, match=r"lacks 1 .*h\.1\.mlp\.c_fc\.bias"):
    hf.load_gpt2(_write(tmp_path / "removed", c, removed))
  extra = {**tensors, "transformer.h.3.ln_1.weight": np.ones(24, np.float32)}
  with pytest.raises(hf.HFImportError, match=r"no place .*h\.3\.ln_1\.weight"):
    hf.load_gpt2(_write(tmp_path / "extra", c, extra))
  reshaped = {**tensors, "transformer.h.0.attn.c_proj.weight": np.ones((24, 12), np.float32)}
  with pytest.raises(hf.HFImportError, match=r"h\.0\.attn\.c_proj\.weight .*shape \[24, 12\]"):
    hf.load_gpt2(_write(tmp_path / "reshaped", c, reshaped))


def test_sharded_index_with_missing_shard(tmp_path):
  c = _hf_config()
  tensors = _hf_tensors(c)
  folder = tmp_path / "m"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(c))
  names = sorted(tensors)
  half = len(names) // 2
  shards = {"model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(folder / file))
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
  cfg, model = hf.load_gpt2(folder)
  np.testing.assert_array_equal(model.wpe.embedding.get_value(), tensors["wpe.weight"])
  os.remove(folder / "model-00002-of-00002.safetensors")
  with pytest.raises(hf.HFImportError, match="model-00002-of-00002.safetensors"):
    hf.load_gpt2(folder)


def test_hf_reference_checkpoint_errors(ref, tmp_path):
  """The transformers-written file with one tensor removed / reshaped."""
  src = ref[0] / "single"
  tensors = load_file(str(src / "model.safetensors"))
  for case, edit, pattern in [
      ("removed", lambda t: t.pop("transformer.h.0.ln_2.bias"), r"h\.0\.ln_2\.bias"),
      ("reshaped", lambda t: t.update({"transformer.wpe.weight": t["transformer.wpe.weight"][:32]}),
       r"wpe\.weight .*shape \[32, 32\].*\[64, 32\]")]:
    folder = tmp_path / case
    shutil.copytree(src, folder)
    edited = dict(tensors)
    edit(edited)
    save_file(edited, str(folder / "model.safetensors"))
    with pytest.raises(hf.HFImportError, match=pattern):
      hf.load_gpt2(folder)
