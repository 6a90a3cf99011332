"""Pretrained checkpoints on the LM CLIs: ``--model`` (infer) and ``--init-from``
(train) with a tiny Llama written as a transformers folder and as a GGUF file,
and the bad inputs a user meets (each one line, exit 2, nothing written).

The real SmolLM2 file is proven against transformers in tests/test_gguf.py;
here the point is the command-line path end to end, on models small enough
for CI.
"""

import json

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="needs safetensors: .venv/bin/python -m pip install "
                    "safetensors")
tokenizers = pytest.importorskip("tokenizers")
from cli_helpers import last_json, run  # noqa: E402
from test_hf_llama import _hf_config, _hf_tensors, _write  # noqa: E402
from test_bad_input import _fails_cleanly  # noqa: E402

VOCAB = 300
CONFIG = _hf_config(vocab_size=VOCAB, max_position_embeddings=64)
TINY = ["--config.context=32", "--config.batch_size=2", "--config.log_every=1",
        "--config.warmup_steps=1", "--config.eval_windows=2", "--config.eval_batch_size=2",
        "--config.kmeans_tokens=128", "--config.vq.groups=4", "--config.vq.codebook_size=16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "verse.txt"
  path.write_text("".join(f"When in disgrace with fortune, line {i % 11}.\n" for i in range(300)))
  return path


@pytest.fixture(scope="module")
def hf_folder(corpus, tmp_path_factory):
  """A random tiny Llama as transformers saves it (tests/test_hf_llama.py's), with a
  byte-level BPE tokenizer trained on the corpus."""
  folder = _write(tmp_path_factory.mktemp("hf") / "tiny-llama", CONFIG, _hf_tensors(CONFIG))
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(corpus.read_text().splitlines(), vocab_size=VOCAB, min_frequency=1,
                          show_progress=False)
  tok.save(str(folder / "tokenizer.json"))
  return folder


def test_model_flag_evaluates_the_same_on_mesh_1_and_4(hf_folder, corpus):
  common = ("infer.llama", f"--model=hf:{hf_folder}", "--eval", f"--text={corpus}",
            "--context=32", "--eval-windows=2")
  one = last_json(run(*common, "--mesh=1"))
  four = last_json(run(*common, "--mesh=4"))
  assert one["model"] == f"hf:{hf_folder}" and one["family"] == "llama"
  assert one["tokens"] == four["tokens"] == 64
  assert one["perplexity"] == pytest.approx(four["perplexity"], rel=1e-5)
  assert four["bytes_per_device"] == four["bytes_per_device_formula"] > 0


def test_zero_shot_astra_and_fine_tuning_from_a_checkpoint(hf_folder, corpus, tmp_path):
  zero = run("infer.llama", f"--model=hf:{hf_folder}", "--eval", f"--text={corpus}",
             "--context=32", "--eval-windows=2", "--mesh=4",
             "--exchange=vq:groups=4,codebook_size=16")
  zero_shot = last_json(zero)
  assert zero_shot["exchange"] == "vq" and zero_shot["bits_per_token"] == 16
  assert np.isfinite(zero_shot["perplexity"])

  work = tmp_path / "g4"
  proc = run("train.llama", "--mesh=4", f"--init-from=hf:{hf_folder}", f"--workdir={work}",
             f"--config.text={corpus}", "--config.exchange=vq", "--config.steps=2", *TINY)
  trained = last_json(proc)
  assert "k-means" in proc.stdout and trained["exchange"] == "vq"
  saved = json.loads((work / "config.json").read_text())
  assert saved["model"] == f"hf:{hf_folder}" and saved["tokenizer"] == f"hf:{hf_folder}"
  assert saved["vocab_size"] == VOCAB and saved["family"] == "llama"
  again = last_json(run("infer.llama", f"--workdir={work}", "--mesh=4", "--eval"))
  assert again["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-5)
  gen = last_json(run("infer.llama", f"--workdir={work}", "--mesh=2", "--prompt",
                      "When in disgrace", "--max-new-tokens=5"))
  assert gen["new_tokens"] == 5


def _gguf_llama(path, *, arch="llama", truncate=False):
  gguf = pytest.importorskip("gguf")
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  if truncate:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  return path


@pytest.mark.parametrize("spec, message", [
    ("foo:bar", "'foo:bar' names no pretrained model: write gguf:PATH"),
    ("gguf:/no/such/file.gguf", "gguf:/no/such/file.gguf: no such file"),
    ("hf:/no/such/folder", "hf:/no/such/folder: no such folder"),
])
def test_model_spec_errors(spec, message, tmp_path):
  _fails_cleanly(("infer.llama", f"--model={spec}", "--eval"), message, watch=[tmp_path])


def test_gguf_of_another_architecture(tmp_path):
  path = _gguf_llama(tmp_path / "gpt2.gguf", arch="gpt2")
  _fails_cleanly(("infer.llama", f"--model=gguf:{path}", "--eval"), "gpt2", watch=[tmp_path])


def test_truncated_gguf(tmp_path):
  path = _gguf_llama(tmp_path / "cut.gguf", truncate=True)
  _fails_cleanly(("infer.llama", f"--model=gguf:{path}", "--eval"), str(path),
                 watch=[tmp_path])


def test_hf_folder_missing_its_weights(hf_folder, tmp_path):
  folder = tmp_path / "no-weights"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(CONFIG))
  (folder / "tokenizer.json").write_text((hf_folder / "tokenizer.json").read_text())
  _fails_cleanly(("infer.llama", f"--model=hf:{folder}", "--eval"),
                 "has neither model.safetensors nor model.safetensors.index.json",
                 watch=[tmp_path])


def test_init_from_a_bad_spec_writes_nothing(tmp_path):
  work = tmp_path / "run"
  _fails_cleanly(("train.llama", "--init-from=foo:bar", f"--workdir={work}"),
                 "names no pretrained model", watch=[tmp_path])
  assert not work.exists()


def test_init_from_a_hugging_face_folder_without_the_scheme(hf_folder, tmp_path):
  work = tmp_path / "run"
  _fails_cleanly(("train.llama", f"--init-from={hf_folder}", f"--workdir={work}"),
                 f"(it looks like a Hugging Face model folder: pass it as hf:{hf_folder})",
                 watch=[tmp_path])
  assert not work.exists()


def test_prompt_longer_than_the_window(hf_folder):
  _fails_cleanly(("infer.llama", f"--model=hf:{hf_folder}", "--context=8", "--mesh=1",
                  "--prompt", "When in disgrace with fortune and men's eyes",
                  "--max-new-tokens=4"), "exceeds the model's context of 8 tokens")
