"""Hugging Face Llama import: parity with transformers' LlamaForCausalLM, bf16 and
int8 loading, and clear import errors.

The reference is a tiny random LlamaForCausalLM with grouped-query attention
(4 query / 2 K/V heads), Llama 3 RoPE scaling whose three frequency bands all
occur within its 64-token context, and an untied head, saved sharded with an
index (tests/hf_reference.py, run by ``.venv-hf/bin/python`` through
tests/hf_helpers.py; without it the parity tests skip, saying why).  The
error tests write checkpoints with safetensors.numpy and need no torch.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors", reason="these tests write checkpoints with safetensors: "
                    ".venv/bin/python -m pip install safetensors")
from safetensors.numpy import save_file  # noqa: E402

import hf_helpers  # noqa: E402
from astra_jax.parallel import apply, mesh as mesh_lib
from astra_jax.core import exchange as ex
from astra_jax.run import generate
from astra_jax.io import hf  # noqa: E402
from astra_jax.models import llama  # noqa: E402


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """Folder with single/, sharded/, bf16/ and reference.npz written by transformers."""
  return hf_helpers.reference(tmp_path_factory.mktemp("hf_llama"), "llama")


@pytest.fixture(scope="module")
def loaded(ref):
  return hf.load_llama(ref[0] / "sharded")


def _logits(model, tokens, mesh_size):
  graphdef, params, rest = apply.split_model(model)
  fn = apply.sequence_apply(graphdef, mesh_lib.seq_mesh_or_none(mesh_size), in_seq_dims=(1, 0),
                            train=False, out_seq_dim=1)
  return np.asarray(jax.jit(fn)(params, rest, tokens, jnp.arange(tokens.shape[1]))[0])


def _rel_rms(got, want):
  """RMS error relative to the spread (RMS about the mean) of the reference logits."""
  return float(np.sqrt(np.mean((got - want) ** 2) / np.mean((want - want.mean()) ** 2)))


def test_config_from_transformers(loaded):
  cfg, _ = loaded
  assert cfg.variant == "custom"
  assert tuple(cfg.sizes) == (64, 2, 4, 2, 96, 16)  # width, layers, heads, kv_heads, mlp, hd
  assert (cfg.vocab_size, cfg.context, cfg.rms_eps, cfg.tie_embeddings) == (256, 64, 1e-5, False)
  assert cfg.rope_theta == 10000.0
  assert cfg.rope_scaling == llama.RopeScaling(4.0, 1.0, 4.0, 32)
  assert cfg.kv_dim == 32


def test_sharded_checkpoint_with_index(ref, loaded):
  folder = ref[0] / "sharded"
  assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
  assert (folder / "model.safetensors.index.json").exists()
  assert not (folder / "model.safetensors").exists()
  cfg, single = hf.load_llama(ref[0] / "single")
  assert cfg == loaded[0]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(single, nnx.Param),
               nnx.state(loaded[1], nnx.Param))


@pytest.mark.parametrize("mesh_size", [1, 4])
def test_logits_match_transformers(ref, loaded, mesh_size):
  _, want = ref
  got = _logits(loaded[1], jnp.asarray(want["tokens"]), mesh_size)
  np.testing.assert_allclose(got, want["logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("mesh_size", [1, 4])
def test_greedy_generation_matches_transformers(ref, loaded, mesh_size):
  _, want = ref
  assert want["min_gap"] > 1e-3  # the reference's argmax is not a near tie
  got = list(generate.generate(loaded[1], want["prompt"].tolist(), 20, mesh_size=mesh_size,
                               context=64))
  assert got == want["generated"].tolist()


def test_bf16_checkpoint(ref, loaded):
  """bfloat16 tensors are read as stored: as float32 they are exactly the float
  weights rounded to bf16; a bf16 model stays close to transformers' float logits."""
  _, want = ref
  _, as_f32 = hf.load_llama(ref[0] / "bf16")
  rounded = jax.tree.map(lambda w: w.astype(ml_dtypes.bfloat16).astype(np.float32),
                         nnx.state(loaded[1], nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(as_f32, nnx.Param), rounded)
  cfg, half = hf.load_llama(ref[0] / "bf16", dtype="bfloat16")
  assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
  assert half.layers[0].k_proj.kernel.get_value().dtype == jnp.bfloat16
  got = _logits(half, jnp.asarray(want["tokens"]), 4)
  assert _rel_rms(got, want["logits"]) < 0.05  # measured 2.4% (initializer_range 0.2)


def test_int8_weight_only(ref):
  _, want = ref
  cfg, model = hf.load_llama(ref[0] / "sharded", quantize_int8=True)
  assert cfg.quantize_int8
  assert model.layers[1].down_proj.kernel.get_value().dtype == jnp.int8
  assert model.lm_head.kernel.get_value().dtype == jnp.int8  # untied head: a Linear too
  got = _logits(model, jnp.asarray(want["tokens"]), 4)
  assert _rel_rms(got, want["logits"]) < 0.08  # measured 4.0% (initializer_range 0.2)


def test_vq_exchange_on_imported_model(ref):
  """ASTRA on the imported model: codebooks over kv_heads * head_dim = 32 values."""
  vq = ex.make_exchange("vq", groups=8, codebook_size=16)
  cfg, model = hf.load_llama(ref[0] / "sharded", exchange=vq)
  assert cfg.exchange == vq
  got = _logits(model, jnp.asarray(ref[1]["tokens"]), 4)
  assert got.shape == (2, 64, 256) and np.isfinite(got).all()


# --- no torch needed below: checkpoints written with safetensors.numpy ---------------

def _hf_config(**over):
  cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 40,
         "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
         "num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 16,
         "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
         "rope_theta": 500000.0,  # the pre-transformers-5 layout: rope_theta + rope_scaling
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
  return {**cfg, **over}


def _hf_tensors(c, prefix="model.", seed=0):
  rng = np.random.default_rng(seed)
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  hd = d // c["num_attention_heads"]
  kv = (c["num_key_value_heads"] or c["num_attention_heads"]) * hd
  shapes = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    for name, shape in [("self_attn.q_proj.weight", (d, d)), ("self_attn.k_proj.weight", (kv, d)),
                        ("self_attn.v_proj.weight", (kv, d)), ("self_attn.o_proj.weight", (d, d)),
                        ("mlp.gate_proj.weight", (f, d)), ("mlp.up_proj.weight", (f, d)),
                        ("mlp.down_proj.weight", (d, f)), ("input_layernorm.weight", (d,)),
                        ("post_attention_layernorm.weight", (d,))]:
      shapes[f"layers.{i}.{name}"] = shape
  return {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _write(folder, cfg, tensors):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg))
  save_file(tensors, str(folder / "model.safetensors"))
  return folder


def test_tied_head_old_rope_layout_and_no_prefix(tmp_path):
  c = _hf_config()
  tensors = _hf_tensors(c, prefix="")  # keys like "layers.0..." (LlamaModel)
  cfg, model = hf.load_llama(_write(tmp_path / "m", c, tensors))
  assert cfg.tie_embeddings and model.lm_head is None
  assert (cfg.rope_theta, cfg.rope_scaling) == (500000.0, llama.RopeScaling())
  assert tuple(cfg.sizes) == (24, 2, 6, 3, 40, 4) and cfg.rms_eps == 1e-6
  np.testing.assert_array_equal(model.layers[1].k_proj.kernel.get_value(),
                                tensors["layers.1.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(model.layers[0].post_attention_layernorm.scale.get_value(),
                                tensors["layers.0.post_attention_layernorm.weight"])
  logits = model(jnp.zeros((1, 16), jnp.int32), jnp.arange(16))
  assert logits.shape == (1, 16, 40) and bool(jnp.isfinite(logits).all())
  plain = _hf_config(rope_scaling=None, num_key_value_heads=None)  # plain RoPE, no GQA
  cfg, _ = hf.load_llama(_write(tmp_path / "plain", plain, _hf_tensors(plain)))
  assert cfg.rope_scaling is None and cfg.sizes.kv_heads == 6


def test_named_variant_recognised(tmp_path):
  c = _hf_config(hidden_size=32, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2)
  cfg, _ = hf.load_llama(_write(tmp_path / "m", c, _hf_tensors(c)))
  assert cfg.variant == "nano" and cfg.width is None


def test_other_architecture_rejected(tmp_path):
  gpt2_cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 24}
  with pytest.raises(hf.HFImportError, match="'gpt2' model.*not Llama.*load_gpt2"):
    hf.load_llama(_write(tmp_path / "gpt2", gpt2_cfg, {"wte.weight": np.zeros((2, 2))}))
  with pytest.raises(hf.HFImportError, match="'llama' model.*not GPT-2.*load_llama"):
    hf.load_gpt2(_write(tmp_path / "llama", _hf_config(), _hf_tensors(_hf_config())))


@pytest.mark.parametrize("over,pattern", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 4}, "multiple of kv_heads"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_configs_rejected(tmp_path, over, pattern):
  c = _hf_config(**over)
  with pytest.raises(hf.HFImportError, match=pattern):
    hf.load_llama(_write(tmp_path / "m", c, _hf_tensors(_hf_config())))


def test_missing_extra_misshaped_and_head_tensors(tmp_path):
  c = _hf_config()
  tensors = _hf_tensors(c)
  removed = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(hf.HFImportError, match=r"lacks 1 Llama .*layers\.1\.mlp\.up_proj"):
    hf.load_llama(_write(tmp_path / "removed", c, removed))
  extra = {**tensors, "model.layers.2.input_layernorm.weight": np.ones(24, np.float32)}
  with pytest.raises(hf.HFImportError, match=r"no place .*layers\.2\.input_layernorm.*"
                                             "num_hidden_layers"):
    hf.load_llama(_write(tmp_path / "extra", c, extra))
  reshaped = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.ones((24, 24), np.float32)}
  with pytest.raises(hf.HFImportError, match=r"k_proj\.weight .*shape \[24, 24\].*\[12, 24\]"):
    hf.load_llama(_write(tmp_path / "reshaped", c, reshaped))
  untied = _hf_config(tie_word_embeddings=False)
  with pytest.raises(hf.HFImportError, match=r"lacks 1 .*lm_head\.weight"):
    hf.load_llama(_write(tmp_path / "untied", untied, tensors))
  other_head = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}
  with pytest.raises(hf.HFImportError, match="tie_word_embeddings but lm_head.weight differs"):
    hf.load_llama(_write(tmp_path / "head", c, other_head))
  same_head = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].copy()}
  hf.load_llama(_write(tmp_path / "same", c, same_head))


def test_truncated_safetensors_file(tmp_path):
  c = _hf_config()
  folder = _write(tmp_path / "m", c, _hf_tensors(c))
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:-100])
  with pytest.raises(hf.HFImportError, match="not a readable safetensors file.*truncated"):
    hf.load_llama(folder)


def test_loaded_weights_do_not_alias_the_file(tmp_path):
  """Tensors are read from disk when used; the model holds copies, so rewriting the file in
  place (same inode) after loading leaves the model as it was."""
  c = _hf_config()
  tensors = _hf_tensors(c)
  folder = _write(tmp_path / "m", c, tensors)
  _, model = hf.load_llama(folder)
  path = folder / "model.safetensors"
  data = path.read_bytes()
  with open(path, "r+b") as f:  # same header, every float of the body zeroed
    f.seek(8 + int.from_bytes(data[:8], "little"))
    f.write(bytes(len(data) - f.tell()))
  np.testing.assert_array_equal(model.layers[0].input_layernorm.scale.get_value(),
                                tensors["model.layers.0.input_layernorm.weight"])
  np.testing.assert_array_equal(model.embed_tokens.embedding.get_value(),
                                tensors["model.embed_tokens.weight"])
