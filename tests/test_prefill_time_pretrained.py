"""infer.lab.prefill_time on a pretrained LM (``--model hf:DIR | gguf:PATH | smollm2``):
a tiny Llama written as a transformers folder and as a GGUF, timed on one
device and sequence-parallel over two, and the bad inputs a user meets."""

import pytest

pytest.importorskip("safetensors", reason="needs safetensors: .venv/bin/python -m pip install "
                    "safetensors")
from cli_helpers import assert_one_line_error, last_json, run  # noqa: E402

CONTEXT = 64  # the tiny Llamas' max_position_embeddings / context_length
FAST = ("--repeats=1", "--warmup=0")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  from test_hf_llama import _hf_config, _hf_tensors, _write
  config = _hf_config(vocab_size=40, max_position_embeddings=CONTEXT)
  return _write(tmp_path_factory.mktemp("hf") / "tiny-llama", config, _hf_tensors(config))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
  pytest.importorskip("gguf")
  from test_gguf import _hf_weights, _write_gguf
  return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", _hf_weights())


def test_hf_folder_on_one_device_and_astra_on_two(hf_folder):
  spec = f"hf:{hf_folder}"
  one = last_json(run("infer.lab.prefill_time", f"--model={spec}", "--tokens=32", "--mesh=1",
                      *FAST))
  assert one["model"] == spec and (one["width"], one["layers"]) == (24, 2)
  assert (one["tokens"], one["mesh"], one["exchange"]) == (32, 1, "exact")
  assert one["bytes_per_device"] == 0 and one["latency_s"] > 0
  two = last_json(run("infer.lab.prefill_time", f"--model={spec}", f"--tokens={CONTEXT}",
                      "--mesh=2", "--exchange=vq", "--groups=4", "--codebook-size=16", *FAST))
  assert two["model"] == spec and (two["width"], two["layers"]) == (24, 2)
  assert (two["tokens"], two["mesh"], two["exchange"]) == (CONTEXT, 2, "vq")
  assert (two["groups"], two["codebook_size"], two["parallelism"]) == (4, 16, "sequence")
  assert two["bytes_per_device"] > 0 and len(two["latencies_s"]) == 1


def test_gguf_file_sequence_parallel_exact(gguf_file):
  from test_gguf import D, LAYERS
  got = last_json(run("infer.lab.prefill_time", f"--model=gguf:{gguf_file}", "--tokens=16",
                      "--mesh=2", *FAST))
  assert got["model"] == f"gguf:{gguf_file}" and (got["width"], got["layers"]) == (D, LAYERS)
  assert (got["tokens"], got["mesh"], got["exchange"]) == (16, 2, "exact")
  assert got["bytes_per_device"] > 0


def test_more_tokens_than_the_models_context(hf_folder):
  proc = run("infer.lab.prefill_time", f"--model=hf:{hf_folder}", f"--tokens={CONTEXT + 1}",
             "--mesh=1", *FAST)
  line = assert_one_line_error(proc, 2, f"--tokens {CONTEXT + 1} exceeds")
  assert f"context of {CONTEXT} tokens" in line


@pytest.mark.parametrize("model, message", [
    ("foo:bar", "--model must be gpt2:<variant> or vit:<variant>/<patch> (random init), or a "
                "pretrained LM: smollm2 (bundled), gguf:PATH or hf:DIR; got 'foo:bar'"),
    ("gpt2", "--model must be gpt2:<variant>"),
    ("smolm2", "'smolm2' names no pretrained model"),  # a bare name: the bundled ones listed
    ("gguf:/no/such.gguf", "no such file"),
])
def test_unknown_model_forms(model, message):
  assert_one_line_error(run("infer.lab.prefill_time", f"--model={model}", "--mesh=1", *FAST), 2,
                        message)


def test_vocab_size_sets_a_random_gpt2_head_and_is_refused_elsewhere():
  got = last_json(run("infer.lab.prefill_time", "--model=gpt2:nano", "--tokens=16", "--mesh=1",
                      "--vocab-size=1000", *FAST))
  assert got["vocab_size"] == 1000
  assert last_json(run("infer.lab.prefill_time", "--model=gpt2:nano", "--tokens=16", "--mesh=1",
                       *FAST))["vocab_size"] == 256
  assert_one_line_error(run("infer.lab.prefill_time", "--model=vit:mu/7", "--tokens=16",
                            "--mesh=1", "--vocab-size=1000", *FAST), 2,
                        "--vocab-size is for gpt2:<variant> models")
